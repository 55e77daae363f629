"""The evaluation's settings checked when the workflow is parsed, before any job runs."""

from __future__ import annotations

from typing import Any

from neuroscribe.config import ConfigError
from neuroscribe.evaluation.classes import check_class_files
from neuroscribe.evaluation.external import check_external


def check_evaluation(
    config: dict[str, Any],
    output_layers: dict[str, str | None],
    layer_sizes: dict[str, dict[str, int]],
) -> None:
    """Class files, external tables, and a simulator that can read the probe set."""
    simulator = config["evaluation"]["simulator"]["backend"]
    other = [d["name"] for d in config["probe"]["datasets"] if d["type"] != "demo"]
    if simulator == "annotations" and other:
        raise ConfigError(
            "config key 'evaluation.simulator.backend': annotations reads the demo world's "
            f"annotations, but the probe set has other datasets ({', '.join(other)}); use "
            "backend: clip"
        )
    check_class_files(config, output_layers, layer_sizes)
    check_external(config)
