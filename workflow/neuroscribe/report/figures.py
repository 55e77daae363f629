"""The index's plan-against-spent table: what the plan expected, what the run actually used.

The plan's figures come from `neuroscribe.plan.build_plan` (the same numbers `snakemake plan`
prints); what was spent comes from the run's own files: LLM requests and tokens from the
method tables that count them, images drawn from the image store, job and GPU hours from the
Snakemake benchmark files.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

LLM_KEYS = ("requests", "prompt_tokens", "completion_tokens")
# the plan's names for the same figures (TExplain counts its label requests as llm_requests)
PLAN_ALIASES = {"llm_requests": "requests"}
COUNTED = ("llm_requests", "prompt_tokens", "completion_tokens")


@dataclass(frozen=True)
class Line:
    """One row of the table: `planned` or `spent` may be None (not planned, not measured)."""

    what: str
    planned: float | None
    spent: float | None
    note: str = ""


@dataclass(frozen=True)
class RuleTime:
    rule: str
    jobs: int
    hours: float
    cpu_hours: float
    gpus: int
    max_rss_mb: float


def _walk(tree: Any, found: dict[str, float]) -> None:
    """Sum the LLM figures anywhere in a method's estimates, except what finished jobs told."""
    if not isinstance(tree, Mapping):
        return
    for key, value in tree.items():
        if key == "observed":
            continue
        name = PLAN_ALIASES.get(key, key)
        if name in LLM_KEYS and isinstance(value, int | float) and not isinstance(value, bool):
            found[name] = found.get(name, 0) + value
        else:
            _walk(value, found)


def planned_llm(plan: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per method, the LLM requests and tokens the plan expects."""
    found: dict[str, dict[str, float]] = {}
    for method, estimates in plan["estimates"].items():
        if isinstance(estimates, Mapping):
            counts: dict[str, float] = {}
            _walk(estimates, counts)
            if counts:
                found[method] = counts
    return found


def planned_images(plan: dict[str, Any]) -> float | None:
    """The most images the plan expects the synthesizer to draw (None: no method draws)."""
    total = [
        e["synthesis"]["images_at_most"]
        for e in plan["estimates"].values()
        if isinstance(e, Mapping) and isinstance(e.get("synthesis"), Mapping)
    ]
    return sum(total) if total else None


def spent_llm(
    stage_files: Mapping[str, Mapping[str, Iterable[str]]],
) -> dict[str, dict[str, float]]:
    """Per method, the requests and tokens its stage tables counted (each counts what it paid)."""
    found: dict[str, dict[str, float]] = {}
    for method, stages in stage_files.items():
        counts: dict[str, float] = {}
        for files in stages.values():
            for path in files:
                if not Path(path).is_file():
                    continue
                names = pq.read_schema(path).names
                columns = [c for c in COUNTED if c in names]
                if not columns:
                    break  # a stage's tables share one schema
                table = pq.read_table(path, columns=columns)
                for column in columns:
                    key = PLAN_ALIASES.get(column, column)
                    counts[key] = counts.get(key, 0) + sum(table.column(column).to_pylist())
        if counts:
            found[method] = counts
    return found


def images_drawn(store: str | Path) -> int:
    """Files in the run's content-addressed image store (each prompt and seed drawn once)."""
    root = Path(store)
    return sum(1 for p in root.rglob("*") if p.is_file()) if root.is_dir() else 0


def rule_times(benchmarks: str | Path, gpus: Mapping[str, int]) -> list[RuleTime]:
    """Per rule, from its jobs' benchmark files: jobs, wall hours, CPU hours, GPUs per job."""
    root = Path(benchmarks)
    rows: dict[str, list[dict[str, str]]] = {}
    for path in sorted(root.rglob("*.tsv")) if root.is_dir() else []:
        rule = path.relative_to(root).parts[0].removesuffix(".tsv")
        with path.open() as f:
            # a repeated benchmark keeps one line per repeat; the last is this run's
            lines = list(csv.DictReader(f, delimiter="\t"))
        if lines:
            rows.setdefault(rule, []).append(lines[-1])

    def number(row: dict[str, str], key: str) -> float:
        try:
            return float(row.get(key, "") or 0)
        except ValueError:  # "NA" where the platform could not measure
            return 0.0

    return [
        RuleTime(
            rule=rule,
            jobs=len(found),
            hours=sum(number(r, "s") for r in found) / 3600,
            cpu_hours=sum(number(r, "cpu_time") for r in found) / 3600,
            gpus=gpus.get(rule, 0),
            max_rss_mb=max(number(r, "max_rss") for r in found),
        )
        for rule, found in rows.items()
    ]


def config_summary(config: dict[str, Any]) -> dict[str, Any]:
    """What the index says about the run's config: targets, probe set, methods, roles (only
    these, so a setting the index does not show does not rebuild the report)."""
    roles = {}
    for role in ("captioner", "llm", "synthesizer", "similarity"):
        section = config.get(role)
        if isinstance(section, Mapping):
            roles[role] = {k: section[k] for k in ("backend", "model") if section.get(k)}
    return {
        "run": config.get("run", "demo"),
        "targets": [
            {
                "name": t["name"],
                "spec": t["spec"],
                "weights": t.get("weights"),
                "layers": [x if isinstance(x, str) else x["name"] for x in t["layers"]],
            }
            for t in config["targets"]
        ],
        "datasets": [
            {k: d[k] for k in ("name", "type", "path", "n_images") if d.get(k) is not None}
            for d in config["probe"]["datasets"]
        ],
        "methods": config["methods"],
        "roles": roles,
        "chunk_size": config["chunk_size"],
        "top_k": config["top_k"],
    }


def plan_figures(plan: dict[str, Any], gpu_hours: dict[str, Any] | None = None) -> dict[str, Any]:
    """The plan's figures the index compares with what was spent: only those that follow from
    the config, the probe files and the calibration file (`gpuhours.calibrated_total`), not
    from what has run, so the report is not rebuilt because the run went on."""
    return {
        "jobs": plan["total_jobs"],
        "llm": planned_llm(plan),
        "images_at_most": planned_images(plan),
        "gpu_hours": gpu_hours,
    }


def planned_gpu_note(estimate: dict[str, Any] | None) -> str:
    """Where the planned GPU-hours come from, or why there are none."""
    if estimate is None:
        return "not planned: no plan.calibration (benchmarks/gpu_suite.py writes one)"
    if estimate["gpu_hours"] is None:
        return f"not planned: the {estimate['source']} covers no GPU stage of this run"
    missing = estimate["not_estimated"]
    return f"planned: {estimate['source']}" + (f", without {', '.join(missing)}" if missing else "")


def plan_lines(
    plan: dict[str, Any] | None,
    stage_files: Mapping[str, Mapping[str, Iterable[str]]],
    store: str | Path,
    times: list[RuleTime],
) -> list[Line]:
    """The plan-against-spent table of the index (`plan` None: spent figures only)."""
    lines = [
        Line(
            "jobs",
            None if plan is None else plan["jobs"],
            sum(t.jobs for t in times),
            "spent: jobs with a benchmark file",
        ),
    ]
    planned = {} if plan is None else plan["llm"]
    spent = spent_llm(stage_files)
    for method in sorted(set(planned) | set(spent)):
        for key in LLM_KEYS:
            lines.append(
                Line(
                    f"{method}: LLM {key.replace('_', ' ')}",
                    planned.get(method, {}).get(key),
                    spent.get(method, {}).get(key),
                    "paid for (cached replies cost nothing)",
                )
            )
    estimate = None if plan is None else plan.get("gpu_hours")
    drawn = images_drawn(store)
    most = None if plan is None else plan["images_at_most"]
    if most is not None or drawn:
        lines.append(Line("images drawn", most, drawn, "planned: at most, before de-duplication"))
    lines.append(
        Line(
            "GPU-hours",
            (estimate or {}).get("gpu_hours"),
            sum(t.hours * t.gpus for t in times),
            f"{planned_gpu_note(estimate)}; spent: job wall time × GPUs asked",
        )
    )
    lines.append(
        Line("job-hours (all jobs)", None, sum(t.hours for t in times), "wall time of every job")
    )
    return lines
