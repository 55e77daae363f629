rule probe_manifest:
    input:
        demo_dirs(),
    output:
        manifest=PATHS.manifest,
        rejected=PATHS.rejected,
    log:
        PATHS.log("probe_manifest"),
    benchmark:
        PATHS.benchmark("probe_manifest")
    conda:
        CPU_ENV
    threads: stage_resource("manifest", "cpus")
    resources:
        mem_mb=scaled("manifest", "mem_mb"),
        runtime=scaled("manifest", "runtime"),
    params:
        # What the manifest depends on, in a param of its own: Snakemake reruns a job whose
        # params changed, but ignores params computed from input, output or threads (as `args`
        # is). The fingerprint (names, sizes, mtimes of the probe files) rebuilds the manifest,
        # and all that follows, when a file is added, removed, renamed or rewritten.
        probe=as_json(
            {
                "datasets": [d.__dict__ for d in LAYOUT.datasets],
                "fingerprint": LAYOUT.probe_fingerprint,
                "resize": largest_resize(),
            }
        ),
        args=lambda w, output, threads: as_json(
            {
                "datasets": [d.__dict__ for d in LAYOUT.datasets],
                # the largest shorter side a target resizes to: bounds each resized image
                "resize": largest_resize(),
                "results": RESULTS,
                "manifest_path": output.manifest,
                "rejected_path": output.rejected,
                "workers": threads,
            }
        ),
    shell:
        '"${{NEUROSCRIBE_PYTHON:-python}}" -m neuroscribe manifest {params.args:q} 2> {log}'
