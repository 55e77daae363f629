"""TeLLMe (Guertler & Luu, 2023): an LLM explains each neuron, an LLM simulator predicts the
neuron's activations from the explanation alone, and the explanation is scored by how well the
prediction correlates with the real activations (explain, simulate, score, as OpenAI's
automated-interpretability does for language models).

Two variants, rows of methods `tellme-activations` and `tellme-weights`: from captions of
images with the neuron's activations, and, for layers with a linear path to the classes, from
the neuron's effective weights to the classes. Unlike the reference code, the candidates are
scored on held-out images (and classes) only, chosen on a validation part and reported on a
test part, and each neuron costs one explainer request plus one simulation per candidate.

Stages: tellme_captions (per chunk), tellme_weights (per layer), tellme (per chunk); rules in
workflow/rules/tellme.smk; its `tellme:` config section and its tables are described by
workflow/schemas/tellme*.schema.yaml.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from neuroscribe.config import ConfigError, check_model_folders, derive, result_settings_of
from neuroscribe.methods import Method, Stage
from neuroscribe.methods.tellme import plan, prompts, report, table

if TYPE_CHECKING:
    from neuroscribe.fanout import Layout

WORKFLOW = Path(__file__).resolve().parents[3]  # workflow/: its rules and schemas
STAGES = "neuroscribe.methods.tellme.stages"
SET_KEYS = (
    "explain_top",
    "explain_random",
    "score_items",
    "score_top_fraction",
    "validation_fraction",
    "seed",
)
EXPLAIN_KEYS = (
    "candidates",
    "candidates_via",
    "neurons_per_request",
    "prompt_mode",
    "prompts",
    "temperature",
    "max_tokens",
)


def sets(config: dict[str, Any]) -> dict[str, Any]:
    """Which images each neuron is explained and scored on."""
    return {k: config["tellme"][k] for k in SET_KEYS}


def explaining(config: dict[str, Any]) -> dict[str, Any]:
    """The explainer's settings."""
    return {k: config["tellme"][k] for k in EXPLAIN_KEYS}


def weight_sets(config: dict[str, Any]) -> dict[str, Any]:
    """Which classes each neuron is explained and scored on (weight-based variant)."""
    weights = config["tellme"]["weights"]
    return {k: weights[k] for k in ("explain_classes", "score_classes")} | {
        k: config["tellme"][k] for k in ("score_top_fraction", "validation_fraction", "seed")
    }


def settings(stage: str, config: dict[str, Any]) -> Any:
    """What in the config changes what a stage writes (a change reruns the stage)."""
    if stage == "tellme_captions":
        return {"captioner": result_settings_of(config["captioner"]), "sets": sets(config)}
    if stage == "tellme_weights":
        weights = config["tellme"]["weights"]
        return {"layers": weights["layers"], "path": weights["path"]}
    if stage == "tellme":
        found = {
            "llm": result_settings_of(derive(config).llm(config)),
            "explain": explaining(config),
            "weight_sets": weight_sets(config),
            "simulator": config["tellme"]["simulator"],
        }
        if config["llm"]["backend"] != "none":
            # an edited prompt file reruns the stage (its path alone would not)
            found["prompt_file"] = prompts.file_digest(config["tellme"]["prompts"])
        return found
    raise KeyError(stage)


def check_config(config: dict[str, Any], check_paths: bool) -> None:
    """The simulator fits the llm backend and the probe set; the prompt file is usable."""
    tellme, backend = config["tellme"], config["llm"]["backend"]
    simulator = tellme["simulator"]["backend"]
    if simulator == "llm" and backend == "none":
        raise ConfigError(
            "config key 'tellme.simulator.backend': `llm` simulates with the `llm` role, and "
            "llm.backend is `none`; set llm.backend to openai or local, or use the clip (or, on "
            "the demo world, annotations) simulator"
        )
    if simulator == "annotations":
        plain = [d["name"] for d in config["probe"]["datasets"] if d["type"] != "demo"]
        if plain:
            raise ConfigError(
                "config key 'tellme.simulator.backend': `annotations` needs probe datasets that "
                f"ship annotations, and {plain} do not (only demo datasets do); use llm or clip"
            )
    same = tellme["candidates_via"] == "n" and tellme["temperature"] == 0
    if same and tellme["candidates"] > 1 and backend != "none":
        raise ConfigError(
            "config key 'tellme.temperature': 0 makes every one of the "
            f"{tellme['candidates']} candidates the same reply; raise it (the reference "
            "uses 1.0) or set tellme.candidates: 1"
        )
    if check_paths and backend != "none":
        try:
            prompts.load_prompts(tellme["prompts"])
        except prompts.PromptFileError as err:
            raise ConfigError(f"config key 'tellme.prompts': {err}") from None
    check_model_folders(
        {"tellme.simulator.model": tellme["simulator"]["model"] if simulator == "clip" else None},
        check_paths,
    )


def weight_layers(layout: Layout, config: dict[str, Any]) -> set[tuple[str, str]]:
    """The described (model, layer) pairs explained from their weights too: those of
    `tellme.weights.layers`, each checked for a linear path to the classes (found, or named in
    `tellme.weights.path`) when the workflow is parsed (cached). A listed name that no target
    has fails; one a target has but does not describe is left out."""
    from neuroscribe.classweights import check_weight_path
    from neuroscribe.inspection import inspect_target

    weights = config["tellme"]["weights"]
    for name in weights["path"]:
        if name not in weights["layers"]:
            raise ConfigError(
                f"config key 'tellme.weights.path': {name!r} is not in tellme.weights.layers"
            )
    found: set[tuple[str, str]] = set()
    known: set[str] = set()
    for target in layout.targets.values():
        known |= set(inspect_target(target, layout.paths.inspect))
        for layer in layout.layer_sizes[target.name]:
            if layer in weights["layers"]:
                check_weight_path(target, layer, weights["path"].get(layer), layout.paths.inspect)
                found.add((target.name, layer))
    unknown = [name for name in weights["layers"] if name not in known]
    if unknown:
        raise ConfigError(
            f"config key 'tellme.weights.layers': no target has a layer {unknown[0]!r}; list "
            "described layers with a linear path to the classes (e.g. a ResNet's layer4)"
        )
    return found


def check_layout(layout: Layout, config: dict[str, Any]) -> None:
    """The weight-based variant's layers are usable (see `weight_layers`)."""
    weight_layers(layout, config)


def models(config: dict[str, Any]) -> list[Any]:
    """The CLIP model of a clip simulator, to download before a run."""
    from neuroscribe.prefetch import HF, hub_or_local

    simulator = config["tellme"]["simulator"]
    if simulator["backend"] != "clip":
        return []
    return [hub_or_local("simulator", simulator["model"], HF)]


def _captioner_gpu(config: dict[str, Any]) -> bool:
    return config["captioner"]["backend"] != "annotations"


def _llm_gpu(config: dict[str, Any]) -> bool:
    return config["llm"]["backend"] == "local" or config["tellme"]["simulator"]["backend"] == "clip"


METHOD = Method(
    name="tellme",
    summary="TeLLMe: LLM explanations from captions and from weights, scored by simulation",
    stages=(
        Stage(
            "tellme_captions",
            f"{STAGES}:caption_chunk",
            group="propose",
            resources={"mem_mb": 16000, "runtime": 60, "cpus": 4},
            uses_gpu=_captioner_gpu,
        ),
        Stage(
            "tellme_weights",
            f"{STAGES}:weights_layer",
            group="select",
            resources={"mem_mb": 8000, "runtime": 30, "cpus": 2},
            per_layer=True,
        ),
        Stage(
            "tellme",
            f"{STAGES}:explain_chunk",
            group="select",
            resources={"mem_mb": 8000, "runtime": 60, "cpus": 2},
            uses_gpu=_llm_gpu,
            calls_llm_api=True,
        ),
    ),
    roles=("captioner", "llm"),
    rules=WORKFLOW / "rules" / "tellme.smk",
    config_schema=WORKFLOW / "schemas" / "tellme.config.schema.yaml",
    details_schema=WORKFLOW / "schemas" / "tellme.details.schema.yaml",
    rows=table.rows,
    check_config=check_config,
    check_layout=check_layout,
    plan=plan.estimate,
    format_plan=plan.format_estimates,
    settings=settings,
    models=models,
    needs_holdout=True,
    report=report.report,
)
