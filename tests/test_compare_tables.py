"""benchmarks/compare_tables.py, the check that a change left every neuron's description alone,
finds a changed label, score or candidate, and a neuron that went missing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd

from conftest import REPO

# the script by its path: benchmarks/ is not a package, and sys.path stays as it is
SPEC = importlib.util.spec_from_file_location(
    "compare_tables", REPO / "benchmarks" / "compare_tables.py"
)
assert SPEC is not None and SPEC.loader is not None
SCRIPT = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(SCRIPT)
compare = SCRIPT.compare

KEY = {"model": "m", "layer": "fc"}


def _run(folder: Path, label: str = "red", score: float = 0.5, neurons: int = 2) -> Path:
    rows = [
        KEY
        | {"neuron": n, "method": "dnd", "status": "ok", "label": label, "labels": [label]}
        | {"score": score, "score_kind": "combined", "exemplar_ids": ["a", "b"]}
        for n in range(neurons)
    ]
    details = [
        KEY
        | {"neuron": n, "captions": ["a red square"], "candidates": [label, "blue"]}
        | {"candidate_rank_scores": [1.0, 2.0], "candidate_similarities": [0.5, 0.1]}
        | {"candidate_scores": [score, 0.1]}
        for n in range(neurons)
    ]
    (folder / "descriptions").mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(folder / "descriptions.parquet")
    pd.DataFrame(details).to_parquet(folder / "descriptions" / "dnd.parquet")
    return folder


def test_identical_runs_compare_equal(tmp_path: Path) -> None:
    assert compare(_run(tmp_path / "a"), _run(tmp_path / "b")) == []


def test_a_changed_label_score_or_missing_neuron_is_reported(tmp_path: Path) -> None:
    old = _run(tmp_path / "a")
    problems = compare(old, _run(tmp_path / "b", label="green"))
    assert "('m', 'fc', 0, 'dnd') label: 'red' -> 'green'" in problems
    assert any("dnd candidates" in p for p in problems)
    assert any(
        " score: 0.5 -> 0.50001" in p for p in compare(old, _run(tmp_path / "c", score=0.50001))
    )
    assert "only in the old table: ('m', 'fc', 1, 'dnd')" in compare(
        old, _run(tmp_path / "d", neurons=1)
    )
