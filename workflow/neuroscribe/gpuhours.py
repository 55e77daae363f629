"""GPU-hours per stage for `snakemake plan`, from figures that were measured, never guessed.

Two sources, per stage, in this order:

1. this run's own finished jobs: the mean wall seconds of the stage's jobs (their Snakemake
   benchmark files) times the jobs planned times the GPUs each asks for; the GPU's name comes
   from the jobs' logs (`GPU_LOG_LINE`);
2. a calibration file written by `benchmarks/gpu_suite.py` and named by `plan.calibration`:
   seconds per probe image of activation extraction and, per preset, seconds per neuron of each
   Describe-and-Dissect chunk stage, on the GPU it names.

A stage neither source covers is listed as not estimated, with the reason.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from neuroscribe.paths import RunPaths

# the line every GPU job's log holds, followed by the GPU's name (neuroscribe.device writes it)
GPU_LOG_LINE = "computing on the GPU"
# the Describe-and-Dissect chunk stages a calibration file holds per-neuron figures for
CALIBRATED_DND = ("exemplars", "captions", "synthesis", "scores")


@dataclass
class StageHours:
    """One stage's GPU-hours (None: not estimated) and where the figure comes from."""

    stage: str
    gpu_hours: float | None
    source: str
    basis: str


def _gpu_names(logs: Path, rule: str) -> list[str]:
    folder = logs / rule
    files = list(folder.rglob("*.log")) if folder.is_dir() else []
    if (logs / f"{rule}.log").is_file():
        files.append(logs / f"{rule}.log")
    names: set[str] = set()
    pattern = re.compile(re.escape(GPU_LOG_LINE) + r" (.+)$", re.MULTILINE)
    for path in files:
        names.update(m.group(1).strip() for m in pattern.finditer(path.read_text(errors="replace")))
    return sorted(names)


def from_finished_jobs(plan: dict[str, Any], gpus: dict[str, int]) -> dict[str, StageHours]:
    """Stages with finished jobs in this run: mean seconds per job x planned jobs x GPUs."""
    from neuroscribe.report.figures import rule_times  # pyarrow: not at the workflow's parse

    paths = RunPaths(plan["results"])
    found = {}
    for t in rule_times(paths.benchmarks, gpus):
        planned = plan["jobs"].get(t.rule, 0)
        if t.gpus == 0 or planned == 0:
            continue
        mean_s = t.hours * 3600 / t.jobs
        names = _gpu_names(Path(paths.logs), t.rule)
        on = ", ".join(names) if names else "a GPU its logs do not name"
        found[t.rule] = StageHours(
            stage=t.rule,
            gpu_hours=mean_s * planned * t.gpus / 3600,
            source=f"this run's {t.jobs} finished job(s), on {on}",
            basis=f"{mean_s:.0f} s per job x {planned} jobs x {t.gpus} GPU",
        )
    return found


def read_calibration(path: str | Path) -> dict[str, Any]:
    """A calibration file of benchmarks/gpu_suite.py, with a clear error for anything else."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"plan.calibration: {file} does not exist; write one with "
            "`python benchmarks/gpu_suite.py --out DIR` on a GPU node (DIR/calibration.json)"
        )
    data = json.loads(file.read_text())
    if data.get("source") != "benchmarks/gpu_suite.py" or "presets" not in data:
        raise ValueError(f"plan.calibration: {file} is not a calibration file of gpu_suite.py")
    return data


def from_calibration(
    plan: dict[str, Any], gpus: dict[str, int], calibration: dict[str, Any], steps: int | None
) -> dict[str, StageHours]:
    """Stages the calibration file covers: activations per probe image (for targets of the
    calibrated architecture) and Describe-and-Dissect per neuron (the preset with the config's
    denoising steps for synthesis; the other stages do not depend on the steps)."""
    on = f"calibration on {calibration['gpu']}, {calibration['measured_at'][:10]}"
    found: dict[str, StageHours] = {}
    per_image = calibration.get("activations_s_per_image")
    same = [m for m, spec in plan["targets"].items() if spec == calibration.get("target")]
    if gpus.get("activations") and per_image and plan["jobs"].get("activations"):
        if same:
            images = plan["probe"]["files"] * len(same)
            found["activations"] = StageHours(
                "activations",
                per_image * images * gpus["activations"] / 3600,
                on,
                f"{per_image * 1000:.2f} ms per image x {images} images ({calibration['target']})",
            )
        else:
            found["activations"] = StageHours(
                "activations",
                None,
                on,
                f"calibrated for {calibration['target']} only, not {', '.join(plan['targets'].values())}",
            )
    if "dnd" not in plan["methods"]:
        return found
    presets = calibration["presets"]
    matching = [p for p, v in presets.items() if v["steps"] == steps]
    for stage in CALIBRATED_DND:
        if not gpus.get(stage) or not plan["jobs"].get(stage):
            continue
        usable = matching if stage == "synthesis" else list(presets)
        figures = [presets[p]["s_per_neuron"].get(stage) for p in usable]
        figures = [f for f in figures if f is not None]
        if not figures:
            have = ", ".join(f"{p}: {v['steps']} steps" for p, v in presets.items())
            found[stage] = StageHours(stage, None, on, f"no figure for {steps} steps ({have})")
            continue
        per_neuron = sum(figures) / len(figures)
        found[stage] = StageHours(
            stage,
            per_neuron * plan["neurons"] * gpus[stage] / 3600,
            on,
            f"{per_neuron:.2f} s per neuron x {plan['neurons']} neurons",
        )
    return found


def estimate_gpu_hours(
    plan: dict[str, Any],
    gpus: dict[str, int],
    calibration: str | Path | None,
    steps: int | None,
) -> dict[str, Any]:
    """GPU-hours per GPU stage of the plan, each from the best source there is."""
    wanted = [s for s in plan["stage_order"] if gpus.get(s) and plan["jobs"].get(s)]
    if not wanted:
        return {"stages": [], "note": "no stage of this run asks for a GPU"}
    measured = from_finished_jobs(plan, gpus)
    calibrated = (
        from_calibration(plan, gpus, read_calibration(calibration), steps) if calibration else {}
    )
    stages = []
    for stage in wanted:
        if stage in measured:
            stages.append(measured[stage])
        elif stage in calibrated:
            stages.append(calibrated[stage])
        else:
            lacking = "not in the calibration file" if calibration else "no plan.calibration"
            why = f"no finished job in this run, {lacking}"
            stages.append(StageHours(stage, None, "", why))
    known = [s.gpu_hours for s in stages if s.gpu_hours is not None]
    return {
        "stages": [asdict(s) for s in stages],
        "total_estimated": sum(known) if known else None,
        "not_estimated": [s.stage for s in stages if s.gpu_hours is None],
        "calibration": str(calibration) if calibration else None,
    }


def calibrated_total(
    plan: dict[str, Any],
    gpus: dict[str, int],
    calibration: str | Path | None,
    steps: int | None,
) -> dict[str, Any] | None:
    """The calibration file's GPU-hours for the whole plan, ignoring this run's finished jobs
    (for the report's planned column, which must not change as the run goes on); None without
    a calibration file."""
    if not calibration:
        return None
    data = read_calibration(calibration)
    wanted = [s for s in plan["stage_order"] if gpus.get(s) and plan["jobs"].get(s)]
    found = from_calibration(plan, gpus, data, steps)
    known = [found[s].gpu_hours for s in wanted if s in found and found[s].gpu_hours is not None]
    return {
        "gpu_hours": sum(known) if known else None,
        "not_estimated": [s for s in wanted if s not in found or found[s].gpu_hours is None],
        "source": f"calibration on {data['gpu']}, {data['measured_at'][:10]}",
    }


def format_gpu_hours(estimate: dict[str, Any]) -> list[str]:
    """The plan's lines for `estimate_gpu_hours`'s result."""
    if not estimate["stages"]:
        return [f"  GPU-hours: none ({estimate['note']})"]
    if estimate["total_estimated"] is None:
        hint = (
            ""
            if estimate["calibration"]
            else "; set plan.calibration to the calibration.json "
            "of benchmarks/gpu_suite.py, or let a first chunk finish"
        )
        return [f"  GPU-hours: not estimated (no measured figures{hint})"]
    lines = ["  GPU-hours per stage:"]
    width = max(len(s["stage"]) for s in estimate["stages"])
    for s in estimate["stages"]:
        if s["gpu_hours"] is None:
            reason = f"{s['source']}: {s['basis']}" if s["source"] else s["basis"]
            lines.append(f"    {s['stage']:<{width}}        -  not estimated ({reason})")
        else:
            lines.append(
                f"    {s['stage']:<{width}} {s['gpu_hours']:>8.2f}  {s['basis']} ({s['source']})"
            )
    missing = estimate["not_estimated"]
    left_out = f", without {', '.join(missing)}" if missing else ""
    lines.append(f"    {'total':<{width}} {estimate['total_estimated']:>8.2f}{left_out}")
    return lines
