"""What jobs ask the scheduler for: GPUs only where a backend runs a model on one, and the
limits the rules rely on kept when the command line replaces the profile's `--resources`."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import REPO, run_snakemake
from neuroscribe.config import validate_config
from neuroscribe.resources import stage_gpus

DEMO = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())


def config(**top: Any) -> dict[str, Any]:
    cfg = copy.deepcopy(DEMO)
    cfg["targets"][0].pop("train")  # random weights: nothing here runs a model
    cfg["probe"]["datasets"][0]["n_images"] = 20
    cfg |= {"shard_size": 20, "chunk_size": 64, "top_k": 3} | top
    cfg["targets"][0]["layers"] = ["conv2", "fc"]
    return cfg


def test_no_gpu_on_a_cpu_run_or_for_backends_without_a_model() -> None:
    on_cpu = validate_config(config())
    assert {s: stage_gpus(on_cpu, s) for s in ("activations", "exemplars", "scores")} == {
        "activations": 0,
        "exemplars": 0,
        "scores": 0,
    }
    offline = validate_config(config(device="auto"))
    # the demo's captioner, llm and synthesizer read tables or render: no GPU to wait for
    assert [stage_gpus(offline, s) for s in ("captions", "concepts", "synthesis")] == [0, 0, 0]
    assert stage_gpus(offline, "clipdissect") == 0  # the annotations backend
    assert [stage_gpus(offline, s) for s in ("activations", "exemplars", "scores")] == [1, 1, 1]
    assert [stage_gpus(offline, s) for s in ("manifest", "merge", "describe", "train")] == [0] * 4
    models = config(
        device="cuda",
        captioner={"backend": "blip"},
        llm={"backend": "local"},
        dnd={"synthesizer": {"backend": "diffusers"}},
        clipdissect={"backend": "clip"},
        tellme={"simulator": {"backend": "llm"}},
    )
    models["probe"]["datasets"] = [{"name": "photos", "type": "folder", "path": str(REPO)}]
    models["resources"]["synthesis"]["gpus"] = 2
    real = validate_config(models)
    assert [stage_gpus(real, s) for s in ("captions", "concepts", "synthesis")] == [1, 1, 2]
    assert stage_gpus(real, "clipdissect") == 1
    api = validate_config(config(device="cuda", llm={"backend": "openai", "api_key_env": None}))
    assert stage_gpus(api, "concepts") == 0


def _dry_jobs(output: str) -> list[dict[str, str]]:
    """Each job of a dry run's listing: its rule, wildcards and resources."""
    jobs = []
    # jobs of a group are listed indented, inside the group's block
    for block in re.split(r"\n(?=\s*(?:local)?rule \w+:)", output):
        rule = re.match(r"\s*(?:local)?rule (\w+):", block)
        if rule is None:
            continue
        found = {"rule": rule.group(1)}
        for key in ("wildcards", "resources"):
            line = re.search(rf"^\s+{key}: (.*)$", block, re.M)
            if line:
                found |= dict(kv.split("=", 1) for kv in line.group(1).split(", "))
        jobs.append(found)
    return jobs


def _write(tmp_path: Path, cfg: dict[str, Any]) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_exemplars_of_a_layer_without_a_map_ask_for_no_gpu(
    tmp_path: Path, job_env: dict[str, str]
) -> None:
    dry = run_snakemake(tmp_path, _write(tmp_path, config(device="auto")), "-n", env=job_env)
    gpus = {
        (j["rule"], j.get("layer", "")): j["gpu"]
        for j in _dry_jobs(dry.stdout + dry.stderr)
        if "gpu" in j
    }
    # conv2 has a spatial map: attention crops need the model; fc is a top-K lookup
    assert gpus[("exemplars", "conv2")] == "1" and gpus[("exemplars", "fc")] == "0"
    assert gpus[("activations", "")] == "1" and gpus[("scores", "fc")] == "1"
    assert gpus[("captions", "conv2")] == "0" and gpus[("synthesis", "conv2")] == "0"


def test_a_cpu_run_claims_no_gpu(tmp_path: Path, job_env: dict[str, str]) -> None:
    dry = run_snakemake(tmp_path, _write(tmp_path, config(device="cpu")), "-n", env=job_env)
    jobs = [j for j in _dry_jobs(dry.stdout + dry.stderr) if "gpu" in j]
    assert jobs and all(j["gpu"] == "0" for j in jobs)


def test_no_configfile_says_to_pass_one(tmp_path: Path, job_env: dict[str, str]) -> None:
    import subprocess

    from conftest import snakemake_command

    cmd = [a for a in snakemake_command(tmp_path, tmp_path / "unused.yaml", "-n")]
    at = cmd.index("--configfile")
    del cmd[at : at + 2]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=job_env, timeout=300)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "no config given: pass one with --configfile" in out
    # no default config was merged in: nothing else was read or written
    assert "ILSVRC2012" not in out and not (tmp_path / "results").exists()


@pytest.mark.parametrize("profile", ["local", "slurm"])
def test_command_line_resources_keep_the_gpu_limit(
    tmp_path: Path, job_env: dict[str, str], profile: str
) -> None:
    """`--resources llm_api=2` (as the README suggests) replaces the profile's map; the `gpu`
    limit the profiles rely on (one GPU job at a time locally, one GPU per SLURM group) comes
    back from the workflow. The limits show in the plan's view of this invocation."""
    cfg = _write(tmp_path, config(device="auto"))
    # the target first: --resources takes every word after it
    args = ("--profile", str(REPO / "profiles" / profile), "plan", "--resources", "llm_api=2")
    proc = run_snakemake(tmp_path, cfg, *args, env=job_env)
    plan = yaml.safe_load((tmp_path / "results" / "demo" / "plan.json").read_text())
    assert plan["cluster"]["limits"] == {"gpu": 1, "llm_api": 2}, proc.stdout
