"""`neuroscribe check-config FILE...`: read config files as `snakemake --configfile` layers them,
and say what is wrong naming the file, the line and the problem.

Snakemake reads `--configfile` before the workflow runs, and reports a YAML syntax error as
"Config file is not valid JSON or YAML" without the file or line (they show with `--verbose`);
this command gives them, then runs every check the workflow runs when it is parsed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from neuroscribe.config import ConfigError


def load_config_file(path: str | Path) -> dict[str, Any]:
    """One config file as a mapping; a YAML error names the file, line, column and problem."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text ({err.reason})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = ": ".join(
            str(part)
            for part in (getattr(err, "context", None), getattr(err, "problem", None))
            if part
        )
        raise ConfigError(f"{path}{where}: not valid YAML: {problem or err}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: a config file holds keys at the top level (run, targets, probe, ...), "
            f"not a {type(data).__name__}"
        )
    return data


def load_config_files(paths: Sequence[str | Path]) -> dict[str, Any]:
    """The files layered as `--configfile a.yaml b.yaml` layers them (later keys win)."""
    from snakemake.utils import update_config

    merged: dict[str, Any] = {}
    for path in paths:
        update_config(merged, load_config_file(path))
    return merged


def check_config_files(paths: Sequence[str | Path]) -> str:
    """Every check the workflow runs at parse time; a one-line summary when all pass."""
    from neuroscribe.fanout import build_layout

    layout = build_layout(load_config_files(paths))
    neurons = sum(len(c.neurons) for c in layout.all_chunks())
    layers = sum(len(sizes) for sizes in layout.layer_sizes.values())
    return (
        f"config OK: run '{layout.run}' (results in {layout.results}/), {neurons} neurons in "
        f"{layers} layer(s) of {len(layout.targets)} target(s), {layout.n_candidates} probe files"
    )
