"""The final table: gather every chunk's results into one row per (model, layer, neuron, method)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
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
    out["status"] = "ok"
    out["error"] = None
    out["label"] = None
    out["labels"] = [[] for _ in range(len(out))]
    out["score"] = None
    out["score_kind"] = None
    out["models"] = [json.dumps({"target": models[m]}) for m in out["model"]]
    for column in ["captions", *CANDIDATE_COLUMNS]:
        out[column] = [[] for _ in range(len(out))]
    return out


# final-table column <- scores column
CANDIDATE_COLUMNS = {
    "candidates": "candidates",
    "candidate_rank_scores": "rank_scores",
    "candidate_similarities": "similarities",
    "candidate_scores": "combined",
}


KEY = ["model", "layer", "neuron"]


def dnd_roles(
    captions: pd.DataFrame,
    concepts: pd.DataFrame,
    synthesis: dict[tuple[str, str], list[str]],
    scores: pd.DataFrame,
) -> pd.DataFrame:
    """Per neuron, the id of every model that ran for it, as its chunk's tables record them:
    the captioner, the concept proposer, the synthesizer of its candidates and the similarity
    model (none for a neuron that failed before scoring)."""
    roles = captions.groupby(KEY, sort=False)["captioner"].first().rename("captioner")
    out = pd.concat(
        [roles, concepts.set_index(KEY)["proposer"].rename("llm")], axis=1
    ).reset_index()
    out["synthesizer"] = [
        ", ".join(synthesis.get((m, layer), [])) or None
        for m, layer in zip(out["model"], out["layer"], strict=True)
    ]
    similarity = scores.set_index(KEY)["similarity_model"].rename("similarity")
    return out.merge(similarity.reset_index(), on=KEY, how="left")


def dnd_rows(
    topk: pd.DataFrame,
    captions: pd.DataFrame,
    scores: pd.DataFrame,
    roles: pd.DataFrame,
    models: dict[str, str],
) -> pd.DataFrame:
    """Rows of method `dnd`: the exemplars of `topk` with their captions, candidates and labels;
    `status` and `error` from the scores, which carry the concepts' and synthesis' errors."""
    caps = (
        captions.sort_values([*KEY, "rank"])
        .groupby(KEY, sort=False)["caption"]
        .agg(list)
        .rename("captions")
        .reset_index()
    )
    # the per-neuron results come from the scores; the exemplars from `topk`
    outcome = ["status", "error", "label", "labels", "score", "score_kind"]
    keep = [*KEY, *outcome, *CANDIDATE_COLUMNS.values()]
    out = topk.drop(columns=[*outcome, "captions", *CANDIDATE_COLUMNS])
    out = out.merge(caps, on=KEY, how="left").merge(scores[keep], on=KEY, how="left")
    out = out.rename(columns={v: k for k, v in CANDIDATE_COLUMNS.items()})
    for column in ["labels", "captions", *CANDIDATE_COLUMNS]:
        out[column] = [[] if not isinstance(v, list | np.ndarray) else list(v) for v in out[column]]
    out["method"] = "dnd"
    ids = out[KEY].merge(roles, on=KEY, how="left")
    out["models"] = [
        json.dumps(
            {"target": models[row.model]}
            | {role: getattr(row, role) for role in ROLES if isinstance(getattr(row, role), str)}
        )
        for row in ids.itertuples()
    ]
    return out


ROLES = ("captioner", "llm", "synthesizer", "similarity")


def _read_all(files: Sequence[str | Path], columns: list[str] | None = None) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p, columns=columns) for p in files], ignore_index=True)


def _synthesizers(files: Sequence[str | Path]) -> dict[tuple[str, str], list[str]]:
    """The synthesizer ids of each layer's chunks (synthesis tables have no model/layer column:
    their path does)."""
    found: dict[tuple[str, str], list[str]] = {}
    for path in files:
        model, layer = Path(path).parts[-3:-1]
        ids = pd.read_parquet(path, columns=["synthesizer"])["synthesizer"].unique()
        known = found.setdefault((model, layer), [])
        known += [i for i in ids if i not in known]
    return found


def write_descriptions(
    exemplar_files: list[str | Path],
    models: dict[str, str],
    methods: list[str],
    out_parquet: str | Path,
    out_csv: str | Path,
    captions: Sequence[str | Path] = (),
    concepts: Sequence[str | Path] = (),
    synthesis: Sequence[str | Path] = (),
    scores: Sequence[str | Path] = (),
) -> None:
    """Merge per-chunk outputs into the description table, checked against its schema.

    `models` maps each target name to the id of the model used (spec@weights); the other models
    are named as the chunk tables recorded them, so the table names only what ran.
    """
    exemplars = _read_all(exemplar_files)
    topk = topk_rows(exemplars, models)
    parts = []
    if "topk" in methods:
        parts.append(topk)
    if "dnd" in methods:
        caption_table = _read_all(captions)
        score_table = _read_all(scores)
        roles = dnd_roles(
            caption_table,
            _read_all(concepts, [*KEY, "proposer"]),
            _synthesizers(synthesis),
            score_table,
        )
        parts.append(dnd_rows(topk, caption_table, score_table, roles, models))
    table = pd.concat(parts, ignore_index=True).sort_values(
        ["model", "layer", "neuron", "method"], kind="stable"
    )
    arrow = write_table(table, out_parquet, "descriptions")
    write_csv(arrow, out_csv)
    log.info("descriptions: %d rows from %d chunk files", len(table), len(exemplar_files))


def failure_summary(table_path: str | Path, logs: str | Path) -> str:
    """One line per labelling method: how many neurons it described and how many failed, and
    where to look (printed at the end of every run that wrote the table)."""
    table = pd.read_parquet(table_path, columns=["method", "status"])
    lines = []
    for method, rows in table.groupby("method", sort=True):
        if method == "topk":
            continue  # lists exemplars, labels nothing
        failed = int((rows["status"] == "failed").sum())
        line = f"{method}: {len(rows) - failed} of {len(rows)} neurons described"
        if failed:
            line += (
                f", {failed} failed: see the `status` and `error` columns of {table_path} "
                f"and the job logs under {logs}/"
            )
        lines.append(line)
    return "\n".join(lines)
