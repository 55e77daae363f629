"""A method registered from outside neuroscribe, as a lab would add its own: each neuron's label
is the caption most frequent among its exemplars.

It is this folder and nothing else: its stage (below), its rules file (rules.smk), its config
section (config.schema.yaml), its details table (details.schema.yaml), and one entry point:

    [project.entry-points."neuroscribe.methods"]
    frequent = "frequent_caption:METHOD"
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd

from neuroscribe import backends
from neuroscribe.methods import KEY, Method, MethodRows, RowInputs, Stage
from neuroscribe.tables import read_tables

HERE = Path(__file__).resolve().parent


def label_chunk(
    exemplars: str,
    manifest: str,
    out: str,
    captioner: dict[str, Any],
    worlds: list[list[str]],
    cache: str,
    min_count: int,
    device: str = "auto",
    dtype: str = "auto",
) -> None:
    """Caption each exemplar (through the run's caption cache) and keep the most frequent."""
    table = pd.read_parquet(exemplars)
    table["caption"], _ = backends.caption_exemplars(
        table, manifest, captioner, worlds, cache, device, dtype
    )
    rows = []
    for key, group in table.groupby(KEY, sort=True):
        caption, count = Counter(group["caption"]).most_common(1)[0]
        ok = count >= min_count
        rows.append(
            dict(zip(KEY, key, strict=True))
            | {
                "caption": caption if ok else None,
                "count": count,
                "error": None if ok else f"no caption is shared by {min_count} exemplars",
            }
        )
    pd.DataFrame(rows).to_parquet(out)


def rows(inputs: RowInputs) -> MethodRows:
    labels = read_tables(inputs.files["frequent_label"])
    out = inputs.exemplars.drop(columns=["label", "labels", "status", "error"]).merge(
        labels, on=KEY
    )
    labelled = out["caption"].notna()
    out["label"] = out["caption"].where(labelled, None)
    out["labels"] = [[c] if ok else [] for c, ok in zip(out["caption"], labelled, strict=True)]
    out["status"] = labelled.map({True: "ok", False: "failed"})
    out["score"] = out["count"].astype(float)
    out["score_kind"] = "exemplars sharing the caption"
    details = out[[*KEY, "count"]]
    return MethodRows(out.drop(columns=["caption", "count"]).assign(method="frequent"), details)


METHOD = Method(
    name="frequent",
    summary="the caption most frequent among the exemplars",
    stages=(
        Stage(
            "frequent_label",
            "frequent_caption:label_chunk",
            group="propose",
            resources={"mem_mb": 1000, "runtime": 10, "cpus": 1},
        ),
    ),
    roles=("captioner",),
    rules=HERE / "rules.smk",
    config_schema=HERE / "config.schema.yaml",
    details_schema=HERE / "details.schema.yaml",
    rows=rows,
)
