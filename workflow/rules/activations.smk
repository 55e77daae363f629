rule activations:
    input:
        manifest=PATHS.manifest,
        weights=trained_weights_of,
        weights_check=weights_record_of,
    output:
        PATHS.shard(),
    log:
        PATHS.log("activations", "{model}", "shard-{shard}"),
    benchmark:
        PATHS.benchmark("activations", "{model}", "shard-{shard}")
    conda:
        GPU_ENV
    threads: stage_resource("activations", "cpus")
    resources:
        mem_mb=scaled("activations", "mem_mb"),
        runtime=scaled("activations", "runtime"),
        gpu=gpus("activations"),
    params:
        # a changed setting reruns the job (see result_settings)
        settings=lambda w: result_settings("activations", w),
        args=lambda w, input, output, threads: as_json(
            {
                "manifest": input.manifest,
                "target": target_dict(w.model),
                "layers": target_dict(w.model)["layers"],
                "shard": int(w.shard),
                "n_shards": LAYOUT.n_shards,
                "out": output[0],
                "batch_size": config["batch_size"],
                "workers": threads,
                "device": config["device"],
                "dtype": config["dtype"],
            }
        ),
    shell:
        '"${{NEUROSCRIBE_PYTHON:-python}}" -m neuroscribe activations {params.args:q} 2> {log}'


rule merge_activations:
    input:
        shard_files,
    output:
        PATHS.layer_file(),
    log:
        PATHS.log("merge_activations", "{model}", "{layer}"),
    benchmark:
        PATHS.benchmark("merge_activations", "{model}", "{layer}")
    conda:
        CPU_ENV
    threads: stage_resource("merge", "cpus")
    resources:
        mem_mb=scaled("merge", "mem_mb"),
        runtime=scaled("merge", "runtime"),
    params:
        # a changed setting reruns the job (see result_settings)
        settings=lambda w: result_settings("merge", w),
        args=lambda w, input, output: as_json(
            {
                "shards": list(input),
                "target": target_dict(w.model),
                "layer": layer_target(w.model, w.layer)["layers"][0],
                "out": output[0],
                "top_k": config["top_k"],
                "holdout": holdout(),
            }
        ),
    shell:
        '"${{NEUROSCRIBE_PYTHON:-python}}" -m neuroscribe merge {params.args:q} 2> {log}'
