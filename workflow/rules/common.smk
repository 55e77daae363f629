import json
import os
import sys
import time

from snakemake_interface_executor_plugins.settings import DeploymentMethod

from neuroscribe.describe import failure_summary
from neuroscribe.fanout import CHUNK_GROUPS, build_layout
from neuroscribe.plan import build_plan
from neuroscribe.probe import demo_folder
from neuroscribe.resources import DEFAULT_LIMITS, stage_gpus

# No `configfile:` here: a default config would be merged under every --configfile, filling
# keys the user left out with another run's models. Without --configfile this fails, saying so.
# Validates the config (defaults filled in) and inspects the models (cached), so a bad config
# or layer name fails here, before `snakemake -n` prints anything.
STARTED = time.time()
LAYOUT = build_layout(config)
RESULTS = LAYOUT.results
CPU_ENV = "../../envs/cpu.yaml"
GPU_ENV = "../../envs/gpu.yaml"
# Jobs run the package with the interpreter running snakemake (which has just imported it), so
# they work without an activated environment, on SLURM nodes too (the variable reaches them
# through the submission's environment; same path on the shared filesystem); with
# --use-conda, the job environment's own python. An environment variable, not a path in the
# rules: moving the environment must not change the rules' code and so rerun every job.
os.environ["NEUROSCRIBE_PYTHON"] = (
    "python"
    if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
    else sys.executable
)


envvars:
    "NEUROSCRIBE_PYTHON",


# A `--resources` on the command line replaces the profile's whole map; keep the limits the
# rules rely on unless the user set them.
for _name, _limit in DEFAULT_LIMITS.items():
    if _name not in workflow.global_resources:
        workflow.register_resource(_name, _limit)


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


def largest_resize():
    """The largest shorter side a target resizes probe images to: bounds each resized image."""
    return max(t.transform.resize for t in LAYOUT.targets.values())


# Settings that are not results: a change must not rerun finished jobs.
PERFORMANCE_KEYS = {
    "batch_size",
    "max_concurrency",
    "max_attempts",
    "timeout_s",
    "run_on",
}


def _without_performance(section):
    return {k: v for k, v in section.items() if k not in PERFORMANCE_KEYS}


def result_settings(stage, wildcards):
    """Everything in the config that changes what a job of `stage` writes, as a param of its
    own: Snakemake reruns a job whose params changed, but only compares params that are not
    computed from input, output or threads (as each rule's `args` is)."""
    compute = {"device": config["device"], "dtype": config["dtype"]}
    w = wildcards
    if stage == "activations":  # a shard holds every layer of the target
        return as_json({"target": target_dict(w.model)} | compute)
    if stage == "merge":
        return as_json(
            {"target": layer_target(w.model, w.layer), "top_k": config["top_k"]}
        )
    if stage == "exemplars":
        chunk = LAYOUT.chunk(w.model, w.layer, w.chunk)
        return as_json(
            {
                "target": layer_target(w.model, w.layer),
                "neurons": list(chunk.neurons),
                "top_k": config["top_k"],
                "crops": has_crops(w.model, w.layer),
            }
            | compute
        )
    if stage == "captions":
        return as_json(
            {"captioner": _without_performance(config["captioner"])} | compute
        )
    if stage == "concepts":
        return as_json({"llm": _without_performance(config["llm"])} | compute)
    if stage == "synthesis":
        return as_json(
            {"synthesizer": _without_performance(config["synthesizer"])} | compute
        )
    if stage == "scores":
        return as_json(
            {
                "target": layer_target(w.model, w.layer),
                "scoring": config["scoring"],
                "top_k": config["top_k"],
            }
            | compute
        )
    raise ValueError(f"no result settings for stage {stage!r}")


def target_dict(model):
    return LAYOUT.targets[model].to_dict()


def layer_target(model, layer):
    """The target with only `layer` among its layers: adding a layer reruns no other layer."""
    target = target_dict(model)
    return target | {"layers": [x for x in target["layers"] if x["name"] == layer]}


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


def activation_outputs():
    """Shards and merged layer files, so a deleted one is rebuilt on the next run."""
    return [
        f
        for model in LAYOUT.targets
        for f in [
            *expand(
                f"{RESULTS}/activations/{model}/shard-{{shard:04d}}.h5",
                shard=range(LAYOUT.n_shards),
            ),
            *layer_files(model).values(),
        ]
    ]


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


def gpus(stage):
    """GPUs per job: none on `device: cpu` or for backends that run no model on one."""
    return stage_gpus(config, stage)


def has_crops(model, layer):
    """Attention crops need the layer's spatial map; without them exemplars are a top-K lookup."""
    return config["crops"] and layer in LAYOUT.spatial_layers[model]


def exemplar_gpus(wildcards):
    return gpus("exemplars") if has_crops(wildcards.model, wildcards.layer) else 0


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
        "limits": {name: resource_limit(name) for name in DEFAULT_LIMITS},
    }


def resource_limit(name):
    """The limit this invocation puts on a resource (`--resources`, the profile, or ours)."""
    limit = workflow.global_resources.get(name)
    return getattr(limit, "value", limit)


# Describe-and-Dissect's chunk stages after the exemplars
DND_STAGES = ["captions", "concepts", "synthesis", "scores"]


def method_outputs():
    """Per-chunk outputs of the enabled methods, so a deleted one is recomputed."""
    if "dnd" not in config["methods"]:
        return []
    return [f for stage in DND_STAGES for f in chunk_outputs(stage, "parquet")]


def describe_inputs():
    inputs = {"exemplars": chunk_outputs("exemplars", "parquet")}
    if "dnd" in config["methods"]:
        inputs |= {stage: chunk_outputs(stage, "parquet") for stage in DND_STAGES}
    return inputs


def report_failures():
    """After a run that wrote the table: how many neurons each method described or failed."""
    table = f"{RESULTS}/descriptions.parquet"
    if os.path.exists(table) and os.path.getmtime(table) >= STARTED:
        print(failure_summary(table, f"{RESULTS}/logs"), file=sys.stderr)


def weights_file_of(wildcards):
    """The weights file the config names for a target (python:/timm: with a file), or none."""
    from neuroscribe.weights import configured_weights_file

    path = configured_weights_file(LAYOUT.targets[wildcards.model])
    return [path] if path else []


def weights_record_of(wildcards):
    """The check_weights record of a target with a weights file: jobs that load the weights
    wait for it, so a bad file fails once, cheaply, before any GPU job."""
    if not weights_file_of(wildcards):
        return []
    return [f"{RESULTS}/inspect/{wildcards.model}.weights.json"]
