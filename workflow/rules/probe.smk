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
