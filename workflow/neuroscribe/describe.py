"""The final table: gather every chunk's results into one row per (model, layer, neuron, method)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

from neuroscribe.tables import write_csv, write_table

log = logging.getLogger(__name__)


def topk_rows(exemplars: pd.DataFrame, models: dict[str, str]) -> pd.DataFrame:
    """Rows of method `topk`: the neuron's exemplars, no label."""
    ordered = exemplars.sort_values(["model", "layer", "neuron", "rank"])
    grouped = ordered.groupby(["model", "layer", "neuron"], sort=False)
    out = grouped.agg(
        exemplar_ids=("image_id", list),
        exemplar_boxes=(
            "box",
            lambda boxes: [None if b is None else [int(v) for v in b] for b in boxes],
        ),
        exemplar_activations=("activation", list),
    ).reset_index()
    out["method"] = "topk"
    out["label"] = None
    out["labels"] = [[] for _ in range(len(out))]
    out["score"] = None
    out["score_kind"] = None
    out["models"] = [json.dumps({"target": models[m]}) for m in out["model"]]
    return out


def write_descriptions(
    exemplar_files: list[str | Path],
    models: dict[str, str],
    methods: list[str],
    out_parquet: str | Path,
    out_csv: str | Path,
) -> None:
    """Merge per-chunk outputs into the description table, checked against its schema.

    `models` maps each target name to the id of the model used (spec@weights).
    """
    exemplars = pd.concat([pd.read_parquet(p) for p in exemplar_files], ignore_index=True)
    parts = []
    if "topk" in methods:
        parts.append(topk_rows(exemplars, models))
    table = pd.concat(parts, ignore_index=True).sort_values(
        ["model", "layer", "neuron", "method"], kind="stable"
    )
    arrow = write_table(table, out_parquet, "descriptions")
    write_csv(arrow, out_csv)
    log.info("descriptions: %d rows from %d chunk files", len(table), len(exemplar_files))
