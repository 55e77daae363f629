"""Describe-and-Dissect's rows of the final table, and its details table (the candidates)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from neuroscribe.methods import KEY, MethodRows, RowInputs
from neuroscribe.tables import read_tables

# details-table column <- scores column
CANDIDATE_COLUMNS = {
    "candidates": "candidates",
    "candidate_rank_scores": "rank_scores",
    "candidate_similarities": "similarities",
    "candidate_scores": "combined",
}
# the per-neuron outcome, from the scores (which carry the concepts' and synthesis' errors)
OUTCOME = ["status", "error", "label", "labels", "score", "score_kind"]
ROLES = ("captioner", "llm", "synthesizer", "similarity")


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


def role_ids(
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


def _lists(values: pd.Series) -> list[list]:
    return [list(v) if isinstance(v, list | np.ndarray) else [] for v in values]


def rows(inputs: RowInputs) -> MethodRows:
    """Each neuron's exemplars with its labels and outcome; its captions and candidates (with
    their rank scores, similarities and combined scores) in the details table."""
    captions = read_tables(inputs.files["captions"])
    scores = read_tables(inputs.files["scores"])
    roles = role_ids(
        captions,
        read_tables(inputs.files["concepts"], [*KEY, "proposer"]),
        _synthesizers(inputs.files["synthesis"]),
        scores,
    )
    out = inputs.exemplars.drop(columns=OUTCOME).merge(scores[[*KEY, *OUTCOME]], on=KEY, how="left")
    out["labels"] = _lists(out["labels"])
    out["method"] = "dnd"
    ids = out[KEY].merge(roles, on=KEY, how="left")
    out["models"] = [
        json.dumps(
            {"target": inputs.models[row.model]}
            | {role: getattr(row, role) for role in ROLES if isinstance(getattr(row, role), str)}
        )
        for row in ids.itertuples()
    ]
    caption_lists = (
        captions.sort_values([*KEY, "rank"])
        .groupby(KEY, sort=False)["caption"]
        .agg(list)
        .rename("captions")
        .reset_index()
    )
    details = (
        out[KEY]
        .merge(caption_lists, on=KEY, how="left")
        .merge(scores[[*KEY, *CANDIDATE_COLUMNS.values()]], on=KEY, how="left")
        .rename(columns={v: k for k, v in CANDIDATE_COLUMNS.items()})
    )
    for column in ["captions", *CANDIDATE_COLUMNS]:
        details[column] = _lists(details[column])
    return MethodRows(out, details)
