rule frequent_label:
    input:
        exemplars=PATHS.chunk("exemplars"),
        manifest=PATHS.manifest,
        worlds=annotation_worlds,
    output:
        PATHS.chunk("frequent_label"),
    log:
        PATHS.chunk_log("frequent_label"),
    benchmark:
        PATHS.chunk_benchmark("frequent_label")
    group:
        chunk_group("frequent_label")
    threads: stage_resource("frequent_label", "cpus")
    resources:
        mem_mb=scaled("frequent_label", "mem_mb"),
        runtime=scaled("frequent_label", "runtime"),
        gpu=gpus("frequent_label"),
    params:
        settings=lambda w: result_settings("frequent_label", w),
        args=lambda w, input, output: as_json(
            {
                "exemplars": input.exemplars,
                "manifest": input.manifest,
                "out": output[0],
                "captioner": config["captioner"],
                "worlds": annotation_world_pairs(),
                "cache": PATHS.cache,
                "min_count": config["frequent"]["min_count"],
                "device": config["device"],
            }
        ),
    shell:
        '"${{NEUROSCRIBE_PYTHON:-python}}" -m neuroscribe frequent_label {params.args:q} 2> {log}'
