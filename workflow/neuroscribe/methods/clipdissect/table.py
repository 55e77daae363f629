"""CLIP-Dissect's rows of the final table, and its details table (the best concepts)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from neuroscribe.methods import KEY, MethodRows, RowInputs
from neuroscribe.tables import read_tables

OUTCOME = ["status", "error", "label", "labels", "score", "score_kind"]
DETAILS = ["concepts", "concept_scores", "concept_set", "images"]


def _lists(values: pd.Series) -> list[list]:
    return [list(v) if isinstance(v, list | np.ndarray) else [] for v in values]


def rows(inputs: RowInputs) -> MethodRows:
    """Each neuron's exemplars with its CLIP-Dissect label; its best concepts and their scores
    in the details table."""
    layers = read_tables(inputs.files["clipdissect"])
    out = inputs.exemplars.drop(columns=OUTCOME).merge(
        layers[[*KEY, *OUTCOME, "similarity_model"]], on=KEY, how="left"
    )
    out["labels"] = _lists(out["labels"])
    out["method"] = "clipdissect"
    out["models"] = [
        json.dumps({"target": inputs.models[model]} | {"similarity": similarity})
        for model, similarity in zip(out["model"], out["similarity_model"], strict=True)
    ]
    out = out.drop(columns="similarity_model")
    details = out[KEY].merge(layers[[*KEY, *DETAILS]], on=KEY, how="left")
    for column in ("concepts", "concept_scores"):
        details[column] = _lists(details[column])
    return MethodRows(out, details)
