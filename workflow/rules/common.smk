import json

from neuroscribe.fanout import CHUNK_GROUPS, build_layout
from neuroscribe.plan import build_plan
from neuroscribe.probe import demo_folder


configfile: "config/config.yaml"


# Validates the config (defaults filled in) and inspects the models (cached), so a bad config
# or layer name fails here, before `snakemake -n` prints anything.
LAYOUT = build_layout(config)
RESULTS = LAYOUT.results
CPU_ENV = "../../envs/cpu.yaml"
GPU_ENV = "../../envs/gpu.yaml"


wildcard_constraints:
    model=r"[A-Za-z0-9][A-Za-z0-9_.-]*",
    layer=r"(?!shard-)[^/]+",
    chunk=r"\d{4}\d*",
    shard=r"\d{4}\d*",
    dataset=r"[A-Za-z0-9][A-Za-z0-9_.-]*",


def as_json(obj):
    """Stage arguments for `python -m neuroscribe STAGE JSON` (sorted, so params are stable)."""
    return json.dumps(obj, sort_keys=True)


def stage_resource(stage, key):
    return config["resources"][stage][key]


def scaled(stage, key):
    """Memory/runtime that grow with the attempt number when a job is retried."""
    base = stage_resource(stage, key)
    return lambda wildcards, attempt: base * attempt


def target_dict(model):
    return LAYOUT.targets[model].to_dict()


def model_ids():
    return {
        name: t.spec + (f"@{t.weights}" if t.weights else "")
        for name, t in LAYOUT.targets.items()
    }


def demo_args(dataset, out_dir):
    ds = next(d for d in LAYOUT.datasets if d.name == dataset)
    return {
        "n_images": ds.n_images,
        "image_size": ds.image_size,
        "seed": ds.seed,
        "out_dir": out_dir,
    }


def train_args(model, output):
    # the untrained architecture: the weights path is this rule's output
    target = LAYOUT.targets[model].to_dict() | {"weights": None}
    return {"target": target, "out": output.weights, "metrics": output.metrics}


def trained_models():
    return [t.name for t in LAYOUT.targets.values() if t.train]


def evaluation_outputs():
    """The ground-truth evaluation, when the workflow trained a target on its demo world."""
    return [f"{RESULTS}/evaluation.parquet"] if trained_models() and demo_dirs() else []


def layer_files(model):
    """The merged activation file of every described layer of a model."""
    return {
        layer: f"{RESULTS}/activations/{model}/{layer}.h5"
        for layer in LAYOUT.layer_sizes[model]
    }


def evaluate_args(input, output):
    return {
        "descriptions": input.descriptions,
        "manifest": input.manifest,
        "worlds": [
            [d.name, str(demo_folder(RESULTS, d))]
            for d in LAYOUT.datasets
            if d.type == "demo"
        ],
        "targets": {
            model: {
                "layers": layer_files(model),
                "output_layer": LAYOUT.output_layers[model],
            }
            for model in trained_models()
        },
        "out": output[0],
    }


def trained_weights_of(wildcards):
    """The weights file a target needs from the workflow (none unless the workflow trains it)."""
    target = LAYOUT.targets[wildcards.model]
    return [target.weights] if target.train else []


def demo_dirs():
    return [str(demo_folder(RESULTS, d)) for d in LAYOUT.datasets if d.type == "demo"]


def shard_files(wildcards):
    return expand(
        f"{RESULTS}/activations/{wildcards.model}/shard-{{shard:04d}}.h5",
        shard=range(LAYOUT.n_shards),
    )


def chunk_outputs(stage, suffix):
    return [
        f"{RESULTS}/{stage}/{c.model}/{c.layer}/{c.name}.{suffix}"
        for c in LAYOUT.all_chunks()
    ]


def annotation_world_pairs():
    """(dataset, folder) of each annotated demo world, when the captioner reads annotations."""
    if config["captioner"]["backend"] != "annotations":
        return []
    return [
        [d.name, str(demo_folder(RESULTS, d))]
        for d in LAYOUT.datasets
        if d.type == "demo"
    ]


def annotation_worlds(wildcards):
    return [folder for _, folder in annotation_world_pairs()]


def captioner_gpus():
    # the annotations captioner reads a table: no GPU to wait for
    if config["captioner"]["backend"] == "annotations":
        return 0
    return stage_resource("captions", "gpus")


def llm_gpus():
    # only a chat model run inside the job needs a GPU; API clients and `none` do not
    if config["llm"]["backend"] != "local":
        return 0
    return stage_resource("concepts", "gpus")


def synthesizer_gpus():
    if config["synthesizer"]["backend"] == "procedural":
        return 0
    return stage_resource("synthesis", "gpus")


def concepts_on_head():
    """Concept jobs run where snakemake runs when the LLM API is not reachable from the nodes."""
    return "dnd" in config["methods"] and config["llm"]["run_on"] == "head"


def llm_args():
    # where the job runs is not part of what it computes: moving it must not rerun it
    return {k: v for k, v in config["llm"].items() if k != "run_on"}


def chunk_group(stage):
    if stage == "concepts" and concepts_on_head():
        return None
    return CHUNK_GROUPS[stage]


def cluster_view():
    """How this invocation runs jobs (executor, groups, local rules), for the plan's count of
    submitted jobs; read while the DAG is built, once the profile has been applied."""
    plugin = workflow.executor_plugin
    rules = {r.name: r for r in workflow.rules}
    return {
        "executor": plugin.name if plugin is not None else "local",
        "remote": not workflow.local_exec,
        "groups": {
            name: r.group for name, r in rules.items() if isinstance(r.group, str)
        },
        "local": [name for name, r in rules.items() if workflow.is_local(r)],
        "group_components": dict(workflow.group_settings.group_components),
    }


def method_outputs():
    """Per-chunk outputs of the enabled methods, so a deleted one is recomputed."""
    if "dnd" not in config["methods"]:
        return []
    stages = ["captions", "concepts", "synthesis", "scores"]
    return [f for stage in stages for f in chunk_outputs(stage, "parquet")]


def describe_inputs():
    inputs = {"exemplars": chunk_outputs("exemplars", "parquet")}
    if "dnd" in config["methods"]:
        inputs["captions"] = chunk_outputs("captions", "parquet")
        inputs["scores"] = chunk_outputs("scores", "parquet")
    return inputs


def role_ids():
    """The model of each role the enabled methods use, for the final table."""
    if "dnd" not in config["methods"]:
        return {}
    sim = config["scoring"]["similarity"]
    synth = config["synthesizer"]
    return {
        "captioner": config["captioner"]["backend"]
        + (
            f":{config['captioner']['model']}"
            if config["captioner"]["backend"] == "blip"
            else ""
        ),
        "llm": f"{config['llm']['backend']}:{config['llm']['model']}:{config['llm']['prompt_mode']}",
        "synthesizer": synth["backend"]
        + (
            f":{synth['model']}:steps={synth['steps']}"
            if synth["backend"] == "diffusers"
            else ""
        ),
        "similarity": sim["backend"]
        + (f":{sim['model']}" if sim["backend"] == "clip" else ""),
    }
