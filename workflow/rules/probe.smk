rule render_demo_probe:
    output:
        directory(f"{RESULTS}/probe/demo/{{dataset}}"),
    log:
        f"{RESULTS}/logs/render_demo_probe/{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/render_demo_probe/{{dataset}}.tsv"
    localrule: True
    conda:
        CPU_ENV
    params:
        args=lambda w, output: as_json(demo_args(w.dataset, output[0])),
    shell:
        "python -m neuroscribe render-demo {params.args:q} 2> {log}"


rule probe_manifest:
    input:
        demo_dirs(),
    output:
        manifest=f"{RESULTS}/probe/manifest.parquet",
        rejected=f"{RESULTS}/probe/rejected.parquet",
    log:
        f"{RESULTS}/logs/probe_manifest.log",
    benchmark:
        f"{RESULTS}/benchmarks/probe_manifest.tsv"
    conda:
        CPU_ENV
    threads: stage_resource("manifest", "cpus")
    resources:
        mem_mb=scaled("manifest", "mem_mb"),
        runtime=scaled("manifest", "runtime"),
    params:
        # the file count makes Snakemake rebuild the manifest when files are added or removed
        args=lambda w, output, threads: as_json(
            {
                "datasets": [d.__dict__ for d in LAYOUT.datasets],
                "files": LAYOUT.n_candidates,
                "results": RESULTS,
                "manifest": output.manifest,
                "rejected": output.rejected,
                "workers": threads,
            }
        ),
    shell:
        "python -m neuroscribe manifest {params.args:q} 2> {log}"
