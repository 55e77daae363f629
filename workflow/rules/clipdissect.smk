# CLIP-Dissect (neuroscribe.methods.clipdissect): per layer, soft-WPMI of a concept set over
# the layer's merged activations. Included by the Snakefile when `clipdissect` is among the
# config's methods.
# the annotations backend reads the demo worlds' annotations
CLIPDISSECT_ANNOTATIONS = config["clipdissect"]["backend"] == "annotations"


rule clipdissect:
    input:
        layer=PATHS.layer_file(),
        manifest=PATHS.manifest,
        worlds=[folder for _, folder in demo_worlds_if(CLIPDISSECT_ANNOTATIONS)],
    output:
        PATHS.layer_table("clipdissect"),
    log:
        PATHS.layer_log("clipdissect"),
    benchmark:
        PATHS.layer_benchmark("clipdissect")
    conda:
        GPU_ENV
    threads: stage_resource("clipdissect", "cpus")
    resources:
        mem_mb=scaled("clipdissect", "mem_mb"),
        runtime=scaled("clipdissect", "runtime"),
        gpu=gpus("clipdissect"),
    params:
        # a changed setting reruns the job (see result_settings)
        settings=lambda w: result_settings("clipdissect", w),
        args=lambda w, input, output: as_json(
            {
                "layer_file": input.layer,
                "manifest": input.manifest,
                "out": output[0],
                "concepts": config["clipdissect"]["concepts"],
                "wordfreq_words": config["clipdissect"]["wordfreq_words"],
                "backend": {
                    k: config["clipdissect"][k]
                    for k in ("backend", "model", "batch_size", "text_batch_size")
                },
                "scoring": {
                    k: config["clipdissect"][k]
                    for k in ("top_k", "a", "lam", "p_start", "p_end", "min_prob")
                },
                "keep": config["clipdissect"]["keep"],
                "memory_mb": config["clipdissect"]["memory_mb"],
                "worlds": demo_worlds_if(CLIPDISSECT_ANNOTATIONS),
                "cache": PATHS.cache,
                "device": config["device"],
                "dtype": config["dtype"],
            }
        ),
    shell:
        '"${{NEUROSCRIBE_PYTHON:-python}}" -m neuroscribe clipdissect {params.args:q} 2> {log}'
