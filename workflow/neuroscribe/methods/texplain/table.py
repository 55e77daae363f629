"""TExplain's rows of the final table (methods `texplain-exemplars` and `texplain-direction`)
and its details table (the words behind each label)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from neuroscribe.methods import KEY, MethodRows, RowInputs
from neuroscribe.tables import read_tables

OUTCOME = ["status", "error", "label", "labels", "score", "score_kind"]
LISTS = ["words", "zscores", "counts", "reference_counts", "examples"]


def method_name(mode: str) -> str:
    return f"texplain-{mode}"


def _lists(values: pd.Series) -> list[list]:
    return [list(v) if isinstance(v, list | np.ndarray) else [] for v in values]


def rows(inputs: RowInputs) -> MethodRows:
    """Per mode, each neuron's exemplars with its label; a neuron a mode does not cover (the
    direction mode of a layer that is not the translator's input) has no row of that mode."""
    chunks = read_tables(inputs.files["texplain"])
    parts = []
    for mode, found in chunks.groupby("mode", sort=True):
        part = inputs.exemplars.drop(columns=OUTCOME).merge(
            found[[*KEY, *OUTCOME, "models"]].rename(columns={"models": "used"}),
            on=KEY,
            how="inner",
        )
        part["labels"] = _lists(part["labels"])
        part["method"] = method_name(str(mode))
        part["models"] = [
            json.dumps({"target": inputs.models[row.model]} | json.loads(row.used))
            for row in part.itertuples()
        ]
        parts.append(part.drop(columns=["used"]))
    out = pd.concat(parts, ignore_index=True) if parts else inputs.exemplars.iloc[:0]
    details = chunks.drop(columns=[*OUTCOME, "models"]).sort_values([*KEY, "mode"], kind="stable")
    for column in LISTS:
        details[column] = _lists(details[column])
    return MethodRows(out, details.reset_index(drop=True))
