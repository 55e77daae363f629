"""Compare two runs' description tables neuron by neuron: labels, label lists, scores, status.

A refactoring must not change what the workflow says about any neuron. Run the demo before and
after the change into two folders, then:

    python benchmarks/compare_tables.py OLD_RESULTS NEW_RESULTS

where each is a run folder such as results/demo. Per-method detail tables
(`descriptions/{method}.parquet`) are compared too when both runs have them, or when the old
run kept the details as columns of the main table (as neuroscribe did before methods became
plug-ins). Prints every difference and exits 1 if there is one.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from neuroscribe.methods import get
from neuroscribe.tables import load_schema

KEY = ["model", "layer", "neuron", "method"]
SHARED = ["status", "label", "labels", "score", "score_kind", "exemplar_ids"]
# DnD's detail columns (its details schema; before methods became plug-ins they were columns
# of the main table, with the same names)
DND_DETAILS = [c for c in load_schema(get("dnd").details_schema)["properties"] if c not in KEY[:3]]


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list | tuple | np.ndarray) or isinstance(b, list | tuple | np.ndarray):
        if _missing(a) or _missing(b):
            return False
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if _missing(a) or _missing(b):
        return _missing(a) and _missing(b)
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return bool(a == b)


def _details(run: Path, table: pd.DataFrame) -> pd.DataFrame | None:
    """DnD's per-neuron details, from its own table or the old table's columns."""
    own = run / "descriptions" / "dnd.parquet"
    if own.exists():
        return pd.read_parquet(own).set_index(["model", "layer", "neuron"])[DND_DETAILS]
    if "candidates" not in table.columns:
        return None
    rows = table[table["method"] == "dnd"].set_index(["model", "layer", "neuron"])
    return rows[DND_DETAILS]


def compare(old_run: Path, new_run: Path) -> list[str]:
    old = pd.read_parquet(old_run / "descriptions.parquet")
    new = pd.read_parquet(new_run / "descriptions.parquet")
    problems = []
    old_keys, new_keys = set(map(tuple, old[KEY].values)), set(map(tuple, new[KEY].values))
    problems += [f"only in the old table: {k}" for k in sorted(old_keys - new_keys)]
    problems += [f"only in the new table: {k}" for k in sorted(new_keys - old_keys)]
    joined = old.set_index(KEY)[SHARED].join(
        new.set_index(KEY)[SHARED], how="inner", suffixes=("", "_new")
    )
    for key, row in joined.iterrows():
        for column in SHARED:
            if not _same(row[column], row[f"{column}_new"]):
                problems.append(f"{key} {column}: {row[column]!r} -> {row[f'{column}_new']!r}")
    old_details, new_details = _details(old_run, old), _details(new_run, new)
    if old_details is not None and new_details is not None:
        both = old_details.join(new_details, how="inner", suffixes=("", "_new"))
        if len(both) != len(old_details) or len(both) != len(new_details):
            problems.append(
                f"dnd details: {len(old_details)} neurons before, {len(new_details)} after"
            )
        for key, row in both.iterrows():
            for column in DND_DETAILS:
                if not _same(row[column], row[f"{column}_new"]):
                    problems.append(
                        f"{key} dnd {column}: {row[column]!r} -> {row[f'{column}_new']!r}"
                    )
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("old", type=Path, help="the earlier run folder, e.g. results/demo")
    parser.add_argument("new", type=Path, help="the later run folder")
    args = parser.parse_args(argv)
    problems = compare(args.old, args.new)
    rows = len(pd.read_parquet(args.new / "descriptions.parquet", columns=["neuron"]))
    for line in problems:
        print(line)
    print(
        f"{rows} rows compared: "
        + (f"{len(problems)} differences" if problems else "labels, lists and scores identical")
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
