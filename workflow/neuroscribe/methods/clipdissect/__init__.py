"""CLIP-Dissect (Oikarinen & Weng, ICLR 2023), the concept-set baseline: each neuron's label
is the concept of a fixed concept set that best explains its top probe images, by soft-WPMI over
an image-concept similarity matrix (CLIP image and text embeddings).

One stage, one job per (model, layer): `clipdissect`, from the layer's merged activations
(rules: workflow/rules/clipdissect.smk; its `clipdissect:` config section, its layer table and
its details table are described by workflow/schemas/clipdissect.config.schema.yaml,
clipdissect.schema.yaml and clipdissect.details.schema.yaml).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from neuroscribe.config import ConfigError, check_model_folders
from neuroscribe.methods import Method, Stage
from neuroscribe.methods.clipdissect import concepts, report, table

WORKFLOW = Path(__file__).resolve().parents[3]  # workflow/: its rules and schemas
# settings that are not results (how fast): changing them reruns nothing
PERFORMANCE_KEYS = {"batch_size", "text_batch_size", "memory_mb"}


def settings(stage: str, config: dict[str, Any]) -> Any:
    """What in the config changes what the stage writes (a change reruns it)."""
    if stage != "clipdissect":
        raise KeyError(stage)
    section = config["clipdissect"]
    found = {k: v for k, v in section.items() if k not in PERFORMANCE_KEYS}
    if section["backend"] != "clip":
        found.pop("model")
    if section["concepts"] != concepts.WORDFREQ:
        found.pop("wordfreq_words")
    if section["concepts"] not in (concepts.WORDFREQ, concepts.DEMO):
        # an edited concept file reruns the stage (its path alone would not)
        from neuroscribe.probe import file_digest

        path = Path(section["concepts"])
        found["concept_file"] = file_digest(str(path)) if path.is_file() else None
    return found


def check_config(config: dict[str, Any], check_paths: bool) -> None:
    """The concept file exists and has concepts; `annotations` needs a demo probe set; a CLIP
    model given as a folder exists."""
    section = config["clipdissect"]
    source = section["concepts"]
    if check_paths and source not in (concepts.WORDFREQ, concepts.DEMO):
        try:
            concepts.read_concept_file(source)
        except concepts.ConceptSetError as err:
            raise ConfigError(
                f"config key 'clipdissect.concepts': {err}; give a text file with one concept "
                f"per line, or `{concepts.WORDFREQ}` or `{concepts.DEMO}`"
            ) from None
    if section["backend"] == "annotations":
        plain = [d["name"] for d in config["probe"]["datasets"] if d["type"] != "demo"]
        if plain:
            raise ConfigError(
                "config key 'clipdissect.backend': `annotations` needs probe datasets that ship "
                f"annotations, and {plain} do not (only demo datasets do); use `clip`"
            )
    check_model_folders(
        {"clipdissect.model": section["model"] if section["backend"] == "clip" else None},
        check_paths,
    )


def models(config: dict[str, Any]) -> list[Any]:
    """The CLIP model to download before a run."""
    from neuroscribe.prefetch import HF, hub_or_local

    section = config["clipdissect"]
    if section["backend"] != "clip":
        return []
    return [hub_or_local("similarity", section["model"], HF)]


METHOD = Method(
    name="clipdissect",
    summary="CLIP-Dissect: the concept of a word list that best explains the top images",
    stages=(
        Stage(
            "clipdissect",
            "neuroscribe.methods.clipdissect.stages:describe_layer",
            group="select",
            resources={"mem_mb": 16000, "runtime": 60, "cpus": 4},
            uses_gpu=lambda c: c["clipdissect"]["backend"] == "clip",
            per_layer=True,
        ),
    ),
    rules=WORKFLOW / "rules" / "clipdissect.smk",
    config_schema=WORKFLOW / "schemas" / "clipdissect.config.schema.yaml",
    details_schema=WORKFLOW / "schemas" / "clipdissect.details.schema.yaml",
    rows=table.rows,
    check_config=check_config,
    settings=settings,
    models=models,
    report=report.report,
)
