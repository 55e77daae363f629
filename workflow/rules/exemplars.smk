rule exemplars:
    input:
        layer=PATHS.layer_file(),
        manifest=PATHS.manifest,
        weights=trained_weights_of,
        weights_check=weights_record_of,
    output:
        PATHS.chunk("exemplars"),
    log:
        PATHS.chunk_log("exemplars"),
    benchmark:
        PATHS.chunk_benchmark("exemplars")
    group:
        chunk_group("exemplars")
    conda:
        GPU_ENV
    threads: stage_resource("exemplars", "cpus")
    resources:
        mem_mb=scaled("exemplars", "mem_mb"),
        runtime=scaled("exemplars", "runtime"),
        gpu=exemplar_gpus,
    params:
        # a changed setting reruns the job (see result_settings)
        settings=lambda w: result_settings("exemplars", w),
        args=lambda w, input, output, threads: as_json(
            {
                "layer_h5": input.layer,
                "manifest": input.manifest,
                "target": target_dict(w.model),
                "layer": w.layer,
                "neurons": list(LAYOUT.chunk(w.model, w.layer, w.chunk).neurons),
                "out": output[0],
                "top_k": config["top_k"],
                "crops": has_crops(w.model, w.layer),
                "crop_regions": config["crop_regions"],
                "crop_squash": config["crop_squash"],
                "save_every": config["save_every"],
                "batch_size": config["batch_size"],
                "workers": threads,
                "device": config["device"],
                "dtype": config["dtype"],
            }
        ),
    shell:
        '"${{NEUROSCRIBE_PYTHON:-python}}" -m neuroscribe exemplars {params.args:q} 2> {log}'
