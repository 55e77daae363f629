"""benchmarks/gpu_suite.py --smoke: every part of the GPU suite runs end to end on the CPU at
tiny size, its JSON holds every figure, and its calibration file feeds the plan's GPU-hours."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from neuroscribe.gpuhours import estimate_gpu_hours, format_gpu_hours, read_calibration

REPO = Path(__file__).resolve().parent.parent
PARTS = ("activations", "units", "paper", "fast")
GPUS = {"activations": 1, "exemplars": 1, "captions": 1, "concepts": 0, "synthesis": 1}
GPUS |= {"scores": 1, "describe": 0}


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("suite")
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_suite.py"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out, proc.stdout


@pytest.mark.slow
def test_the_smoke_run_measures_every_part(suite: tuple[Path, str]) -> None:
    out, stdout = suite
    last = json.loads(stdout.strip().splitlines()[-1])
    assert last == json.loads((out / "suite.json").read_text())
    assert (out / "suite.log").read_text().strip().splitlines()[-1] == stdout.strip().splitlines()[
        -1
    ]
    assert {p: last["parts"][p]["status"] for p in PARTS} == dict.fromkeys(PARTS, "ok")
    assert last["device"] == "cpu" and last["gpu"] is None
    assert last["activations"]["ratio"] > 0
    for key in ("draw_paper", "draw_fast", "caption", "clip"):
        assert last["units"][key]["s_per_image"] > 0
    for preset in ("paper", "fast"):
        figures = last[preset]
        pipeline = figures["pipeline"]
        assert pipeline["neurons"] == last["sizes"]["pipeline_neurons"]
        assert pipeline["wall_s"] > 0 and pipeline["diffusion_images"] > 0
        # the reference, timed once under the paper settings, is compared in both presets
        assert figures["reference"]["neurons"] == last["sizes"]["reference_neurons"]
        assert figures["speedup"] > 0
        assert figures["derived_s_per_neuron"] > 0
        projection = figures["projection"]
        assert projection["neurons"] == 4840 and projection["chunks"] == 38
        assert projection["paper_v100_h"] == pytest.approx(4840 * 38.8 / 3600)
        assert projection["projected_gpu_h"] > 0
    assert last["paper"]["pipeline"]["diffusion_images"] > 0
    log = (out / "suite.log").read_text()
    assert "sizes:" in log and "sized to the" in log
    assert "config/config.yaml (4840 neurons)" in log and "V100-hours" in log


@pytest.mark.slow
def test_its_calibration_feeds_the_plans_gpu_hours(suite: tuple[Path, str]) -> None:
    out, _ = suite
    calibration = read_calibration(out / "calibration.json")
    assert calibration["gpu"] == "none (cpu)"
    plan = {
        "results": str(out / "no-run"),
        "methods": ["topk", "dnd"],
        "stage_order": list(GPUS),
        "targets": {"demo": calibration["target"]},
        "probe": {"files": 1000},
        "neurons": 256,
        "jobs": dict.fromkeys(GPUS, 2),
    }
    steps = calibration["presets"]["paper"]["steps"]
    estimate = estimate_gpu_hours(plan, GPUS, out / "calibration.json", steps=steps)
    assert estimate["not_estimated"] == []
    hours = {s["stage"]: s["gpu_hours"] for s in estimate["stages"]}
    assert set(hours) == {s for s, n in GPUS.items() if n}
    assert all(h > 0 for h in hours.values())
    assert "calibration on none (cpu)" in "\n".join(format_gpu_hours(estimate))
