"""The evaluation's settings checked when the workflow is parsed, before any job runs, and what
of them a layer job's scores depend on."""

from __future__ import annotations

from typing import Any

from neuroscribe.config import ConfigError, result_settings_of
from neuroscribe.evaluation.classes import check_class_files
from neuroscribe.evaluation.external import check_external


def check_evaluation(
    config: dict[str, Any],
    output_layers: dict[str, str | None],
    layer_sizes: dict[str, dict[str, int]],
) -> None:
    """Class files, external tables, and a simulator that can read the probe set (and, for llm,
    has a chat model)."""
    simulator = config["evaluation"]["simulator"]["backend"]
    other = [d["name"] for d in config["probe"]["datasets"] if d["type"] != "demo"]
    if simulator == "annotations" and other:
        raise ConfigError(
            "config key 'evaluation.simulator.backend': annotations reads the demo world's "
            f"annotations, but the probe set has other datasets ({', '.join(other)}); use "
            "backend: clip"
        )
    if simulator == "llm" and config["llm"]["backend"] == "none":
        raise ConfigError(
            "config key 'evaluation.simulator.backend': llm simulates with the `llm` role, and "
            "llm.backend is none; set llm.backend to openai or local, or use the clip (or, on "
            "the demo world, annotations) simulator"
        )
    if simulator == "llm" and config["captioner"]["backend"] == "annotations" and other:
        raise ConfigError(
            "config key 'captioner.backend': the llm simulator reads the held-out images' "
            "captions, and `annotations` has captions only for demo datasets, not for "
            f"{', '.join(other)}; use `blip`"
        )
    check_class_files(config, output_layers, layer_sizes)
    check_external(config)


def llm_settings(captioner: dict[str, Any], llm: dict[str, Any]) -> dict[str, Any]:
    """What the llm simulator's scores depend on in the `captioner` and `llm` sections."""
    return {"captioner": result_settings_of(captioner), "llm": result_settings_of(llm)}


def layer_job_settings(config: dict[str, Any], llm: dict[str, Any]) -> dict[str, Any]:
    """The settings a layer job's scores depend on (a change reruns it): the `evaluation`
    section, the simulator's llm-only key left out unless it is llm, and then the llm (`llm`:
    the section jobs get) and captioner settings too; runs of the other simulators keep their
    params."""
    evaluation = dict(config["evaluation"])
    simulator = evaluation["simulator"]
    if simulator["backend"] != "llm":
        evaluation["simulator"] = {k: v for k, v in simulator.items() if k != "logprobs"}
        return {"evaluation": evaluation}
    return {"evaluation": evaluation} | llm_settings(config["captioner"], llm)
