# Describe-and-Dissect: captions of each chunk's exemplars, then LLM concept proposal.


rule captions:
    input:
        exemplars=f"{RESULTS}/exemplars/{{model}}/{{layer}}/{{chunk}}.parquet",
        manifest=f"{RESULTS}/probe/manifest.parquet",
        worlds=annotation_worlds,
    output:
        f"{RESULTS}/captions/{{model}}/{{layer}}/{{chunk}}.parquet",
    log:
        f"{RESULTS}/logs/captions/{{model}}/{{layer}}/{{chunk}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/captions/{{model}}/{{layer}}/{{chunk}}.tsv"
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
                "cache": f"{RESULTS}/cache",
                "device": config["device"],
                "dtype": config["dtype"],
            }
        ),
    shell:
        '"${{NEUROSCRIBE_PYTHON:-python}}" -m neuroscribe captions {params.args:q} 2> {log}'


rule concepts:
    input:
        f"{RESULTS}/captions/{{model}}/{{layer}}/{{chunk}}.parquet",
    output:
        f"{RESULTS}/concepts/{{model}}/{{layer}}/{{chunk}}.parquet",
    log:
        f"{RESULTS}/logs/concepts/{{model}}/{{layer}}/{{chunk}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/concepts/{{model}}/{{layer}}/{{chunk}}.tsv"
    group:
        chunk_group("concepts")
    # an API the compute nodes cannot reach is called from the head node (llm.run_on)
    localrule: concepts_on_head()
    conda:
        GPU_ENV
    threads: stage_resource("concepts", "cpus")
    resources:
        mem_mb=scaled("concepts", "mem_mb"),
        runtime=scaled("concepts", "runtime"),
        gpu=gpus("concepts"),
        # caps API jobs running at once: `snakemake --resources llm_api=2`
        llm_api=int(config["llm"]["backend"] == "openai"),
    params:
        # a changed setting reruns the job (see result_settings)
        settings=lambda w: result_settings("concepts", w),
        args=lambda w, input, output: as_json(
            {
                "captions": input[0],
                "out": output[0],
                "llm": llm_args(),
                "cache": f"{RESULTS}/cache",
                "device": config["device"],
                "dtype": config["dtype"],
                "max_failed_fraction": config["max_failed_fraction"],
            }
        ),
    shell:
        '"${{NEUROSCRIBE_PYTHON:-python}}" -m neuroscribe concepts {params.args:q} 2> {log}'


rule synthesis:
    input:
        f"{RESULTS}/concepts/{{model}}/{{layer}}/{{chunk}}.parquet",
    output:
        f"{RESULTS}/synthesis/{{model}}/{{layer}}/{{chunk}}.parquet",
    log:
        f"{RESULTS}/logs/synthesis/{{model}}/{{layer}}/{{chunk}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/synthesis/{{model}}/{{layer}}/{{chunk}}.tsv"
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
                "synthesizer": config["synthesizer"],
                "store": f"{RESULTS}/images",
                "device": config["device"],
                "dtype": config["dtype"],
            }
        ),
    shell:
        '"${{NEUROSCRIBE_PYTHON:-python}}" -m neuroscribe synthesis {params.args:q} 2> {log}'


rule scores:
    input:
        concepts=f"{RESULTS}/concepts/{{model}}/{{layer}}/{{chunk}}.parquet",
        synthesis=f"{RESULTS}/synthesis/{{model}}/{{layer}}/{{chunk}}.parquet",
        exemplars=f"{RESULTS}/exemplars/{{model}}/{{layer}}/{{chunk}}.parquet",
        manifest=f"{RESULTS}/probe/manifest.parquet",
        weights=trained_weights_of,
        weights_check=weights_record_of,
    output:
        f"{RESULTS}/scores/{{model}}/{{layer}}/{{chunk}}.parquet",
    log:
        f"{RESULTS}/logs/scores/{{model}}/{{layer}}/{{chunk}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/scores/{{model}}/{{layer}}/{{chunk}}.tsv"
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
                "scoring": config["scoring"],
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
