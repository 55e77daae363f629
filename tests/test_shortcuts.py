"""The demo's planted-shortcut check on TExplain's per-class words (neuroscribe.demo.shortcuts)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from neuroscribe.cli import main
from neuroscribe.demo.shortcuts import check_shortcuts, planted_shortcuts

TARGETS = [
    {"name": "clean", "train": {"images": 10, "epochs": 1}},
    {
        "name": "biased",
        "train": {"spurious": {"shape": "star", "background": "noise", "rate": 0.6}},
    },
    {"name": "hub"},  # not trained by the workflow
]


def words_table(ranked: dict[tuple[str, str, str], list[str]]) -> pd.DataFrame:
    """A per-class words table (texplain/classes.parquet's columns the check reads)."""
    rows = [
        {"model": model, "by": by, "class": name, "rank": rank, "word": word, "zscore": 9.0 - rank}
        for (model, by, name), ranked_words in ranked.items()
        for rank, word in enumerate(ranked_words)
    ]
    return pd.DataFrame(rows)


def test_planted_shortcuts_come_from_the_training_settings() -> None:
    assert planted_shortcuts(TARGETS) == {"biased": ("star", "noise")}


def test_the_planted_target_must_rank_the_background_word_and_the_others_must_not() -> None:
    table = words_table(
        {
            ("biased", "predicted", "star"): ["star", "noisy", "red"],
            # the true labels of the clean probe world carry no shortcut: never read
            ("biased", "label", "star"): ["star", "blue"],
            ("clean", "predicted", "star"): ["star", "red", "dotted", "noisy"],
            ("hub", "predicted", "star"): ["star", "noise"],
            ("hub", "predicted", "ring"): ["noisy"],
        }
    )
    checks = {
        c.model: c
        for c in check_shortcuts(table, planted_shortcuts(TARGETS), ["biased", "clean", "hub"])
    }
    assert checks["biased"].planted and checks["biased"].passed
    assert (checks["biased"].word, checks["biased"].rank) == ("noisy", 2)
    assert not checks["clean"].planted and checks["clean"].passed and checks["clean"].rank == 4
    # "noise" names the background as well as "noisy"; in the top 3 of a control: not passed
    assert checks["hub"].rank == 2 and not checks["hub"].passed
    assert "NOT as expected" in checks["hub"].sentence()
    missed = check_shortcuts(
        words_table({("biased", "predicted", "star"): ["star", "red", "blue", "noisy"]}),
        {"biased": ("star", "noise")},
        ["biased"],
    )
    assert not missed[0].passed and missed[0].rank == 4


def test_the_stage_writes_one_row_per_target(tmp_path: Path) -> None:
    classes = tmp_path / "classes.parquet"
    words_table({("biased", "predicted", "star"): ["star", "noisy"]}).to_parquet(classes)
    out = tmp_path / "evaluation" / "shortcuts.csv"
    args = {"classes": str(classes), "targets": TARGETS, "out": str(out)}
    assert main(["evaluate-shortcuts", json.dumps(args)]) == 0
    table = pd.read_csv(out)
    assert table["model"].tolist() == ["clean", "biased", "hub"]
    assert table["passed"].tolist() == [True, True, True]
    assert pd.isna(table.loc[0, "rank"]) and table.loc[1, "rank"] == 2
