"""Label tables made by other tools (`evaluation.external`), scored like neuroscribe's methods.

A table is CSV or Parquet with a unit column, a label column and a layer column (or one fixed
`layer` for a table of one layer); CLIP-Dissect's published tables (layer, unit, description)
fit the defaults. Rows naming a unit the layer does not have are reported and skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from neuroscribe.config import ConfigError

log = logging.getLogger(__name__)


def read_table(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)


def check_external(config: dict[str, Any]) -> None:
    """At parse time: each external table exists, has its columns, and says which target it
    labels when there are several."""
    several = len(config["targets"]) > 1
    names = {t["name"] for t in config["targets"]}
    for i, spec in enumerate(config["evaluation"]["external"]):
        where = f"config key 'evaluation.external[{i}]' ({spec['name']})"
        path = Path(spec["path"])
        if not path.is_file():
            raise ConfigError(f"{where}: file {path} does not exist")
        if spec["model"] is None and several:
            raise ConfigError(
                f"{where}: there are several targets; set `model` to one of {sorted(names)}"
            )
        if spec["model"] is not None and spec["model"] not in names:
            raise ConfigError(f"{where}: model {spec['model']!r} is not a target ({sorted(names)})")
        try:
            columns = set(read_table(path).columns)
        except Exception as err:
            raise ConfigError(f"{where}: cannot read {path} as CSV or Parquet: {err}") from err
        wanted = [spec["unit_column"], spec["label_column"]]
        if spec["layer"] is None:
            wanted.append(spec["layer_column"])
        missing = [c for c in wanted if c not in columns]
        if missing:
            raise ConfigError(
                f"{where}: {path} has no column {missing[0]!r} (columns: {sorted(columns)}); set "
                "unit_column, label_column and layer_column (or a fixed layer) to its names"
            )


def external_labels(
    tables: Sequence[dict[str, Any]], model: str, layer: str, stored: Sequence[int]
) -> dict[str, dict[int, str | None]]:
    """Labels of this layer from other tools' tables (`evaluation.external`), by method name.
    A row naming a unit the layer does not store is reported and skipped."""
    found: dict[str, dict[int, str | None]] = {}
    for spec in tables:
        table = read_table(spec["path"])
        if spec.get("model") not in (None, model):
            continue
        if spec.get("layer") is not None:
            mine = table if spec["layer"] == layer else table.iloc[:0]
        else:
            mine = table[table[spec["layer_column"]].astype(str) == layer]
        units = pd.to_numeric(mine[spec["unit_column"]], errors="coerce")
        known = units.isin(stored)
        if (~known).any():
            bad = mine.loc[~known.to_numpy(), spec["unit_column"]].tolist()
            log.warning(
                "external labels %s: %d rows name units layer %s does not have (first: %s); "
                "skipped",
                spec["name"],
                len(bad),
                layer,
                bad[:5],
            )
        found[spec["name"]] = {
            int(u): (x if isinstance(x, str) else None)
            for u, x in zip(
                units[known], mine.loc[known.to_numpy(), spec["label_column"]], strict=True
            )
        }
    return found
