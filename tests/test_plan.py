"""The plan's view of finished jobs: stages whose measured memory came close to their request."""

from __future__ import annotations

from pathlib import Path

from neuroscribe.plan import memory_warnings, observe_memory

HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def _benchmark(results: Path, job: str, max_rss: str) -> None:
    """A benchmark file as Snakemake writes it (`benchmark:` of a rule)."""
    path = results / "benchmarks" / job
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + f"11.95\t0:00:11\t{max_rss}\t9837.72\t507.57\t682.52\t0\t0\t47\t6\n")


def test_plan_warns_about_stages_whose_peak_came_close_to_their_request(tmp_path: Path) -> None:
    _benchmark(tmp_path, "scores/m/conv3/0000.tsv", "1589.88")
    _benchmark(tmp_path, "scores/m/conv3/0001.tsv", "950.0")
    _benchmark(tmp_path, "exemplars/m/conv3/0000.tsv", "1850.5")  # within 10 % of 2000
    _benchmark(tmp_path, "activations/m/shard-0000.tsv", "1200")  # well below
    _benchmark(tmp_path, "describe.tsv", "NA")  # too short to be sampled
    resources = {
        stage: {"mem_mb": 2000}
        for stage in ("scores", "exemplars", "activations", "describe", "merge")
    }
    resources["scores"]["mem_mb"] = 1000
    plan = observe_memory({"results": str(tmp_path)}, resources)
    assert plan["memory"]["scores"] == {
        "peak_mb": 1589.9,
        "requested_mb": 1000,
        "job": "scores/m/conv3/0000.tsv",
        "tight": True,
    }
    assert plan["memory"]["exemplars"]["tight"] and not plan["memory"]["activations"]["tight"]
    assert "describe" not in plan["memory"] and "merge" not in plan["memory"]
    exemplars, scores = memory_warnings(plan)  # in pipeline order
    assert (
        "scores jobs peaked at 1590 MB (scores/m/conv3/0000.tsv), above their request of "
        "1000 MB: raise resources.scores.mem_mb" in scores
    )
    assert "exemplars jobs peaked at 1850 MB" in exemplars and "within 10% of" in exemplars


def test_no_finished_jobs_no_memory_section(tmp_path: Path) -> None:
    plan = observe_memory({"results": str(tmp_path)}, {})
    assert "memory" not in plan and memory_warnings(plan) == []
