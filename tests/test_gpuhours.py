"""GPU-hours in the plan: from the run's own finished jobs first, then from gpu_suite.py's
calibration file, and nothing for a stage neither covers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from neuroscribe.gpuhours import (
    GPU_LOG_LINE,
    calibrated_total,
    estimate_gpu_hours,
    format_gpu_hours,
    read_calibration,
)

GPUS = {"activations": 1, "exemplars": 1, "captions": 1, "concepts": 0, "synthesis": 1}
GPUS |= {"scores": 1, "describe": 0}


def _plan(results: Path) -> dict:
    return {
        "results": str(results),
        "methods": ["topk", "dnd"],
        "stage_order": [
            "probe_manifest",
            "activations",
            "exemplars",
            "captions",
            "concepts",
            "synthesis",
            "scores",
            "describe",
        ],
        "targets": {"resnet50": "torchvision:resnet50"},
        "probe": {"files": 50_000},
        "neurons": 4840,
        "jobs": {
            "probe_manifest": 1,
            "activations": 50,
            "exemplars": 40,
            "captions": 40,
            "concepts": 40,
            "synthesis": 40,
            "scores": 40,
            "describe": 1,
        },
    }


def _calibration(folder: Path) -> Path:
    path = folder / "calibration.json"
    data = {
        "source": "benchmarks/gpu_suite.py",
        "measured_at": "2026-12-03T10:00:00+00:00",
        "gpu": "NVIDIA H200",
        "target": "torchvision:resnet50",
        "activations_s_per_image": 0.002,
        "presets": {
            "paper": {
                "steps": 50,
                "neurons_measured": 32,
                "s_per_neuron": {
                    "exemplars": 0.1,
                    "captions": 0.3,
                    "synthesis": 9.0,
                    "scores": 0.5,
                },
            },
            "fast": {
                "steps": 1,
                "neurons_measured": 32,
                "s_per_neuron": {
                    "exemplars": 0.1,
                    "captions": 0.5,
                    "synthesis": 0.4,
                    "scores": 0.5,
                },
            },
        },
    }
    path.write_text(json.dumps(data))
    return path


def _finished(results: Path, rule: str, seconds: list[float], gpu: str) -> None:
    for i, s in enumerate(seconds):
        bench = results / "benchmarks" / rule / "resnet50" / "layer1" / f"{i}.tsv"
        bench.parent.mkdir(parents=True, exist_ok=True)
        bench.write_text(f"s\th:m:s\tmax_rss\tcpu_time\n{s}\t0:00:00\t900\t{s}\n")
        log = results / "logs" / rule / "resnet50" / "layer1" / f"{i}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"2026-12-03 10:00:00 INFO neuroscribe.device: {GPU_LOG_LINE} {gpu}\n")


def _stages(estimate: dict) -> dict:
    return {s["stage"]: s for s in estimate["stages"]}


def test_calibration_figures_times_the_plans_neurons_and_images(tmp_path: Path) -> None:
    plan = _plan(tmp_path / "results")
    estimate = estimate_gpu_hours(plan, GPUS, _calibration(tmp_path), steps=50)
    stages = _stages(estimate)
    assert stages["activations"]["gpu_hours"] == pytest.approx(0.002 * 50_000 / 3600)
    assert stages["synthesis"]["gpu_hours"] == pytest.approx(9.0 * 4840 / 3600)
    # a stage that does not depend on the steps: the mean of both presets
    assert stages["captions"]["gpu_hours"] == pytest.approx(0.4 * 4840 / 3600)
    assert "concepts" not in stages  # it asks for no GPU
    assert "NVIDIA H200" in stages["synthesis"]["source"]
    assert estimate["not_estimated"] == []
    text = "\n".join(format_gpu_hours(estimate))
    assert "calibration on NVIDIA H200, 2026-12-03" in text
    assert f"{sum(s['gpu_hours'] for s in stages.values()):.2f}" in text


def test_the_runs_finished_jobs_come_before_the_calibration(tmp_path: Path) -> None:
    results = tmp_path / "results"
    _finished(results, "synthesis", [100.0, 140.0], "NVIDIA A100-SXM4-80GB")
    estimate = estimate_gpu_hours(_plan(results), GPUS, _calibration(tmp_path), steps=50)
    synthesis = _stages(estimate)["synthesis"]
    assert synthesis["gpu_hours"] == pytest.approx(120 * 40 / 3600)
    assert "2 finished job(s), on NVIDIA A100-SXM4-80GB" in synthesis["source"]
    assert "calibration" in _stages(estimate)["captions"]["source"]


def test_steps_the_calibration_lacks_leave_synthesis_unestimated(tmp_path: Path) -> None:
    estimate = estimate_gpu_hours(_plan(tmp_path / "r"), GPUS, _calibration(tmp_path), steps=20)
    stages = _stages(estimate)
    assert stages["synthesis"]["gpu_hours"] is None
    assert "no figure for 20 steps (paper: 50 steps, fast: 1 steps)" in stages["synthesis"]["basis"]
    assert estimate["not_estimated"] == ["synthesis"]
    assert "without synthesis" in "\n".join(format_gpu_hours(estimate))


def test_another_target_gets_no_activation_figure(tmp_path: Path) -> None:
    plan = _plan(tmp_path / "r") | {"targets": {"vit": "timm:vit_base_patch16_224"}}
    activations = _stages(estimate_gpu_hours(plan, GPUS, _calibration(tmp_path), 50))["activations"]
    assert activations["gpu_hours"] is None
    assert "calibrated for torchvision:resnet50 only" in activations["basis"]


def test_without_any_source_nothing_is_printed_but_the_reason(tmp_path: Path) -> None:
    estimate = estimate_gpu_hours(_plan(tmp_path / "r"), GPUS, None, steps=50)
    (line,) = format_gpu_hours(estimate)
    assert "not estimated" in line and "plan.calibration" in line
    assert not any(ch.isdigit() for ch in line)
    cpu = estimate_gpu_hours(_plan(tmp_path / "r"), dict.fromkeys(GPUS, 0), None, steps=50)
    assert format_gpu_hours(cpu) == ["  GPU-hours: none (no stage of this run asks for a GPU)"]


def test_a_file_that_is_not_a_calibration_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"suite": "something else"}))
    with pytest.raises(ValueError, match=r"not a calibration file of gpu_suite\.py"):
        read_calibration(other)
    with pytest.raises(FileNotFoundError, match=r"gpu_suite\.py --out DIR"):
        read_calibration(tmp_path / "missing.json")


def test_the_reports_planned_figure_ignores_the_runs_finished_jobs(tmp_path: Path) -> None:
    results = tmp_path / "results"
    plan = _plan(results)
    before = calibrated_total(plan, GPUS, _calibration(tmp_path), steps=50)
    _finished(results, "synthesis", [100.0, 140.0], "NVIDIA A100-SXM4-80GB")
    assert calibrated_total(plan, GPUS, _calibration(tmp_path), steps=50) == before
    per_neuron = 0.1 + 0.4 + 9.0 + 0.5  # exemplars, captions (both presets), synthesis, scores
    assert before["gpu_hours"] == pytest.approx((0.002 * 50_000 + per_neuron * 4840) / 3600)
    assert before["not_estimated"] == []
    assert before["source"] == "calibration on NVIDIA H200, 2026-12-03"
    assert calibrated_total(plan, GPUS, None, steps=50) is None
