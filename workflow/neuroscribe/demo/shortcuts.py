"""The demo's planted shortcuts, found again in TExplain's per-class words (the paper's use).

A demo target trained with `train.spurious` saw its class `shape` on `background` far more often
than chance; the probe world is clean. TExplain's per-class words for the images the target
predicts as `shape` should then rank the background's word near the top, and a target trained
without that shortcut should not. This module checks both, for every planted shortcut of a run
and every target of it.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from neuroscribe.demo.evaluation import tag_words
from neuroscribe.io import atomic_path
from neuroscribe.words import singular

log = logging.getLogger(__name__)
BY = "predicted"


@dataclass(frozen=True)
class ShortcutCheck:
    """One planted shortcut (shape, background) looked for in one target's per-class words."""

    model: str
    planted: bool  # this target was trained with this shortcut (else it is a control)
    shape: str
    background: str
    word: str | None  # the background's word as it ranked, None when absent
    rank: int | None  # 1 is the class's most overrepresented word
    zscore: float | None
    top: int
    passed: bool

    def sentence(self) -> str:
        place = (
            f"{self.word!r} ranks {self.rank}"
            if self.rank is not None
            else f"no word for {self.background} ranks"
        )
        want = f"top {self.top}" if self.planted else f"not in the top {self.top} (clean)"
        verdict = "as expected" if self.passed else "NOT as expected"
        return (
            f"{self.model}: {place} among the words of images predicted {self.shape!r}; "
            f"shortcut {self.shape}/{self.background} {'planted' if self.planted else 'absent'}, "
            f"expected {want}: {verdict}"
        )


def planted_shortcuts(targets: list[dict[str, Any]]) -> dict[str, tuple[str, str]]:
    """Each target's planted (shape, background), from its `train.spurious` (demo targets)."""
    found = {}
    for target in targets:
        spurious = (target.get("train") or {}).get("spurious")
        if spurious:
            found[target["name"]] = (spurious["shape"], spurious["background"])
    return found


def shortcuts_checked(config: dict[str, Any]) -> bool:
    """A demo target was trained with a planted shortcut, and TExplain's per-class words are
    there to find it in (the evaluation's `evaluate_shortcuts` job, when it is on)."""
    return "texplain" in config["methods"] and bool(planted_shortcuts(config["targets"]))


def _rank(classes: pd.DataFrame, model: str, shape: str, background: str) -> tuple[Any, ...]:
    rows = classes[
        (classes["model"] == model) & (classes["by"] == BY) & (classes["class"] == shape)
    ]
    wanted = {singular(w) for w in tag_words(f"background:{background}")}
    for row in rows.sort_values("rank").itertuples():
        if singular(row.word) in wanted:
            return row.word, int(row.rank) + 1, float(row.zscore)
    return None, None, None


def check_shortcuts(
    classes: pd.DataFrame, planted: dict[str, tuple[str, str]], models: list[str], top: int = 3
) -> list[ShortcutCheck]:
    """Every planted shortcut, looked for in every target's words for the predicted class."""
    checks = []
    for shape, background in sorted(set(planted.values())):
        for model in models:
            is_planted = planted.get(model) == (shape, background)
            word, rank, z = _rank(classes, model, shape, background)
            near = rank is not None and rank <= top
            checks.append(
                ShortcutCheck(
                    model,
                    is_planted,
                    shape,
                    background,
                    word,
                    rank,
                    z,
                    top,
                    near if is_planted else not near,
                )
            )
    return checks


def write_checks(
    classes: str | Path, targets: list[dict[str, Any]], out: str | Path, top: int = 3
) -> None:
    """The stage: `evaluation/shortcuts.csv`, one row per (planted shortcut, target), each also
    logged as a sentence."""
    table = pd.read_parquet(classes)
    checks = check_shortcuts(table, planted_shortcuts(targets), [t["name"] for t in targets], top)
    for check in checks:
        (log.info if check.passed else log.warning)(check.sentence())
    frame = pd.DataFrame([asdict(c) for c in checks], columns=list(ShortcutCheck.__annotations__))
    with atomic_path(Path(out)) as tmp:
        frame.to_csv(tmp, index=False)
