"""The CLIP-Dissect baseline's part of the report's neuron pages: its best concepts from the
concept set, with their soft-WPMI scores."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from neuroscribe.methods import ReportInputs, ReportPart

CONCEPTS_SHOWN = 10


def report(inputs: ReportInputs) -> ReportPart:
    neurons: dict[int, dict[str, Any]] = {}
    details = inputs.details if inputs.details is not None else pd.DataFrame()
    for row in details.to_dict("records"):
        concepts = list(row["concepts"])[:CONCEPTS_SHOWN]
        neurons[int(row["neuron"])] = {
            "concepts": list(zip(concepts, list(row["concept_scores"]), strict=False)),
            "concept_set": row["concept_set"],
            "images": row["images"],
        }
    return ReportPart(Path(__file__).with_name("report.html.j2"), neurons)
