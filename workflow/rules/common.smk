import json
import os
import sys
import time
from types import SimpleNamespace

from snakemake_interface_executor_plugins.settings import DeploymentMethod

from neuroscribe import methods
from neuroscribe.config import derive
from neuroscribe.demo.shortcuts import shortcuts_checked
from neuroscribe.describe import failure_summary
from neuroscribe.fanout import build_layout, chunk_groups
from neuroscribe.gpuhours import calibrated_total
from neuroscribe.plan import build_plan
from neuroscribe.report.figures import config_summary, plan_figures
from neuroscribe.resources import DEFAULT_LIMITS, rule_gpus, stage_gpus

# No `configfile:` here: a default config would be merged under every --configfile, filling
# keys the user left out with another run's models. Without --configfile this fails, saying so.
# Validates the config (defaults filled in) and inspects the models (cached), so a bad config
# or layer name fails here, before `snakemake -n` prints anything.
STARTED = time.time()
LAYOUT = build_layout(config)
RESULTS = LAYOUT.results
# every path under results/{run}/ (neuroscribe.paths)
PATHS = LAYOUT.paths
# what the config implies (llm model, where API calls run), derived once
DERIVED = derive(config)
METHODS = methods.enabled(config)
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


def result_settings(stage, wildcards):
    """Everything in the config that changes what a job of `stage` writes, as a param of its
    own: Snakemake reruns a job whose params changed, but only compares params that are not
    computed from input, output or threads (as each rule's `args` is)."""
    compute = {"device": config["device"], "dtype": config["dtype"]}
    w = wildcards
    if stage == "activations":  # a shard holds every layer of the target
        return as_json({"target": target_dict(w.model)} | compute)
    if stage == "merge":
        # the held-out share only when evaluation is on: other runs' params stay as they were
        held = {"holdout": holdout()} if holdout() else {}
        return as_json(
            {"target": layer_target(w.model, w.layer), "top_k": config["top_k"]} | held
        )
    if stage == "exemplars":
        chunk = LAYOUT.chunk(w.model, w.layer, w.chunk)
        crops = has_crops(w.model, w.layer)
        # crop_squash only when set and the layer has crops: params of runs (and layers)
        # it does not change stay as they were
        squash = config["crop_squash"] if crops else None
        return as_json(
            {
                "target": layer_target(w.model, w.layer),
                "neurons": list(chunk.neurons),
                "top_k": config["top_k"],
                "crops": crops,
                "crop_regions": config["crop_regions"],
            }
            | ({} if squash is None else {"crop_squash": squash})
            | compute
        )
    # a method's stage: what its method says changes it, on this layer's chunk
    method = methods.stage_owner(config, stage)
    return as_json(
        {
            "method": method.settings(stage, config) if method.settings else None,
            "target": layer_target(w.model, w.layer),
        }
        | compute
    )


def job_settings(job, model=None):
    """What changes the output of a method's job that is not per chunk or layer (once per run
    or per target): a change reruns it."""
    (owner,) = [m for m in METHODS if any(j.name == job for j in m.jobs)]
    found = {"method": owner.settings(job, config), "holdout": holdout()}
    if model is not None:
        found["target"] = target_dict(model)
    return as_json(found | {"device": config["device"], "dtype": config["dtype"]})


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
        "size": ds.image_size,
        "seed": ds.seed,
        "root": out_dir,
    }


def train_args(model, output):
    # the untrained architecture: the weights path is this rule's output
    target = LAYOUT.targets[model].to_dict() | {"weights": None}
    train = LAYOUT.targets[model].train
    return {"target": target, "out": output.weights, "metrics": output.metrics} | train


def layer_files(model):
    """The merged activation file of every described layer of a model."""
    return {
        layer: PATHS.layer_file(model, layer) for layer in LAYOUT.layer_sizes[model]
    }


def holdout():
    """The share of probe images held out from every method (0 with evaluation off, unless a
    method scores on held-out images)."""
    return methods.holdout(config)


def evaluation_outputs():
    """The held-out evaluation of every method, when it is on (on demo worlds it includes the
    world's ground truth)."""
    if not config["evaluation"]["enabled"]:
        return []
    return [
        PATHS.evaluation_split(),
        PATHS.evaluation_summary(),
        PATHS.evaluation_summary("csv"),
    ] + ([PATHS.evaluation_shortcuts()] if shortcuts_checked(config) else [])


def evaluated_layers():
    """(model, layer) of every described layer: each gets one evaluation job."""
    return [(m, layer) for m in LAYOUT.layer_sizes for layer in LAYOUT.layer_sizes[m]]


def simulated_worlds():
    """(dataset, folder) of each demo world, when the evaluation's simulator reads annotations."""
    backend = config["evaluation"]["simulator"]["backend"]
    return demo_worlds_if(backend == "annotations")


def classes_files():
    """Each target's class-name file from the config (None: read from the target)."""
    return {t["name"]: t.get("classes") for t in config["targets"]}


def trained_weights_of(wildcards):
    """The weights file a target needs from the workflow (none unless the workflow trains it)."""
    target = LAYOUT.targets[wildcards.model]
    return [target.weights] if target.train else []


def demo_world_pairs():
    """(dataset, folder) of each demo world the workflow renders."""
    return [
        [d.name, PATHS.demo_folder(d.name)] for d in LAYOUT.datasets if d.type == "demo"
    ]


def demo_dirs():
    return [folder for _, folder in demo_world_pairs()]


def shard_files(wildcards):
    return [PATHS.shard(wildcards.model, f"{s:04d}") for s in range(LAYOUT.n_shards)]


def activation_outputs():
    """Shards and merged layer files, so a deleted one is rebuilt on the next run."""
    return [
        f
        for model in LAYOUT.targets
        for f in [
            *shard_files(SimpleNamespace(model=model)),
            *layer_files(model).values(),
        ]
    ]


def chunk_outputs(stage):
    return [PATHS.chunk(stage, c.model, c.layer, c.name) for c in LAYOUT.all_chunks()]


def annotation_world_pairs():
    """(dataset, folder) of each annotated demo world, when the captioner reads annotations."""
    if config["captioner"]["backend"] != "annotations":
        return []
    return demo_world_pairs()


def demo_worlds_if(used):
    """(dataset, folder) of each demo world when `used` (a backend reads their annotations)."""
    return demo_world_pairs() if used else []


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


def on_head(stage):
    """A stage that calls the LLM API runs where snakemake runs when the compute nodes cannot
    reach the API (llm.run_on)."""
    return methods.all_stages(config)[stage].calls_llm_api and DERIVED.llm_on_head


def llm_api_slots(stage):
    """Caps API jobs running at once: `snakemake --resources llm_api=2`."""
    calls = methods.all_stages(config)[stage].calls_llm_api
    return int(calls and config["llm"]["backend"] == "openai")


def llm_args():
    """The `llm` section jobs get: model filled in, where they run left out."""
    return DERIVED.llm(config)


def chunk_group(stage):
    if stage != "exemplars" and on_head(stage):
        return None
    return chunk_groups(config)[stage]


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


def method_rules():
    """The rules file of each enabled method."""
    return [str(m.rules) for m in METHODS if m.rules is not None]


def stage_outputs(stage):
    """A method stage's tables: one per chunk, or one per layer for a per-layer stage."""
    if methods.all_stages(config)[stage].per_layer:
        return [
            PATHS.layer_table(stage, model, layer) for model, layer in LAYOUT.chunks
        ]
    return chunk_outputs(stage)


def method_outputs():
    """Outputs of the enabled methods' stages (and their other outputs), so a deleted one is
    recomputed."""
    found = [f for m in METHODS for s in m.stages for f in stage_outputs(s.name)]
    return found + [f for m in METHODS if m.outputs for f in m.outputs(LAYOUT, config)]


def stage_files():
    """Each enabled method's chunk (or layer) files, by stage, for the final table."""
    return {m.name: {s.name: stage_outputs(s.name) for s in m.stages} for m in METHODS}


def details_outputs():
    """Each method's details table (descriptions/{method}.parquet and .csv), if it has one."""
    return {
        m.name: {"parquet": PATHS.details(m.name), "csv": PATHS.details(m.name, "csv")}
        for m in METHODS
        if m.details_schema is not None
    }


def report_failures():
    """After a run that wrote the table: how many neurons each method described or failed."""
    table = PATHS.descriptions()
    if os.path.exists(table) and os.path.getmtime(table) >= STARTED:
        print(failure_summary(table, PATHS.logs), file=sys.stderr)


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
    return [PATHS.weights_record(wildcards.model)]


# Snakemake's `report()` flag; a line may not start with `report(` (read as the `report:`
# directive)
flagged = report


def report_plots(fmt):
    """A plot per evaluated layer, flagged for `snakemake --report`."""
    if not config["evaluation"]["enabled"]:
        return []
    caption = "../report/evaluation_plot.rst"
    plots = [
        (PATHS.report_plot(m, layer, fmt), {"model": m, "layer": layer, "format": fmt})
        for m, layer in evaluated_layers()
    ]
    return [
        flagged(p, caption=caption, category="Evaluation", labels=l) for p, l in plots
    ]


def report_outputs():
    """The report, when `report.enabled` (the default)."""
    return [PATHS.report_index] if config["report"]["enabled"] else []


def report_evaluation(wildcards=None):
    if not config["evaluation"]["enabled"]:
        return {}
    return {
        "neurons": PATHS.evaluation_neurons(),
        "summary": PATHS.evaluation_summary(),
    }


def dnd_steps():
    """Describe-and-Dissect's denoising steps: which calibrated preset the GPU-hours use."""
    return config["dnd"]["synthesizer"]["steps"] if "dnd" in config else None


def report_settings():
    """The config's part in the report: its summary, the report settings, the plan's figures
    (GPU-hours from plan.calibration alone) and the GPUs each rule asks for."""
    plan = build_plan(LAYOUT, config)
    gpus = rule_gpus(config)
    calibration = config["plan"]["calibration"]
    return {
        "summary": config_summary(config),
        "settings": config["report"],
        "plan": plan_figures(
            plan, calibrated_total(plan, gpus, calibration, dnd_steps())
        ),
        "gpus": gpus,
    }
