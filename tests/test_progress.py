"""Progress records: a chunk job killed part-way resumes from the neurons it had saved."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import (
    REPO,
    command_line,
    descendants,
    run_snakemake,
    snakemake_command,
    workflow_env,
)
from neuroscribe.progress import ProgressRecord, rows_in_parts, write_from_record
from neuroscribe.tables import to_arrow


def _rows(part: list[int]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "model": "m",
            "layer": "l",
            "neuron": part,
            "rank": 0,
            "image_id": [f"img{n}" for n in part],
            "row": part,
            "box": [None] * len(part),
            "activation": [float(n) for n in part],
        }
    )


def test_a_killed_job_computes_only_the_parts_it_had_not_saved(tmp_path: Path) -> None:
    out = tmp_path / "0000.parquet"
    inputs = [tmp_path / "in.txt"]
    inputs[0].write_text("x")
    record = ProgressRecord.beside(out, {"k": 1}, inputs)
    computed: list[list[int]] = []

    def dies_on_third_part(part: list[int]) -> pd.DataFrame:
        if len(computed) == 2:
            raise KeyboardInterrupt("killed")
        computed.append(part)
        return _rows(part)

    with pytest.raises(KeyboardInterrupt):
        rows_in_parts(list(range(10)), 3, record, dies_on_third_part, "exemplars")
    assert computed == [[0, 1, 2], [3, 4, 5]] and not out.exists()

    computed.clear()
    again = ProgressRecord.beside(out, {"k": 1}, inputs)
    table, resumed = rows_in_parts(list(range(10)), 3, again, dies_on_third_part, "exemplars")
    assert computed == [[6, 7, 8], [9]]
    assert (resumed.neurons, resumed.from_record, resumed.computed) == (10, 6, 4)
    assert table.column("neuron").to_pylist() == list(range(10))
    write_from_record(table, out, again)
    assert pd.read_parquet(out)["neuron"].tolist() == list(range(10))
    assert not again.folder.exists()


@pytest.mark.parametrize("change", ["args", "input"])
def test_a_record_from_other_settings_or_inputs_is_discarded(tmp_path: Path, change: str) -> None:
    out = tmp_path / "0000.parquet"
    source = tmp_path / "in.txt"
    source.write_text("x")
    first = ProgressRecord.beside(out, {"k": 1}, [source])
    first.open()
    first.save(0, to_arrow(_rows([0, 1]), "exemplars"))
    if change == "args":
        later = ProgressRecord.beside(out, {"k": 2}, [source])
    else:
        source.write_text("rewritten by its stage")
        later = ProgressRecord.beside(out, {"k": 1}, [source])
    seen: list[list[int]] = []
    _, resumed = rows_in_parts([0, 1], 2, later, lambda p: seen.append(p) or _rows(p), "exemplars")
    assert seen == [[0, 1]] and resumed.from_record == 0


def test_an_input_rewritten_with_the_same_contents_keeps_the_record(tmp_path: Path) -> None:
    source = tmp_path / "in.txt"
    source.write_text("x")
    first = ProgressRecord.beside(tmp_path / "0000.parquet", {"k": 1}, [source])
    first.open()
    first.save(0, to_arrow(_rows([0, 1]), "exemplars"))
    source.unlink()
    source.write_text("x")  # its upstream job ran again after a preemption
    later = ProgressRecord.beside(tmp_path / "0000.parquet", {"k": 1}, [source])
    _, resumed = rows_in_parts([0, 1], 2, later, lambda p: pytest.fail("recomputed"), "exemplars")
    assert resumed.from_record == 2


def test_descendants_are_the_processes_a_test_started_and_no_others(tmp_path: Path) -> None:
    # a grandchild whose name holds spaces and parentheses, as /proc/PID/stat's comm may
    odd = tmp_path / "sl) 1 (eep"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", odd)
    tree = subprocess.Popen(["sh", "-c", 'sh -c "\\"$0\\" 30; true" & wait', str(odd)])
    unrelated = subprocess.Popen(["sleep", "30"])  # a sibling: not below `tree`
    found: list[int] = []
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(
            command_line(p)[:1] == [str(odd)] for p in found
        ):
            time.sleep(0.02)
            found = descendants(tree.pid)
        assert [command_line(p) for p in found] == [
            ["sh", "-c", f'"{odd}" 30; true'],
            [str(odd), "30"],
        ]
        assert unrelated.pid not in found and tree.pid not in found
        assert descendants(unrelated.pid) == []
    finally:
        for pid in [*found, tree.pid, unrelated.pid]:  # only the processes this test started
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        tree.wait()
        unrelated.wait()


def _config(workdir: Path) -> Path:
    cfg = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    cfg["targets"] = cfg["targets"][:1]  # the clean CNN (the demo's second has a shortcut)
    cfg["probe"]["datasets"][0]["n_images"] = 60
    cfg |= {"shard_size": 60, "chunk_size": 64, "top_k": 5, "save_every": 2}
    cfg["targets"][0]["layers"] = ["conv3"]
    cfg["targets"][0].pop("train")  # random weights: resuming does not need a trained CNN
    # the stages that keep progress records (exemplars, and Describe-and-Dissect's scores) and
    # what reads them; the other methods and the evaluation add time, not coverage
    cfg["methods"] = ["topk", "dnd"]
    cfg["evaluation"]["enabled"] = False
    path = workdir / "config.yaml"
    cfg["report"] = {"enabled": False}  # the drill is about the chunk jobs
    path.write_text(yaml.safe_dump(cfg))
    return path


def _stage_jobs(snakemake: int, stage: str) -> list[int]:
    """The processes running `stage` (`python -m neuroscribe STAGE` and the shell around it) that
    the snakemake process `snakemake` started; never another run's jobs on the same machine."""
    wanted = f"-m neuroscribe {stage} "
    return [p for p in descendants(snakemake) if wanted in " ".join(command_line(p)) + " "]


def _kill_stage_when_saved(stage: str, record: Path, cmd: list[str], env: dict[str, str]) -> int:
    """Run snakemake; SIGKILL its job process for the stage once the first part is saved."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    killed = False
    while proc.poll() is None and time.monotonic() < deadline:
        if not killed and any(record.glob("part-*.parquet")):
            job = _stage_jobs(proc.pid, stage)
            for pid in job:
                with contextlib.suppress(ProcessLookupError):  # exited since it was found
                    os.kill(pid, signal.SIGKILL)
            killed = bool(job)
        time.sleep(0.01)
    assert killed, f"the {stage} job finished before it could be killed"
    return proc.wait(timeout=300)


@pytest.mark.slow
def test_chunk_jobs_killed_part_way_resume_where_they_stopped(tmp_path: Path) -> None:
    env = workflow_env()
    config = _config(tmp_path)
    run_snakemake(tmp_path, config, env=env)
    results = tmp_path / "results" / "demo"
    undisturbed = pd.read_parquet(results / "descriptions.parquet")
    cmd = snakemake_command(tmp_path, config)
    for stage in ("exemplars", "scores"):
        out = results / stage / "shapenet" / "conv3" / "0000.parquet"
        out.unlink()
        record = out.with_name(".0000.progress")
        assert _kill_stage_when_saved(stage, record, cmd, env) != 0
        assert not out.exists(), "a killed job left its output under the final name"
        saved = len(list(record.glob("part-*.parquet")))
        assert 0 < saved < 32

        run_snakemake(tmp_path, config, "--rerun-incomplete", env=env)
        log = (results / "logs" / stage / "shapenet" / "conv3" / "0000.log").read_text()
        done = 2 * saved
        resumed = f"progress: {done} of 64 neurons from the progress record, {64 - done} to compute"
        assert resumed in log, log
        assert "part 1 of 32 saved" not in log  # the saved parts were not computed again
        assert not record.exists()
        table = pd.read_parquet(results / "descriptions.parquet")
        pd.testing.assert_frame_equal(table, undisturbed)
