# The held-out evaluation (neuroscribe.evaluation): one job per described layer scores every
# method's labels on the images no method saw, then one job summarises them. Its outputs are
# targets of `all` only when `evaluation.enabled` is true.
from neuroscribe.evaluation.checks import layer_job_settings

# the simulator is the `llm` role, reading the held-out images' captions
LLM_SIMULATOR = config["evaluation"]["simulator"]["backend"] == "llm"


rule evaluate_layer:
    input:
        descriptions=PATHS.descriptions(),
        layer=PATHS.layer_file(),
        manifest=PATHS.manifest,
        # the simulator's, the truth's and the captioner's demo worlds
        worlds=lambda w: list(
            dict.fromkeys(
                f
                for _, f in simulated_worlds()
                + demo_world_pairs()
                + (annotation_world_pairs() if LLM_SIMULATOR else [])
            )
        ),
        external=[t["path"] for t in config["evaluation"]["external"]],
    output:
        PATHS.evaluation_layer(),
    log:
        PATHS.log("evaluate_layer", "{model}", "{layer}"),
    benchmark:
        PATHS.benchmark("evaluate_layer", "{model}", "{layer}")
    # the llm simulator calls an API the compute nodes may not reach (llm.run_on)
    localrule: LLM_SIMULATOR and DERIVED.llm_on_head
    conda:
        GPU_ENV
    threads: stage_resource("evaluation", "cpus")
    resources:
        mem_mb=scaled("evaluation", "mem_mb"),
        runtime=scaled("evaluation", "runtime"),
        gpu=gpus("evaluation"),
        llm_api=int(LLM_SIMULATOR and config["llm"]["backend"] == "openai"),
    params:
        settings=lambda w: as_json(
            layer_job_settings(config, llm_args())
            | {"classes": classes_files()[w.model]}
        ),
        args=lambda w, input, output: as_json(
            {
                "descriptions": input.descriptions,
                "layer_file": input.layer,
                "manifest": input.manifest,
                "target": target_dict(w.model),
                "layer": w.layer,
                "width": LAYOUT.layer_sizes[w.model][w.layer],
                "output_layer": LAYOUT.output_layers[w.model] == w.layer,
                "classes_file": classes_files()[w.model],
                "simulator": config["evaluation"]["simulator"],
                "text_model": config["evaluation"]["text_model"],
                "clip_model": config["evaluation"]["clip_model"],
                "external": config["evaluation"]["external"],
                "truth_worlds": demo_world_pairs(),
                "cache": PATHS.cache,
                "worlds": simulated_worlds(),
                "out": output[0],
                "seed": config["evaluation"]["seed"],
                "device": config["device"],
                "dtype": config["dtype"],
                "captioner": config["captioner"] if LLM_SIMULATOR else None,
                "captioner_worlds": (
                    annotation_world_pairs() if LLM_SIMULATOR else []
                ),
                "llm": llm_args() if LLM_SIMULATOR else None,
            }
        ),
    shell:
        '"${{NEUROSCRIBE_PYTHON:-python}}" -m neuroscribe evaluate-layer {params.args:q} 2> {log}'


rule evaluation_summary:
    input:
        parts=[PATHS.evaluation_layer(m, layer) for m, layer in evaluated_layers()],
        manifest=PATHS.manifest,
    output:
        split=PATHS.evaluation_split(),
        neurons=PATHS.evaluation_neurons(),
        summary=PATHS.evaluation_summary(),
        csv=report(
            PATHS.evaluation_summary("csv"),
            caption="../report/evaluation_summary.rst",
            category="Evaluation",
        ),
    log:
        PATHS.log("evaluation_summary"),
    benchmark:
        PATHS.benchmark("evaluation_summary")
    localrule: True
    conda:
        CPU_ENV
    params:
        settings=lambda w: as_json(
            {k: config["evaluation"][k] for k in ("bootstrap", "seed", "holdout")}
        ),
        args=lambda w, input, output: as_json(
            {
                "parts": list(input.parts),
                "manifest": input.manifest,
                "holdout": holdout(),
                "split_out": output.split,
                "neurons_out": output.neurons,
                "summary_out": output.summary,
                "csv_out": output.csv,
                "bootstrap": config["evaluation"]["bootstrap"],
                "seed": config["evaluation"]["seed"],
            }
        ),
    shell:
        '"${{NEUROSCRIBE_PYTHON:-python}}" -m neuroscribe evaluate-summary {params.args:q} 2> {log}'


rule evaluate_shortcuts:
    input:
        classes=f"{RESULTS}/texplain/classes.parquet",
    output:
        PATHS.evaluation_shortcuts(),
    log:
        PATHS.log("evaluate_shortcuts"),
    benchmark:
        PATHS.benchmark("evaluate_shortcuts")
    localrule: True
    conda:
        CPU_ENV
    params:
        args=lambda w, input, output: as_json(
            {
                "classes": input.classes,
                "targets": [
                    {"name": t["name"], "train": t.get("train")}
                    for t in config["targets"]
                ],
                "out": output[0],
            }
        ),
    shell:
        '"${{NEUROSCRIBE_PYTHON:-python}}" -m neuroscribe evaluate-shortcuts {params.args:q} 2> {log}'
