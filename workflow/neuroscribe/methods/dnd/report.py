"""Describe-and-Dissect's part of the report's neuron pages: each candidate concept with its
drawn images, rank score, similarity and combined score, and the captions it came from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from neuroscribe.methods import ReportInputs, ReportPart
from neuroscribe.tables import read_tables

IMAGES_SHOWN = 5


def drawn_images(files: list[str]) -> dict[str, list[str]]:
    """Each concept's drawn images (the same for every neuron: the store is keyed by prompt)."""
    present = [f for f in files if Path(f).is_file()]
    if not present:
        return {}
    table = read_tables(present, columns=["concept", "status", "images"])
    return {
        str(r.concept): [str(p) for p in r.images]
        for r in table.itertuples(index=False)
        if r.status == "ok"
    }


def report(inputs: ReportInputs) -> ReportPart:
    images = drawn_images(inputs.files.get("synthesis", []))
    neurons: dict[int, dict[str, Any]] = {}
    details = inputs.details if inputs.details is not None else pd.DataFrame()
    for row in details.to_dict("records"):
        candidates = [
            {
                "concept": str(concept),
                "rank_score": rank,
                "similarity": similarity,
                "combined": combined,
                "images": images.get(str(concept), [])[:IMAGES_SHOWN],
            }
            for concept, rank, similarity, combined in zip(
                row["candidates"],
                row["candidate_rank_scores"],
                row["candidate_similarities"],
                row["candidate_scores"],
                strict=False,
            )
        ]
        candidates.sort(key=lambda c: -c["combined"] if pd.notna(c["combined"]) else float("inf"))
        neurons[int(row["neuron"])] = {
            "candidates": candidates,
            "captions": [str(c) for c in row["captions"]][: inputs.sentences],
        }
    return ReportPart(Path(__file__).with_name("report.html.j2"), neurons)
