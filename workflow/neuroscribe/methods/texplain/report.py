"""TExplain's part of the report's neuron pages: per mode, the overrepresented words as bars
(log-odds z-scores, with their counts) and a few of the sampled sentences."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from neuroscribe.methods import ReportInputs, ReportPart
from neuroscribe.report import svg

WORDS_SHOWN = 10


def report(inputs: ReportInputs) -> ReportPart:
    neurons: dict[int, dict[str, Any]] = {}
    details = inputs.details if inputs.details is not None else pd.DataFrame()
    for row in details.to_dict("records"):
        words = list(row["words"])[:WORDS_SHOWN]
        notes = [
            f"{c} vs {r} in the reference"
            for c, r in zip(row["counts"], row["reference_counts"], strict=False)
        ]
        entry = neurons.setdefault(int(row["neuron"]), {"modes": []})
        entry["modes"].append(
            {
                "mode": row["mode"],
                "bars": svg.bars(words, list(row["zscores"])[:WORDS_SHOWN], notes),
                "images": row["images"],
                "sentences": row["sentences"],
                "examples": [str(s) for s in row["examples"]][: inputs.sentences],
            }
        )
    return ReportPart(Path(__file__).with_name("report.html.j2"), neurons)
