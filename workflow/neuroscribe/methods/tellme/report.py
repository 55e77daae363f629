"""TeLLMe's part of the report's neuron pages: each variant's explanation candidates with their
simulation scores, the simulation scatter (predicted against real activations), and the
neuron's strongest effective weights to the classes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from neuroscribe.methods import ReportInputs, ReportPart
from neuroscribe.report import svg
from neuroscribe.tables import read_tables

TOP_CLASSES, BOTTOM_CLASSES = 5, 3


def class_weights(files: list[str]) -> dict[int, list[svg.Bar]]:
    """Each neuron's strongest positive and negative class weights, as bars."""
    present = [f for f in files if Path(f).is_file()]
    if not present:
        return {}
    table = read_tables(present, columns=["neuron", "classes", "weights"])
    found = {}
    for row in table.itertuples(index=False):
        weights = np.asarray(row.weights, dtype=float)
        order = np.argsort(-weights)
        picked = [*order[:TOP_CLASSES], *order[::-1][:BOTTOM_CLASSES]]
        picked = list(dict.fromkeys(int(i) for i in picked))
        found[int(row.neuron)] = svg.bars(
            [row.classes[i] for i in picked], [weights[i] for i in picked]
        )
    return found


def _variant(row: dict[str, Any]) -> dict[str, Any]:
    validation, test = list(row["validation_r"]), list(row["test_r"])
    chosen = row["chosen"]
    return {
        "variant": row["variant"],
        "candidates": [
            {
                "text": str(text),
                "validation_r": validation[i] if i < len(validation) else None,
                "test_r": test[i] if i < len(test) else None,
                "chosen": pd.notna(chosen) and int(chosen) == i,
            }
            for i, text in enumerate(row["candidates"])
        ],
        "reason": row["score_reason"] if isinstance(row["score_reason"], str) else "",
        "scatter": svg.scatter(
            list(row["actual"]), list(row["predicted"]), "real activation", "predicted"
        ),
        "explainer": row["explainer"],
        "simulator": row["simulator"],
    }


def report(inputs: ReportInputs) -> ReportPart:
    weights = class_weights(inputs.files.get("tellme_weights", []))
    neurons: dict[int, dict[str, Any]] = {}
    details = inputs.details if inputs.details is not None else pd.DataFrame()
    for row in details.to_dict("records"):
        entry = neurons.setdefault(int(row["neuron"]), {"variants": [], "weights": []})
        entry["variants"].append(_variant(row))
    for neuron, bars in weights.items():
        neurons.setdefault(neuron, {"variants": [], "weights": []})["weights"] = bars
    return ReportPart(Path(__file__).with_name("report.html.j2"), neurons)
