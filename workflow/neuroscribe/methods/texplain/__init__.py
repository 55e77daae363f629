"""TExplain ("Learned Visual Features to Textual Explanations", arXiv 2309.00733): a small
translator maps the frozen target's features at one layer into the prefix embeddings of a
frozen causal language model, trained on captions of the explain split; many sentences are
sampled per image, and the words they overuse describe neurons and classes.

Rows of the final table: `texplain-exemplars` (the words overrepresented in the sentences of a
neuron's top exemplars against random explain-split images, weighted log-odds with an
informative Dirichlet prior) and, for the translator's input layer, `texplain-direction` (the
words a step along the neuron's own unit adds to the mean feature's sentences). Per class, the
words of the images the target predicts as that class (`texplain/classes.parquet`).

Jobs: texplain_lm (the demo's tiny LM), texplain_captions (once), texplain_features and
texplain_train and texplain_reference (per target), texplain (per chunk); rules in
workflow/rules/texplain.smk.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neuroscribe.config import ConfigError, check_model_folders, result_settings_of
from neuroscribe.methods import Method, Stage
from neuroscribe.methods.texplain import report, table

if TYPE_CHECKING:
    from neuroscribe.config import TargetSpec
    from neuroscribe.fanout import Layout

WORKFLOW = Path(__file__).resolve().parents[3]  # workflow/: its rules and schemas
STAGES = "neuroscribe.methods.texplain.stages"
DEMO_LM = "demo"
EXEMPLARS, DIRECTION = "exemplars", "direction"


def lm_model(config: dict[str, Any], demo_folder: str) -> str:
    """The LM the translator writes into: the configured one, or the demo LM's folder."""
    model = config["texplain"]["lm"]["model"]
    return demo_folder if model == DEMO_LM else model


def words_settings(config: dict[str, Any]) -> dict[str, Any]:
    """How sentences become words and labels."""
    tx = config["texplain"]
    return {
        k: tx[k]
        for k in ("reference_images", "class_images", "prior_size", "top_words", "label_words")
    }


def settings(stage: str, config: dict[str, Any]) -> Any:
    """What in the config changes what a job writes (a change reruns it)."""
    tx = config["texplain"]
    sampling = {k: v for k, v in tx["sampling"].items() if k != "batch_rows"}
    found: dict[str, Any] = {"lm": tx["lm"]}
    if stage == "texplain_lm":
        return found
    if stage in ("texplain_captions", "texplain_caption_file"):
        return {"captions": caption_source(config)}
    if stage in ("texplain_features", "texplain_train_features"):
        return {"input_layer": tx["input_layer"]}
    found |= {"captions": caption_source(config), "input_layer": tx["input_layer"]}
    found |= {"translator": tx["translator"], "train": tx["train"]}
    if stage == "texplain_train":
        return found
    found |= {"sampling": sampling, "words": words_settings(config)}
    if stage == "texplain_reference":
        return found
    if stage == "texplain":
        llm = result_settings_of(config["llm"]) if config["llm"]["backend"] != "none" else None
        return found | {"direction": tx["direction"], "llm": llm}
    raise KeyError(stage)


def caption_source(config: dict[str, Any]) -> dict[str, Any]:
    """Where the training captions come from: the captioner role's settings, or the caption
    file's settings and its content's digest (an edited file retrains)."""
    named = config["texplain"]["captions"]
    if named is None:
        return {"captioner": result_settings_of(config["captioner"])}
    path = Path(named["path"])
    if not path.is_file():
        return named | {"digest": None}
    stat = path.stat()
    return named | {"digest": _digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns)}


@functools.lru_cache(maxsize=8)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    """A file's digest, once per parse (every TExplain job's settings name it); size and
    mtime are in the key so an edited file is read again."""
    from neuroscribe.probe import file_digest

    return file_digest(path)


def check_config(config: dict[str, Any], check_paths: bool) -> None:
    """The LM folder exists (`demo` is made by the workflow); a caption file exists and has
    its columns."""
    model = config["texplain"]["lm"]["model"]
    if model != DEMO_LM:
        check_model_folders({"texplain.lm.model": model}, check_paths)
    if config["texplain"]["captions"] is not None:
        from neuroscribe.methods.texplain.dataset import check_caption_file

        check_caption_file(config["texplain"]["captions"], check_paths)


def _top_level_candidates(modules: dict[str, dict[str, Any]], output: str | None) -> list[str]:
    """Top-level modules that output a map or a token sequence (not a pooled vector), last
    first: where a classifier's head reads its features."""
    found = []
    for name, info in modules.items():
        shape = info.get("shape") or []
        if "." in name or info.get("calls") != 1 or len(shape) < 2:
            continue
        if output and (output == name or output.startswith(name + ".")):
            continue
        if all(d == 1 for d in shape[1:]):  # already pooled
            continue
        found.append(name)
    return found[::-1]


def input_layer(target: TargetSpec, config: dict[str, Any], inspect_dir: str) -> str:
    """The translator's input layer of a target: `texplain.input_layer`, checked, or the layer
    feeding the classifier head (the last top-level map with a linear path to the classes)."""
    from neuroscribe.classweights import WeightPathError, check_weight_path
    from neuroscribe.inspection import inspect_target, output_layer
    from neuroscribe.layers import closest_first

    modules = inspect_target(target, inspect_dir)
    named = config["texplain"]["input_layer"]
    if named is not None:
        if named not in modules:
            near = ", ".join(closest_first(named, list(modules))[:8])
            raise ConfigError(
                f"config key 'texplain.input_layer': target {target.name!r} has no layer "
                f"{named!r}; the closest are: {near}"
            )
        return named
    for name in _top_level_candidates(modules, output_layer(modules)):
        try:
            check_weight_path(target, name, None, inspect_dir)
        except WeightPathError:
            continue
        return name
    raise ConfigError(
        f"config key 'texplain.input_layer': no layer of target {target.name!r} feeds its "
        "classifier head through pooling and Linear layers alone; name the layer the translator "
        "reads (e.g. a ResNet's layer4)"
    )


def input_layers(layout: Layout, config: dict[str, Any]) -> dict[str, str]:
    """Each target's translator input layer (see `input_layer`)."""
    return {
        name: input_layer(target, config, layout.paths.inspect)
        for name, target in layout.targets.items()
    }


def direction_layers(layout: Layout, config: dict[str, Any]) -> set[tuple[str, str]]:
    """The described (model, layer) pairs explained in direction mode: those listed in
    `texplain.direction.layers`, each required to be its target's translator input layer. A
    listed name that no target has fails; one a target has but does not describe is left out."""
    listed = config["texplain"]["direction"]["layers"]
    if not listed:
        return set()
    inputs = input_layers(layout, config)
    found: set[tuple[str, str]] = set()
    for model, layers in layout.layer_sizes.items():
        for layer in layers:
            if layer not in listed:
                continue
            if layer != inputs[model]:
                raise ConfigError(
                    f"config key 'texplain.direction.layers': {layer!r} is not the translator's "
                    f"input layer of target {model!r} ({inputs[model]!r}); the direction mode "
                    "steps along a unit of the features the translator reads, so it describes "
                    f"that layer only: list {inputs[model]!r}, or set texplain.input_layer"
                )
            found.add((model, layer))
    from neuroscribe.inspection import inspect_target

    known = {n for t in layout.targets.values() for n in inspect_target(t, layout.paths.inspect)}
    unknown = [name for name in listed if name not in known]
    if unknown:
        raise ConfigError(
            f"config key 'texplain.direction.layers': no target has a layer {unknown[0]!r}; "
            f"list the translator's input layer ({', '.join(sorted(set(inputs.values())))})"
        )
    return found


def check_layout(layout: Layout, config: dict[str, Any]) -> None:
    """Every target has an input layer; direction layers are input layers."""
    input_layers(layout, config)
    direction_layers(layout, config)


def input_spec(target: TargetSpec, layer: str) -> dict[str, Any]:
    """The input layer as the activation machinery hooks it: all its units, pooled as the layer
    is when described, else averaged over space (what a classifier head reads)."""
    for spec in target.layers:
        if spec.name == layer:
            return {"name": layer, "neurons": "all", "pooling": spec.pooling, "tokens": spec.tokens}
    tokens = target.layers[0].tokens if target.layers else "cls"
    return {"name": layer, "neurons": "all", "pooling": "avg", "tokens": tokens}


def outputs(layout: Layout, config: dict[str, Any]) -> list[str]:
    """The per-class table and each target's translator (the loss curve with it)."""
    root = layout.paths.root
    found = [f"{root}/texplain/classes.parquet"]
    for model in layout.targets:
        found += [f"{root}/texplain_models/{model}/{f}" for f in ("translator.pt", "loss.png")]
    return found


def models(config: dict[str, Any]) -> list[Any]:
    """The LM, to download before a run (none for the demo's own)."""
    from neuroscribe.prefetch import HF, hub_or_local

    model = config["texplain"]["lm"]["model"]
    return [] if model == DEMO_LM else [hub_or_local("texplain.lm", model, HF)]


def _uses_gpu(config: dict[str, Any]) -> bool:
    return True


def _never_gpu(config: dict[str, Any]) -> bool:
    return False  # the demo LM is a few layers wide: the CPU trains it in seconds


def _captioner_gpu(config: dict[str, Any]) -> bool:
    return config["captioner"]["backend"] != "annotations"


def plan(layout: Layout, config: dict[str, Any]) -> dict[str, Any]:
    """Sentences to sample: each target's images at most once (cached per image: its
    exemplars, reference and class images all lie in the explain split), plus one step per
    direction-mode neuron and the mean; and the per-run and per-target jobs."""
    from neuroscribe.methods import holdout
    from neuroscribe.plan import split_sizes

    tx = config["texplain"]
    per_image = tx["sampling"]["sentences"]
    neurons = sum(len(c.neurons) for c in layout.all_chunks())
    direction = [
        size
        for (model, layer), size in _sizes(layout).items()
        if layer in tx["direction"]["layers"]
    ]
    split = split_sizes(layout, holdout(config))
    explain = split["seen_by_methods"] if split else layout.n_candidates
    images = len(layout.targets) * explain + sum(direction) + len(direction)
    targets, named = len(layout.targets), tx["captions"] is not None
    return {
        "estimates": {
            "sentences": per_image * images,
            "translators": targets,
            "llm_requests": neurons if config["llm"]["backend"] != "none" else 0,
        },
        "layers": {},
        "jobs": {
            "texplain_lm": int(tx["lm"]["model"] == DEMO_LM),
            "texplain_captions": int(not named),
            "texplain_caption_file": int(named),
            "texplain_features": targets,
            "texplain_train_features": targets if named else 0,
            "texplain_train": targets,
            "texplain_reference": targets,
            "texplain_classes": 1,
        },
    }


def _sizes(layout: Layout) -> dict[tuple[str, str], int]:
    return {
        (m, layer): size
        for m, layers in layout.layer_sizes.items()
        for layer, size in layers.items()
    }


def format_plan(estimates: dict[str, Any]) -> list[str]:
    """The plan summary's lines for TExplain."""
    return [
        f"  translators to train: {estimates['translators']} (one per target)",
        f"  sentences to sample: ≤{estimates['sentences']} (each image's once per run)",
        f"  label requests: {estimates['llm_requests']}",
    ]


METHOD = Method(
    name="texplain",
    summary="TExplain: words of sentences sampled through a trained feature-to-LM translator",
    stages=(
        Stage(
            "texplain",
            f"{STAGES}:explain_chunk",
            group="select",
            resources={"mem_mb": 16000, "runtime": 60, "cpus": 2},
            uses_gpu=_uses_gpu,
            calls_llm_api=True,
        ),
    ),
    roles=("captioner", "llm"),
    rules=WORKFLOW / "rules" / "texplain.smk",
    config_schema=WORKFLOW / "schemas" / "texplain.config.schema.yaml",
    details_schema=WORKFLOW / "schemas" / "texplain.details.schema.yaml",
    rows=table.rows,
    check_config=check_config,
    check_layout=check_layout,
    plan=plan,
    format_plan=format_plan,
    settings=settings,
    models=models,
    jobs=(
        Stage(
            "texplain_lm",
            f"{STAGES}:pretrain_demo_lm",
            "",
            {"mem_mb": 4000, "runtime": 30, "cpus": 2},
            _never_gpu,
        ),
        Stage(
            "texplain_captions",
            f"{STAGES}:caption_explain_split",
            "",
            {"mem_mb": 16000, "runtime": 120, "cpus": 4},
            _captioner_gpu,
        ),
        Stage(
            "texplain_caption_file",
            "neuroscribe.methods.texplain.dataset:caption_dataset",
            "",
            {"mem_mb": 4000, "runtime": 60, "cpus": 4},
            _never_gpu,
        ),
        Stage(
            "texplain_train_features",
            f"{STAGES}:extract_features",
            "",
            {"mem_mb": 16000, "runtime": 120, "cpus": 4},
            _uses_gpu,
        ),
        Stage(
            "texplain_features",
            f"{STAGES}:extract_features",
            "",
            {"mem_mb": 16000, "runtime": 60, "cpus": 4},
            _uses_gpu,
        ),
        Stage(
            "texplain_train",
            f"{STAGES}:train",
            "",
            {"mem_mb": 32000, "runtime": 240, "cpus": 4},
            _uses_gpu,
        ),
        Stage(
            "texplain_reference",
            f"{STAGES}:reference_and_classes",
            "",
            {"mem_mb": 16000, "runtime": 120, "cpus": 2},
            _uses_gpu,
        ),
        Stage(
            "texplain_classes",
            f"{STAGES}:classes_table",
            "",
            {"mem_mb": 2000, "runtime": 10, "cpus": 1},
        ),
    ),
    outputs=outputs,
    needs_holdout=False,
    report=report.report,
)
