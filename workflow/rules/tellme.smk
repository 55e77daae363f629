# TeLLMe (neuroscribe.methods.tellme): per chunk, the images each neuron is explained and
# scored on, with their captions; per layer, the neurons' effective weights to the classes
# (layers in tellme.weights.layers); per chunk, explanations, simulations and scores. Included
# by the Snakefile when `tellme` is among the config's methods.
from neuroscribe.methods.tellme import explaining as tellme_explaining
from neuroscribe.methods.tellme import sets as tellme_sets
from neuroscribe.methods.tellme import weight_layers as tellme_weight_layers
from neuroscribe.methods.tellme import weight_sets as tellme_weight_sets

# (model, layer) explained from their weights too (paths checked, and cached, at parse time)
TELLME_WEIGHT_LAYERS = tellme_weight_layers(LAYOUT, config)
# the annotations simulator reads the demo worlds' annotations
TELLME_ANNOTATIONS = config["tellme"]["simulator"]["backend"] == "annotations"


rule tellme_captions:
    input:
        layer=PATHS.layer_file(),
        manifest=PATHS.manifest,
        worlds=annotation_worlds,
    output:
        PATHS.chunk("tellme_captions"),
    log:
        PATHS.chunk_log("tellme_captions"),
    benchmark:
        PATHS.chunk_benchmark("tellme_captions")
    group:
        chunk_group("tellme_captions")
    conda:
        GPU_ENV
    threads: stage_resource("tellme_captions", "cpus")
    resources:
        mem_mb=scaled("tellme_captions", "mem_mb"),
        runtime=scaled("tellme_captions", "runtime"),
        gpu=gpus("tellme_captions"),
    params:
        # a changed setting reruns the job (see result_settings)
        settings=lambda w: result_settings("tellme_captions", w),
        args=lambda w, input, output: as_json(
            {
                "layer_file": input.layer,
                "manifest": input.manifest,
                "neurons": list(LAYOUT.chunk(w.model, w.layer, w.chunk).neurons),
                "out": output[0],
                "sets": tellme_sets(config),
                "captioner": config["captioner"],
                "worlds": annotation_world_pairs(),
                "cache": PATHS.cache,
                "device": config["device"],
                "dtype": config["dtype"],
            }
        ),
    shell:
        '"${{NEUROSCRIBE_PYTHON:-python}}" -m neuroscribe tellme_captions {params.args:q} 2> {log}'


rule tellme_weights:
    input:
        weights=trained_weights_of,
        weights_check=weights_record_of,
    output:
        PATHS.layer_table("tellme_weights"),
    log:
        PATHS.layer_log("tellme_weights"),
    benchmark:
        PATHS.layer_benchmark("tellme_weights")
    conda:
        GPU_ENV
    threads: stage_resource("tellme_weights", "cpus")
    resources:
        mem_mb=scaled("tellme_weights", "mem_mb"),
        runtime=scaled("tellme_weights", "runtime"),
        gpu=gpus("tellme_weights"),
    params:
        # a changed setting reruns the job (see result_settings)
        settings=lambda w: result_settings("tellme_weights", w),
        args=lambda w, input, output: as_json(
            {
                "target": target_dict(w.model),
                "layer": w.layer,
                "neurons": [
                    n for c in LAYOUT.chunks[(w.model, w.layer)] for n in c.neurons
                ],
                "width": LAYOUT.layer_sizes[w.model][w.layer],
                "out": output[0],
                "enabled": (w.model, w.layer) in TELLME_WEIGHT_LAYERS,
                "path": config["tellme"]["weights"]["path"].get(w.layer),
                "classes_file": classes_files()[w.model],
            }
        ),
    shell:
        '"${{NEUROSCRIBE_PYTHON:-python}}" -m neuroscribe tellme_weights {params.args:q} 2> {log}'


rule tellme:
    input:
        captions=PATHS.chunk("tellme_captions"),
        weights=PATHS.layer_table("tellme_weights"),
        manifest=PATHS.manifest,
        worlds=[folder for _, folder in demo_worlds_if(TELLME_ANNOTATIONS)],
    output:
        PATHS.chunk("tellme"),
    log:
        PATHS.chunk_log("tellme"),
    benchmark:
        PATHS.chunk_benchmark("tellme")
    group:
        chunk_group("tellme")
    # an API the compute nodes cannot reach is called from the head node (llm.run_on)
    localrule: on_head("tellme")
    conda:
        GPU_ENV
    threads: stage_resource("tellme", "cpus")
    resources:
        mem_mb=scaled("tellme", "mem_mb"),
        runtime=scaled("tellme", "runtime"),
        gpu=gpus("tellme"),
        llm_api=llm_api_slots("tellme"),
    params:
        # a changed setting reruns the job (see result_settings)
        settings=lambda w: result_settings("tellme", w),
        args=lambda w, input, output: as_json(
            {
                "captions": input.captions,
                "weights": input.weights,
                "manifest": input.manifest,
                "out": output[0],
                "llm": llm_args(),
                "explain": tellme_explaining(config),
                "weight_sets": tellme_weight_sets(config),
                "simulator": config["tellme"]["simulator"],
                "worlds": demo_worlds_if(TELLME_ANNOTATIONS),
                "cache": PATHS.cache,
                "device": config["device"],
                "dtype": config["dtype"],
                "max_failed_fraction": config["max_failed_fraction"],
            }
        ),
    shell:
        '"${{NEUROSCRIBE_PYTHON:-python}}" -m neuroscribe tellme {params.args:q} 2> {log}'
