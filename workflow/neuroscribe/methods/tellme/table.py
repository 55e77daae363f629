"""TeLLMe's rows of the final table (methods `tellme-activations` and `tellme-weights`) and its
details table (every candidate, its simulation scores and the audit trail)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from neuroscribe.methods import KEY, MethodRows, RowInputs
from neuroscribe.tables import read_tables

OUTCOME = ["status", "error", "label", "labels", "score", "score_kind"]
LISTS = [
    "candidates",
    "validation_r",
    "test_r",
    "scored_items",
    "scored_parts",
    "actual",
    "predicted",
    "raw_replies",
    "simulation_replies",
]


def method_name(variant: str) -> str:
    return f"tellme-{variant}"


def _lists(values: pd.Series) -> list[list]:
    return [list(v) if isinstance(v, list | np.ndarray) else [] for v in values]


def rows(inputs: RowInputs) -> MethodRows:
    """Per variant, each neuron's exemplars with its chosen explanation; a neuron the variant
    does not cover (weights of a layer without them) has no row of that variant."""
    chunks = read_tables(inputs.files["tellme"])
    captioners = (
        read_tables(inputs.files["tellme_captions"], [*KEY, "captioner"])
        .drop_duplicates(KEY)
        .set_index(KEY)["captioner"]
    )
    parts = []
    for variant, found in chunks.groupby("variant", sort=True):
        part = inputs.exemplars.drop(columns=OUTCOME).merge(
            found[[*KEY, *OUTCOME, "explainer", "simulator"]], on=KEY, how="inner"
        )
        part["labels"] = _lists(part["labels"])
        part["method"] = method_name(str(variant))
        part["models"] = [
            json.dumps(
                {"target": inputs.models[row.model]}
                | (
                    {"captioner": captioners[(row.model, row.layer, row.neuron)]}
                    if variant == "activations"
                    else {}
                )
                | {"llm": row.explainer, "simulator": row.simulator}
            )
            for row in part.itertuples()
        ]
        parts.append(part.drop(columns=["explainer", "simulator"]))
    out = pd.concat(parts, ignore_index=True) if parts else inputs.exemplars.iloc[:0]
    details = chunks.drop(columns=OUTCOME).sort_values([*KEY, "variant"], kind="stable")
    for column in LISTS:
        details[column] = _lists(details[column])
    return MethodRows(out, details.reset_index(drop=True))
