# TExplain (neuroscribe.methods.texplain): captions of the explain split; per target, the
# translator's input features, the translator, the reference sentences and per-class words;
# per chunk, each neuron's words. Included by the Snakefile when `texplain` is among the
# config's methods.
from neuroscribe.methods import texplain as tx

# each target's translator input layer, and the (model, layer) pairs also explained in
# direction mode (checked at parse time: direction needs the input layer)
TEXPLAIN_INPUTS = tx.input_layers(LAYOUT, config)
TEXPLAIN_DIRECTION = tx.direction_layers(LAYOUT, config)
TEXPLAIN_MODELS = f"{RESULTS}/texplain_models"
TEXPLAIN_DEMO_LM = f"{TEXPLAIN_MODELS}/lm"
TEXPLAIN_LM = tx.lm_model(config, TEXPLAIN_DEMO_LM)
TEXPLAIN_CAPTIONS = f"{RESULTS}/texplain/captions.parquet"
# a named caption file trains the translator on its own images (their features by a job of
# their own); without one, the captioned explain split and the probe's features
TEXPLAIN_CAPTION_FILE = config["texplain"]["captions"]
TEXPLAIN_CAPTION_IMAGES = f"{RESULTS}/texplain/caption_images.parquet"
TEXPLAIN_TRAIN_FEATURES = (
    f"{TEXPLAIN_MODELS}/{{model}}/features.h5"
    if TEXPLAIN_CAPTION_FILE is None
    else f"{TEXPLAIN_MODELS}/{{model}}/train_features.h5"
)
# the demo LM's folder, an input of the jobs that load the LM when the workflow pre-trains it
TEXPLAIN_LM_INPUT = [TEXPLAIN_DEMO_LM] if TEXPLAIN_LM == TEXPLAIN_DEMO_LM else []


rule texplain_lm:
    output:
        directory(TEXPLAIN_DEMO_LM),
    log:
        PATHS.log("texplain_lm", "lm"),
    benchmark:
        PATHS.benchmark("texplain_lm", "lm")
    conda:
        GPU_ENV
    threads: stage_resource("texplain_lm", "cpus")
    resources:
        mem_mb=scaled("texplain_lm", "mem_mb"),
        runtime=scaled("texplain_lm", "runtime"),
    params:
        settings=lambda w: job_settings("texplain_lm"),
        args=lambda w, output: as_json(
            {
                "out": output[0],
                "steps": config["texplain"]["lm"]["demo_steps"],
                "seed": config["texplain"]["train"]["seed"],
            }
        ),
    shell:
        'OMP_NUM_THREADS={threads} "${{NEUROSCRIBE_PYTHON:-python}}" -m neuroscribe texplain_lm {params.args:q} 2> {log}'


if TEXPLAIN_CAPTION_FILE is None:

    rule texplain_captions:
        input:
            manifest=PATHS.manifest,
            worlds=annotation_worlds,
        output:
            TEXPLAIN_CAPTIONS,
        log:
            PATHS.log("texplain_captions", "captions"),
        benchmark:
            PATHS.benchmark("texplain_captions", "captions")
        conda:
            GPU_ENV
        threads: stage_resource("texplain_captions", "cpus")
        resources:
            mem_mb=scaled("texplain_captions", "mem_mb"),
            runtime=scaled("texplain_captions", "runtime"),
            gpu=gpus("texplain_captions"),
        params:
            settings=lambda w: job_settings("texplain_captions"),
            args=lambda w, input, output: as_json(
                {
                    "manifest": input.manifest,
                    "out": output[0],
                    "holdout": holdout(),
                    "captioner": config["captioner"],
                    "worlds": annotation_world_pairs(),
                    "cache": PATHS.cache,
                    "device": config["device"],
                    "dtype": config["dtype"],
                }
            ),
        shell:
            'OMP_NUM_THREADS={threads} "${{NEUROSCRIBE_PYTHON:-python}}" -m neuroscribe texplain_captions {params.args:q} 2> {log}'

else:

    rule texplain_caption_file:
        input:
            TEXPLAIN_CAPTION_FILE["path"],
        output:
            captions=TEXPLAIN_CAPTIONS,
            manifest=TEXPLAIN_CAPTION_IMAGES,
            rejected=f"{RESULTS}/texplain/caption_images_rejected.parquet",
        log:
            PATHS.log("texplain_caption_file", "captions"),
        benchmark:
            PATHS.benchmark("texplain_caption_file", "captions")
        conda:
            CPU_ENV
        threads: stage_resource("texplain_caption_file", "cpus")
        resources:
            mem_mb=scaled("texplain_caption_file", "mem_mb"),
            runtime=scaled("texplain_caption_file", "runtime"),
        params:
            settings=lambda w: job_settings("texplain_caption_file"),
            args=lambda w, input, output, threads: as_json(
                {
                    "path": input[0],
                    "path_column": TEXPLAIN_CAPTION_FILE["path_column"],
                    "caption_column": TEXPLAIN_CAPTION_FILE["caption_column"],
                    "out": output.captions,
                    "manifest": output.manifest,
                    "rejected": output.rejected,
                    "workers": threads,
                    "resize": largest_resize(),
                }
            ),
        shell:
            '"${{NEUROSCRIBE_PYTHON:-python}}" -m neuroscribe texplain_caption_file {params.args:q} 2> {log}'

    rule texplain_train_features:
        input:
            manifest=TEXPLAIN_CAPTION_IMAGES,
            weights=trained_weights_of,
            weights_check=weights_record_of,
        output:
            f"{TEXPLAIN_MODELS}/{{model}}/train_features.h5",
        log:
            PATHS.log("texplain_train_features", "{model}"),
        benchmark:
            PATHS.benchmark("texplain_train_features", "{model}")
        conda:
            GPU_ENV
        threads: stage_resource("texplain_train_features", "cpus")
        resources:
            mem_mb=scaled("texplain_train_features", "mem_mb"),
            runtime=scaled("texplain_train_features", "runtime"),
            gpu=gpus("texplain_train_features"),
        params:
            settings=lambda w: job_settings("texplain_train_features", w.model),
            args=lambda w, input, output, threads: as_json(
                {
                    "manifest": input.manifest,
                    "target": target_dict(w.model),
                    "layer": tx.input_spec(
                        LAYOUT.targets[w.model], TEXPLAIN_INPUTS[w.model]
                    ),
                    "output_layer": None,
                    "out": output[0],
                    "batch_size": config["batch_size"],
                    "workers": threads,
                    "device": config["device"],
                    "dtype": config["dtype"],
                }
            ),
        shell:
            'OMP_NUM_THREADS={threads} "${{NEUROSCRIBE_PYTHON:-python}}" -m neuroscribe texplain_train_features {params.args:q} 2> {log}'


rule texplain_features:
    input:
        manifest=PATHS.manifest,
        weights=trained_weights_of,
        weights_check=weights_record_of,
    output:
        f"{TEXPLAIN_MODELS}/{{model}}/features.h5",
    log:
        PATHS.log("texplain_features", "{model}"),
    benchmark:
        PATHS.benchmark("texplain_features", "{model}")
    conda:
        GPU_ENV
    threads: stage_resource("texplain_features", "cpus")
    resources:
        mem_mb=scaled("texplain_features", "mem_mb"),
        runtime=scaled("texplain_features", "runtime"),
        gpu=gpus("texplain_features"),
    params:
        settings=lambda w: job_settings("texplain_features", w.model),
        args=lambda w, input, output, threads: as_json(
            {
                "manifest": input.manifest,
                "target": target_dict(w.model),
                "layer": tx.input_spec(
                    LAYOUT.targets[w.model], TEXPLAIN_INPUTS[w.model]
                ),
                "output_layer": LAYOUT.output_layers[w.model],
                "out": output[0],
                "batch_size": config["batch_size"],
                "workers": threads,
                "device": config["device"],
                "dtype": config["dtype"],
            }
        ),
    shell:
        'OMP_NUM_THREADS={threads} "${{NEUROSCRIBE_PYTHON:-python}}" -m neuroscribe texplain_features {params.args:q} 2> {log}'


rule texplain_train:
    input:
        features=TEXPLAIN_TRAIN_FEATURES,
        captions=TEXPLAIN_CAPTIONS,
        lm=TEXPLAIN_LM_INPUT,
    output:
        translator=f"{TEXPLAIN_MODELS}/{{model}}/translator.pt",
        metrics=f"{TEXPLAIN_MODELS}/{{model}}/metrics.json",
        loss=f"{TEXPLAIN_MODELS}/{{model}}/loss.csv",
        plot=report(
            f"{TEXPLAIN_MODELS}/{{model}}/loss.png",
            caption="../report/texplain_loss.rst",
            category="TExplain",
            labels={"model": "{model}", "figure": "translator loss"},
        ),
    log:
        PATHS.log("texplain_train", "{model}"),
    benchmark:
        PATHS.benchmark("texplain_train", "{model}")
    conda:
        GPU_ENV
    threads: stage_resource("texplain_train", "cpus")
    resources:
        mem_mb=scaled("texplain_train", "mem_mb"),
        runtime=scaled("texplain_train", "runtime"),
        gpu=gpus("texplain_train"),
    params:
        settings=lambda w: job_settings("texplain_train", w.model),
        args=lambda w, input, output: as_json(
            {
                "features": input.features,
                "captions": input.captions,
                "layer": TEXPLAIN_INPUTS[w.model],
                "lm": TEXPLAIN_LM,
                "translator": config["texplain"]["translator"],
                "settings": config["texplain"]["train"],
                "out_dir": f"{TEXPLAIN_MODELS}/{w.model}",
                # survives a preempted job (not an output): the next attempt resumes from it
                "checkpoint_dir": f"{TEXPLAIN_MODELS}/{w.model}/checkpoint",
                "device": config["device"],
                "dtype": config["dtype"],
            }
        ),
    shell:
        'OMP_NUM_THREADS={threads} "${{NEUROSCRIBE_PYTHON:-python}}" -m neuroscribe texplain_train {params.args:q} 2> {log}'


rule texplain_reference:
    input:
        features=f"{TEXPLAIN_MODELS}/{{model}}/features.h5",
        translator=f"{TEXPLAIN_MODELS}/{{model}}/translator.pt",
        manifest=PATHS.manifest,
        lm=TEXPLAIN_LM_INPUT,
    output:
        reference=f"{TEXPLAIN_MODELS}/{{model}}/reference.parquet",
        classes=f"{RESULTS}/texplain/classes/{{model}}.parquet",
    log:
        PATHS.log("texplain_reference", "{model}"),
    benchmark:
        PATHS.benchmark("texplain_reference", "{model}")
    conda:
        GPU_ENV
    threads: stage_resource("texplain_reference", "cpus")
    resources:
        mem_mb=scaled("texplain_reference", "mem_mb"),
        runtime=scaled("texplain_reference", "runtime"),
        gpu=gpus("texplain_reference"),
    params:
        settings=lambda w: job_settings("texplain_reference", w.model),
        args=lambda w, input, output: as_json(
            {
                "features": input.features,
                "manifest": input.manifest,
                "layer": TEXPLAIN_INPUTS[w.model],
                "output_layer": LAYOUT.output_layers[w.model],
                "target": target_dict(w.model),
                "classes_file": classes_files()[w.model],
                "lm": TEXPLAIN_LM,
                "translator": input.translator,
                "holdout": holdout(),
                "sampling": config["texplain"]["sampling"],
                "words": tx.words_settings(config),
                "cache": PATHS.cache,
                "out_reference": output.reference,
                "out_classes": output.classes,
                "device": config["device"],
                "dtype": config["dtype"],
            }
        ),
    shell:
        'OMP_NUM_THREADS={threads} "${{NEUROSCRIBE_PYTHON:-python}}" -m neuroscribe texplain_reference {params.args:q} 2> {log}'


rule texplain_classes:
    input:
        [f"{RESULTS}/texplain/classes/{model}.parquet" for model in LAYOUT.targets],
    output:
        f"{RESULTS}/texplain/classes.parquet",
    log:
        PATHS.log("texplain_classes", "classes"),
    benchmark:
        PATHS.benchmark("texplain_classes", "classes")
    localrule: True
    conda:
        CPU_ENV
    params:
        args=lambda w, input, output: as_json({"inputs": list(input), "out": output[0]}),
    shell:
        'OMP_NUM_THREADS={threads} "${{NEUROSCRIBE_PYTHON:-python}}" -m neuroscribe texplain_classes {params.args:q} 2> {log}'


rule texplain:
    input:
        exemplars=PATHS.chunk("exemplars"),
        reference=f"{TEXPLAIN_MODELS}/{{model}}/reference.parquet",
        features=f"{TEXPLAIN_MODELS}/{{model}}/features.h5",
        translator=f"{TEXPLAIN_MODELS}/{{model}}/translator.pt",
        captions=TEXPLAIN_CAPTIONS,
        lm=TEXPLAIN_LM_INPUT,
    output:
        PATHS.chunk("texplain"),
    log:
        PATHS.chunk_log("texplain"),
    benchmark:
        PATHS.chunk_benchmark("texplain")
    group:
        chunk_group("texplain")
    # an API the compute nodes cannot reach is called from the head node (llm.run_on)
    localrule: on_head("texplain")
    conda:
        GPU_ENV
    threads: stage_resource("texplain", "cpus")
    resources:
        mem_mb=scaled("texplain", "mem_mb"),
        runtime=scaled("texplain", "runtime"),
        gpu=gpus("texplain"),
        llm_api=llm_api_slots("texplain"),
    params:
        # a changed setting reruns the job (see result_settings)
        settings=lambda w: result_settings("texplain", w),
        args=lambda w, input, output: as_json(
            {
                "exemplars": input.exemplars,
                "reference": input.reference,
                "features": input.features,
                "translator": input.translator,
                "captions": input.captions,
                "input_layer": TEXPLAIN_INPUTS[w.model],
                "layer": w.layer,
                "model": w.model,
                "neurons": list(LAYOUT.chunk(w.model, w.layer, w.chunk).neurons),
                "direction": (w.model, w.layer) in TEXPLAIN_DIRECTION,
                "direction_scale": config["texplain"]["direction"]["scale"],
                "holdout": holdout(),
                "lm": TEXPLAIN_LM,
                "sampling": config["texplain"]["sampling"],
                "words": tx.words_settings(config),
                "llm": llm_args() if config["llm"]["backend"] != "none" else None,
                "cache": PATHS.cache,
                "out": output[0],
                "max_failed_fraction": config["max_failed_fraction"],
                "device": config["device"],
                "dtype": config["dtype"],
            }
        ),
    shell:
        'OMP_NUM_THREADS={threads} "${{NEUROSCRIBE_PYTHON:-python}}" -m neuroscribe texplain {params.args:q} 2> {log}'
