# Describe-and-Dissect (neuroscribe.methods.dnd): per chunk of neurons, captions of the
# exemplars, LLM concept proposal, synthesis of each candidate, scoring. Included by the
# Snakefile when `dnd` is among the config's methods.
from neuroscribe.methods.dnd import proposal as dnd_proposal


rule captions:
    input:
        exemplars=PATHS.chunk("exemplars"),
        manifest=PATHS.manifest,
        worlds=annotation_worlds,
    output:
        PATHS.chunk("captions"),
    log:
        PATHS.chunk_log("captions"),
    benchmark:
        PATHS.chunk_benchmark("captions")
    group:
        chunk_group("captions")
    conda:
        GPU_ENV
    threads: stage_resource("captions", "cpus")
    resources:
        mem_mb=scaled("captions", "mem_mb"),
        runtime=scaled("captions", "runtime"),
        gpu=gpus("captions"),
    params:
        # a changed setting reruns the job (see result_settings)
        settings=lambda w: result_settings("captions", w),
        args=lambda w, input, output: as_json(
            {
                "exemplars": input.exemplars,
                "manifest": input.manifest,
                "out": output[0],
                "captioner": config["captioner"],
                "worlds": annotation_world_pairs(),
                "cache": PATHS.cache,
                "device": config["device"],
                "dtype": config["dtype"],
            }
        ),
    shell:
        '"${{NEUROSCRIBE_PYTHON:-python}}" -m neuroscribe captions {params.args:q} 2> {log}'


rule concepts:
    input:
        PATHS.chunk("captions"),
    output:
        PATHS.chunk("concepts"),
    log:
        PATHS.chunk_log("concepts"),
    benchmark:
        PATHS.chunk_benchmark("concepts")
    group:
        chunk_group("concepts")
    # an API the compute nodes cannot reach is called from the head node (llm.run_on)
    localrule: on_head("concepts")
    conda:
        GPU_ENV
    threads: stage_resource("concepts", "cpus")
    resources:
        mem_mb=scaled("concepts", "mem_mb"),
        runtime=scaled("concepts", "runtime"),
        gpu=gpus("concepts"),
        llm_api=llm_api_slots("concepts"),
    params:
        # a changed setting reruns the job (see result_settings)
        settings=lambda w: result_settings("concepts", w),
        args=lambda w, input, output: as_json(
            {
                "captions": input[0],
                "out": output[0],
                "llm": llm_args(),
                "proposal": dnd_proposal(config),
                "cache": PATHS.cache,
                "device": config["device"],
                "dtype": config["dtype"],
                "max_failed_fraction": config["max_failed_fraction"],
            }
        ),
    shell:
        '"${{NEUROSCRIBE_PYTHON:-python}}" -m neuroscribe concepts {params.args:q} 2> {log}'


rule synthesis:
    input:
        PATHS.chunk("concepts"),
    output:
        PATHS.chunk("synthesis"),
    log:
        PATHS.chunk_log("synthesis"),
    benchmark:
        PATHS.chunk_benchmark("synthesis")
    group:
        chunk_group("synthesis")
    conda:
        GPU_ENV
    threads: stage_resource("synthesis", "cpus")
    resources:
        mem_mb=scaled("synthesis", "mem_mb"),
        runtime=scaled("synthesis", "runtime"),
        gpu=gpus("synthesis"),
    params:
        # a changed setting reruns the job (see result_settings)
        settings=lambda w: result_settings("synthesis", w),
        args=lambda w, input, output: as_json(
            {
                "concepts": input[0],
                "out": output[0],
                "synthesizer": config["dnd"]["synthesizer"],
                "store": PATHS.images,
                "device": config["device"],
                "dtype": config["dtype"],
            }
        ),
    shell:
        '"${{NEUROSCRIBE_PYTHON:-python}}" -m neuroscribe synthesis {params.args:q} 2> {log}'


rule scores:
    input:
        concepts=PATHS.chunk("concepts"),
        synthesis=PATHS.chunk("synthesis"),
        exemplars=PATHS.chunk("exemplars"),
        manifest=PATHS.manifest,
        weights=trained_weights_of,
        weights_check=weights_record_of,
    output:
        PATHS.chunk("scores"),
    log:
        PATHS.chunk_log("scores"),
    benchmark:
        PATHS.chunk_benchmark("scores")
    group:
        chunk_group("scores")
    conda:
        GPU_ENV
    threads: stage_resource("scores", "cpus")
    resources:
        mem_mb=scaled("scores", "mem_mb"),
        runtime=scaled("scores", "runtime"),
        gpu=gpus("scores"),
    params:
        # a changed setting reruns the job (see result_settings)
        settings=lambda w: result_settings("scores", w),
        args=lambda w, input, output, threads: as_json(
            {
                "concepts": input.concepts,
                "synthesis": input.synthesis,
                "exemplars": input.exemplars,
                "manifest": input.manifest,
                "out": output[0],
                "target": target_dict(w.model),
                "layer": w.layer,
                "scoring": config["dnd"]["scoring"],
                "top_k": config["top_k"],
                "save_every": config["save_every"],
                "max_failed_fraction": config["max_failed_fraction"],
                "settings": {
                    "batch_size": config["batch_size"],
                    "workers": threads,
                    "device": config["device"],
                    "dtype": config["dtype"],
                },
            }
        ),
    shell:
        '"${{NEUROSCRIBE_PYTHON:-python}}" -m neuroscribe scores {params.args:q} 2> {log}'
