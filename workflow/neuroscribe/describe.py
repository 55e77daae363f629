"""The final table: gather every chunk's results into one row per (model, layer, neuron, method)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

from neuroscribe.methods import KEY, RowInputs
from neuroscribe.tables import read_tables, write_csv, write_table

log = logging.getLogger(__name__)


def exemplar_rows(exemplars: pd.DataFrame, models: dict[str, str]) -> pd.DataFrame:
    """One row per neuron with its exemplars and the columns every method fills, still empty
    (no label, status ok): what each method's rows start from."""
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
    out["method"] = None
    out["status"] = "ok"
    out["error"] = None
    out["label"] = None
    out["labels"] = [[] for _ in range(len(out))]
    out["score"] = None
    out["score_kind"] = None
    out["models"] = [json.dumps({"target": models[m]}) for m in out["model"]]
    return out


def write_descriptions(
    exemplars: list[str],
    stage_files: dict[str, dict[str, list[str]]],
    models: dict[str, str],
    methods: list[str],
    parquet: str,
    csv: str,
    details: dict[str, dict[str, str]],
) -> None:
    """Merge per-chunk outputs into the description table (one row per neuron and method, the
    columns every method fills), and each method's details into its own table.

    `stage_files` maps each method to its stages' chunk files, `details` each method with a
    details table to its {"parquet", "csv"} paths. `models` maps each target name to the id of
    the model used (spec@weights); the other models are named as the chunk tables recorded
    them, so the table names only what ran.
    """
    from neuroscribe import methods as registry

    shared = exemplar_rows(read_tables(exemplars), models)
    parts = []
    for name in methods:
        method = registry.get(name)
        result = method.rows(RowInputs(shared, stage_files.get(name, {}), models))
        parts.append(result.rows)
        if (result.details is None) != (name not in details):
            raise ValueError(
                f"method {name!r}: its rows come with{'out' if result.details is None else ''} "
                "a details table, but it declares the opposite (Method.details_schema)"
            )
        if result.details is not None:
            ordered = result.details.sort_values(KEY, kind="stable")
            arrow = write_table(ordered, details[name]["parquet"], method.details_schema)
            write_csv(arrow, details[name]["csv"])
    table = pd.concat(parts, ignore_index=True).sort_values(
        ["model", "layer", "neuron", "method"], kind="stable"
    )
    arrow = write_table(table, parquet, "descriptions")
    write_csv(arrow, csv)
    log.info("descriptions: %d rows from %d chunk files", len(table), len(exemplars))


def failure_summary(table_path: str | Path, logs: str | Path) -> str:
    """One line per labelling method: how many neurons it described and how many failed, and
    where to look (printed at the end of every run that wrote the table)."""
    table = pd.read_parquet(table_path, columns=["method", "status", "label"])
    lines = []
    for method, rows in table.groupby("method", sort=True):
        if rows["label"].isna().all() and (rows["status"] == "ok").all():
            continue  # a method that labels nothing (topk lists exemplars)
        failed = int((rows["status"] == "failed").sum())
        line = f"{method}: {len(rows) - failed} of {len(rows)} neurons described"
        if failed:
            line += (
                f", {failed} failed: see the `status` and `error` columns of {table_path} "
                f"and the job logs under {logs}/"
            )
        lines.append(line)
    return "\n".join(lines)
