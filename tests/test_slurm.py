"""The workflow on a real single-node SLURM cluster started by the test (tests/slurm_cluster.py),
through `--profile profiles/slurm` as a user runs it: same table as a local run, every job asked
SLURM for the resources the config gives its stages, and runs whose jobs are killed or requeued
finish with one more invocation, losing nothing and paying no LLM reply twice.

The concepts come from an OpenAI-compatible server on 127.0.0.1 reached from the (single) compute
node, as an in-cluster vLLM server would be (`llm.run_on: compute`)."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from fake_openai import FakeOpenAI, Reply, fake_openai, labeller
from slurm_cluster import PARTITION, Cluster, SlurmJob, slurm_cluster, unavailable_reason

from conftest import REPO, run_snakemake, snakemake_command, workflow_env

pytestmark = [
    pytest.mark.slow,
    pytest.mark.slurm,
    # the drill (six invocations, 15 SLURM jobs) takes 12 min on an idle 2-core VM, most of it
    # the plugin's status checks, whose interval grows by 10 s while no job finishes: the
    # suite's 15-minute limit would fail it on a slower or busier machine
    pytest.mark.timeout(1800),
    pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason())),
]

PROFILE = str(REPO / "profiles" / "slurm")
# fast status polling: the plugin's defaults (40 s before the first check) suit a real cluster
SLURM_ARGS = (
    "--jobs",
    "4",
    "--slurm-status-command",
    "squeue",
    "--slurm-init-seconds-before-status-checks",
    "1",
    "--seconds-between-status-checks",
    "2",
    "--slurm-no-account",
    "--slurm-keep-successful-logs",  # their names hold the SLURM job ids the test inspects
)
CHUNK_STAGES = {"propose": ["exemplars", "captions", "concepts"], "select": ["synthesis", "scores"]}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with slurm_cluster(tmp_path_factory.mktemp("slurm")) as running:
        yield running


def _slow_labeller(body: dict[str, Any]) -> Reply:
    # a reply takes a moment, as a real model's does, so a job can be killed mid-request
    reply = labeller(body)
    assert isinstance(reply, Reply)
    return Reply(reply.text, delay_s=0.1)


@pytest.fixture(scope="module")
def llm() -> Iterator[FakeOpenAI]:
    with fake_openai(default=_slow_labeller) as server:
        yield server


def _config(workdir: Path, llm: FakeOpenAI) -> Path:
    cfg = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    cfg["targets"] = cfg["targets"][:1]  # the clean CNN (the demo's second has a shortcut)
    cfg["probe"]["datasets"][0]["n_images"] = 60
    # few jobs: each SLURM job costs seconds of start-up on this 2-core node
    cfg |= {"shard_size": 30, "chunk_size": 64, "top_k": 5, "save_every": 8}
    # one layer of 64 neurons, one chunk: each group job's steps cost seconds of start-up
    cfg["targets"][0]["layers"] = ["conv3"]
    cfg["targets"][0]["train"] = {"images": 400, "holdout": 100, "epochs": 2, "seed": 0}
    # the drills exercise the scheduler with the chunked method; the demo's per-layer method and
    # evaluation run in tests/test_workflow.py
    cfg["methods"] = ["topk", "dnd"]
    cfg["evaluation"] = {"enabled": False}
    cfg["llm"] = {
        "backend": "openai",
        "model": "fake-model",
        "base_url": llm.base_url,
        "api_key_env": None,
        "run_on": "compute",
        "max_concurrency": 4,
    }
    # `auto`: the stages whose backends run a model ask for a GPU (the node's fake GPUs), the
    # rest for none; the jobs then run on the CPU, as the node has no CUDA
    cfg["device"] = "auto"
    cfg["resources"]["exemplars"] |= {"mem_mb": 1500, "runtime": 7, "cpus": 1}
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _job_ids(workdir: Path, name: str) -> list[str]:
    """SLURM job ids of a rule's or group's jobs, from the plugin's log file names (%j.log)."""
    folders = [
        d
        for d in (workdir / ".snakemake" / "slurm_logs").iterdir()
        if d.name == f"rule_{name}" or d.name.startswith(f"group_{name}_")
    ]
    return sorted({p.stem for d in folders for p in d.rglob("*.log") if p.stem.isdigit()})


@pytest.fixture(scope="module")
def local_run(llm: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> Path:
    local = tmp_path_factory.mktemp("local")
    profile = str(REPO / "profiles" / "local")
    run_snakemake(local, _config(local, llm), "--profile", profile, env=workflow_env())
    return local


def _table(workdir: Path) -> pd.DataFrame:
    return pd.read_parquet(workdir / "results" / "demo" / "descriptions.parquet")


def _minutes(limit: str) -> int:
    hours, minutes, _ = (int(x) for x in limit.split(":"))
    return hours * 60 + minutes


def _gpus(job: dict[str, str]) -> int:
    found = re.search(r"gpu:(\d+)", job.get("TresPerJob", ""))
    return int(found.group(1)) if found else 0


# GPUs per job with `device: auto`: the demo target's stages use one; training (on the CPU),
# merging and the table use none
GPUS = {"train": 0, "activations": 1, "merge": 0, "describe": 0, "report": 0}


def test_each_job_asked_for_its_stage_resources(cluster: Cluster, drilled: Drilled) -> None:
    on_slurm = drilled.workdir
    config = yaml.safe_load((on_slurm / "config.yaml").read_text())["resources"]
    for rule, stage in [
        ("train_demo_target", "train"),
        ("activations", "activations"),
        ("merge_activations", "merge"),
        ("describe", "describe"),
        ("report", "report"),
    ]:
        ids = _job_ids(on_slurm, rule)
        assert ids, f"no SLURM job for {rule}"
        want = config[stage]
        for job_id in ids:
            job = cluster.scontrol_job(job_id)
            assert job["Partition"] == PARTITION
            assert job["MinMemoryNode"] == f"{want['mem_mb']}M", (rule, job["MinMemoryNode"])
            assert _minutes(job["TimeLimit"]) == want["runtime"], (rule, job["TimeLimit"])
            assert int(job["NumCPUs"]) == want["cpus"], (rule, job["NumCPUs"])
            assert _gpus(job) == GPUS[stage], (rule, job)
    # a group job runs its chunks' steps one after another on one GPU: the largest memory and
    # CPU count of its steps, their runtimes added up, one GPU (exemplars and scores use one),
    # also when the command line's --resources replaced the profile's (the drill passes one)
    for group, stages in CHUNK_STAGES.items():
        # its first job holds every step of both chunks (later ones only what a kill left)
        job = cluster.scontrol_job(min(_job_ids(on_slurm, group), key=int))
        want = [config[s] for s in stages]
        assert job["Partition"] == PARTITION
        mem = int(job["MinMemoryNode"].removesuffix("M"))
        assert max(w["mem_mb"] for w in want) <= mem <= 2 * sum(w["mem_mb"] for w in want)
        runtime = sum(w["runtime"] for w in want)
        assert runtime <= _minutes(job["TimeLimit"]) <= 2 * runtime, job["TimeLimit"]
        assert int(job["NumCPUs"]) >= max(w["cpus"] for w in want)
        assert _gpus(job) == 1, (group, job)


@pytest.mark.parametrize("run_on", ["compute", "head"])
def test_the_plan_counts_the_slurm_jobs_of_the_profile(
    cluster: Cluster, llm: FakeOpenAI, tmp_path: Path, run_on: str
) -> None:
    config = _config(tmp_path, llm)
    cfg = yaml.safe_load(config.read_text())
    cfg["llm"]["run_on"] = run_on
    config.write_text(yaml.safe_dump(cfg))
    proc = run_snakemake(
        tmp_path, config, "--profile", PROFILE, *SLURM_ARGS, "plan", env=workflow_env()
    )
    plan = json.loads((tmp_path / "results" / "demo" / "plan.json").read_text())["cluster"]
    assert plan["executor"] == "slurm" and plan["remote"]
    assert "slurm jobs submitted with this profile" in proc.stdout
    assert plan["submitted"]["select: synthesis+scores"] == 1
    assert plan["submitted"]["activations"] == 2
    if run_on == "compute":
        assert plan["submitted"]["propose: exemplars+captions+concepts"] == 1
        assert plan["on_head"] == ["render_demo_probe"]
    else:
        # an API the nodes cannot reach: the concept steps run where snakemake runs
        assert plan["submitted"]["propose: exemplars+captions"] == 1
        assert plan["on_head"] == ["render_demo_probe", "concepts"]


def _outputs_are_whole(results: Path) -> None:
    """Every file under an output name is complete: parquet footers and HDF5 files read."""
    for path in results.rglob("*.parquet"):
        if not any(part.startswith(".") for part in path.relative_to(results).parts):
            pq.read_metadata(path)
    for path in (results / "activations").rglob("*.h5"):
        with h5py.File(path, "r", locking=False):
            pass


class Drill:
    """Runs snakemake with the SLURM profile and disturbs one job while it runs."""

    def __init__(self, cluster: Cluster, workdir: Path, config: Path) -> None:
        self.cluster = cluster
        self.workdir = workdir
        self.config = config
        self.results = workdir / "results" / "demo"

    def run(self, acts: dict[str, Callable[[SlurmJob], bool]]) -> subprocess.CompletedProcess:
        """One invocation; for each rule or group in `acts`, its action is called on its running
        jobs until it returns True (it disturbed one). Returns the finished invocation."""
        # --retries 0: a killed job fails this invocation; the next one must finish the work.
        # --resources as the README suggests: it replaces the profile's whole map
        cmd = snakemake_command(
            self.workdir,
            self.config,
            "--profile",
            PROFILE,
            "--retries",
            "0",
            *SLURM_ARGS,
            "--resources",
            "llm_api=2",
        )
        proc = subprocess.Popen(
            cmd, env=workflow_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        output: list[str] = []
        reader = threading.Thread(target=lambda: output.extend(proc.stdout or []), daemon=True)
        reader.start()
        left = dict(acts)
        deadline = time.monotonic() + 400
        while proc.poll() is None and time.monotonic() < deadline:
            for job in self.cluster.jobs() if left else []:
                target = next((t for t in left if _is(job, t)), None)
                if job.state == "RUNNING" and target and left[target](job):
                    del left[target]
            time.sleep(0.1)
        proc.wait(timeout=60)
        reader.join(timeout=10)
        assert not left, f"no running {list(left)} job was disturbed:\n{''.join(output)[-3000:]}"
        return subprocess.CompletedProcess(cmd, proc.returncode, "".join(output), "")


def _is(job: SlurmJob, target: str) -> bool:
    return job.rule == target or (target in CHUNK_STAGES and job.rule.startswith(f"{target}_"))


@dataclass
class Drilled:
    """A run through profiles/slurm whose jobs were killed or requeued, stage after stage."""

    workdir: Path
    answered: list[dict[str, Any]]  # LLM requests answered to its jobs, in order
    abandoned: list[dict[str, Any]]  # requests whose job was killed before the reply
    requeued: list[str]


@pytest.fixture(scope="module")
def drilled(cluster: Cluster, llm: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> Drilled:
    workdir = tmp_path_factory.mktemp("drill")
    drill = Drill(cluster, workdir, _config(workdir, llm))
    results = drill.results
    first_request, answered, abandoned = (
        len(llm.requests),
        len(llm.answered),
        len(llm.abandoned),
    )

    def kill(job: SlurmJob) -> bool:
        cluster.kill(job.id)
        return True

    requeued: list[str] = []

    def requeue(job: SlurmJob) -> bool:
        # preemption with requeue: SLURM runs the job again by itself, in the same invocation
        cluster.requeue(job.id)
        requeued.append(job.id)
        return True

    def kill_during_concepts(job: SlurmJob) -> bool:
        # hold the server's replies while requests are in flight, then kill: those replies never
        # reach the job, the ones before are in its cache
        if len(llm.requests) - first_request < 10:
            return False
        llm.gate.clear()
        time.sleep(0.5)
        cluster.kill(job.id)
        time.sleep(1.0)
        llm.gate.set()
        return True

    def kill_after_saved_scores(job: SlurmJob) -> bool:
        return any((results / "scores").rglob(".*.progress/part-*.parquet")) and kill(job)

    # each invocation kills a job of the next stage, so the one after must get past it
    for acts in [
        {"train_demo_target": requeue, "activations": kill},
        {"merge_activations": kill},
        {"propose": kill_during_concepts},
        {"select": kill_after_saved_scores},
        {"describe": kill},
    ]:
        proc = drill.run(acts)
        assert proc.returncode != 0, f"a {list(acts)[-1]} job was killed, yet the run succeeded"
        _outputs_are_whole(results)
    # one more invocation after the last kill finishes the run
    run_snakemake(workdir, drill.config, "--profile", PROFILE, *SLURM_ARGS, env=workflow_env())
    _outputs_are_whole(results)
    return Drilled(workdir, llm.answered[answered:], llm.abandoned[abandoned:], requeued)


def test_killed_and_requeued_jobs_finish_with_one_more_invocation(
    drilled: Drilled, local_run: Path
) -> None:
    # the same table as an undisturbed local run
    pd.testing.assert_frame_equal(_table(drilled.workdir), _table(local_run))
    table = _table(drilled.workdir)
    assert set(table["method"]) == {"topk", "dnd"} and table["label"].notna().sum() == 64


def test_the_requeued_job_ran_again_under_slurm(cluster: Cluster, drilled: Drilled) -> None:
    (job_id,) = drilled.requeued
    job = cluster.scontrol_job(job_id)
    assert job["Restarts"] == "1" and job["JobState"] == "COMPLETED"


def test_no_llm_reply_was_paid_for_twice(drilled: Drilled) -> None:
    # every request answered to a job was asked once, one per neuron; the requests whose job
    # was killed before their reply arrived were asked again (nothing had come back to keep)
    answered = [json.dumps(b, sort_keys=True) for b in drilled.answered]
    assert len(answered) == len(set(answered)) == 64
    assert drilled.abandoned, "no request was in flight when the concepts job was killed"
    assert {json.dumps(b, sort_keys=True) for b in drilled.abandoned} <= set(answered)


def test_a_chunk_job_killed_after_some_neurons_scores_only_the_rest(drilled: Drilled) -> None:
    logs = drilled.workdir / "results" / "demo" / "logs" / "scores" / "shapenet"
    log = (logs / "conv3" / "0000.log").read_text()
    resumed = re.search(r"progress: (\d+) of 64 neurons from the progress record, (\d+) to", log)
    assert resumed and int(resumed.group(1)) > 0 and int(resumed.group(2)) < 64, log
    assert "part 1 of 8 saved" not in log
