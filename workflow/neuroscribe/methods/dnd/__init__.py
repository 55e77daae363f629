"""Describe-and-Dissect (Bai et al., 2024): caption the exemplars, let an LLM propose candidate
concepts, draw each candidate with a text-to-image model, and keep the candidates whose images
the neuron fires on most (ranked, and weighted by their similarity to the exemplars).

Stages per chunk of neurons: captions -> concepts -> synthesis -> scores
(rules: workflow/rules/dnd.smk; its `dnd:` config section and its details table are described by
workflow/schemas/dnd.config.schema.yaml and dnd.details.schema.yaml).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from neuroscribe.config import ConfigError, check_model_folders, derive, result_settings_of
from neuroscribe.methods import Method, Stage
from neuroscribe.methods.dnd import plan, prompts, report, table

WORKFLOW = Path(__file__).resolve().parents[3]  # workflow/: its rules and schemas
STAGES = "neuroscribe.methods.dnd.stages"
# before methods had sections, these were keys of `llm`
LLM_KEYS = ("candidates", "prompt_mode", "neurons_per_request", "temperature", "max_tokens")
PROPOSAL_KEYS = (*LLM_KEYS, "prompts", "max_words", "background_variants")


def proposal(config: dict[str, Any]) -> dict[str, Any]:
    """The concept-proposal settings of the `dnd:` section."""
    return {k: config["dnd"][k] for k in PROPOSAL_KEYS}


def settings(stage: str, config: dict[str, Any]) -> Any:
    """What in the config changes what a stage writes (a change reruns the stage)."""
    if stage == "captions":
        return {"captioner": result_settings_of(config["captioner"])}
    if stage == "concepts":
        llm = result_settings_of(derive(config).llm(config))
        found = {"llm": llm, "proposal": proposal(config)}
        if config["dnd"]["prompt_mode"] == "reference":
            # an edited prompt file reruns the stage (its path alone would not)
            found["prompt_file"] = prompts.file_digest(config["dnd"]["prompts"])
        return found
    if stage == "synthesis":
        return {"synthesizer": result_settings_of(config["dnd"]["synthesizer"])}
    if stage == "scores":
        return {"scoring": config["dnd"]["scoring"], "top_k": config["top_k"]}
    raise KeyError(stage)


def check_config(config: dict[str, Any], check_paths: bool) -> None:
    """The prompt file is usable, and the synthesizer's and similarity model's folders exist (the
    shared roles are checked by the config itself)."""
    dnd = config["dnd"]
    if dnd["prompts"] is not None and dnd["prompt_mode"] != "reference":
        raise ConfigError(
            f"config key 'dnd.prompts' ({dnd['prompts']}) is used only by the reference prompt "
            "mode; set dnd.prompt_mode: reference, or remove dnd.prompts"
        )
    if dnd["prompt_mode"] == "reference" and check_paths:
        try:
            prompts.load_prompts(dnd["prompts"])
        except prompts.PromptFileError as err:
            raise ConfigError(f"config key 'dnd.prompts': {err}") from None
    similarity = dnd["scoring"]["similarity"]
    check_model_folders(
        {
            "dnd.synthesizer.model": (
                dnd["synthesizer"]["model"]
                if dnd["synthesizer"]["backend"] == "diffusers"
                else None
            ),
            "dnd.scoring.similarity.model": (
                similarity["model"] if similarity["backend"] == "clip" else None
            ),
        },
        check_paths,
    )


def models(config: dict[str, Any]) -> list[Any]:
    """The synthesizer and similarity models to download before a run."""
    from neuroscribe.prefetch import DIFFUSERS, HF, hub_or_local

    refs = []
    synthesizer, similarity = config["dnd"]["synthesizer"], config["dnd"]["scoring"]["similarity"]
    if synthesizer["backend"] == "diffusers":
        refs.append(hub_or_local("synthesizer", synthesizer["model"], DIFFUSERS))
    if similarity["backend"] == "clip":
        refs.append(hub_or_local("similarity", similarity["model"], HF))
    return refs


METHOD = Method(
    name="dnd",
    summary="Describe-and-Dissect: captions, LLM concepts, synthesised images, scoring",
    stages=(
        Stage(
            "captions",
            f"{STAGES}:caption_chunk",
            group="propose",
            resources={"mem_mb": 16000, "runtime": 60, "cpus": 4},
            uses_gpu=lambda c: c["captioner"]["backend"] != "annotations",
        ),
        Stage(
            "concepts",
            f"{STAGES}:concept_chunk",
            group="propose",
            resources={"mem_mb": 16000, "runtime": 60, "cpus": 2},
            # an API or `none` needs no GPU here
            uses_gpu=lambda c: c["llm"]["backend"] == "local",
            calls_llm_api=True,
        ),
        Stage(
            "synthesis",
            f"{STAGES}:synthesize_chunk",
            group="select",
            resources={"mem_mb": 16000, "runtime": 120, "cpus": 4},
            uses_gpu=lambda c: c["dnd"]["synthesizer"]["backend"] != "procedural",
        ),
        Stage(
            "scores",
            f"{STAGES}:score_chunk",
            group="select",
            resources={"mem_mb": 16000, "runtime": 60, "cpus": 4},
            uses_gpu=lambda c: True,
        ),
    ),
    roles=("captioner", "llm"),
    rules=WORKFLOW / "rules" / "dnd.smk",
    config_schema=WORKFLOW / "schemas" / "dnd.config.schema.yaml",
    details_schema=WORKFLOW / "schemas" / "dnd.details.schema.yaml",
    rows=table.rows,
    check_config=check_config,
    plan=plan.estimate,
    format_plan=plan.format_estimates,
    observe=plan.observe,
    settings=settings,
    models=models,
    moved_keys={
        **{f"llm.{key}": f"dnd.{key}" for key in LLM_KEYS},
        "synthesizer": "dnd.synthesizer",
        "scoring": "dnd.scoring",
    },
    report=report.report,
)
