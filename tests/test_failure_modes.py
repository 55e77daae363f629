"""Failure modes that docs/failure-modes.md lists and no other test file covers: LLM servers that
refuse a request or are not running, a failed neuron in the final table and the end-of-run
summary, table writes cut short by a full disk or a kill, two snakemake runs in one folder, a
read-only results folder, images too large to decode, models that cannot be built, a CUDA device
that is not there, the SLURM profile's first status check, and the tests' own network block."""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from fake_openai import FakeOpenAI, Reply, Status, fake_openai
from PIL import Image

from conftest import (
    REPO,
    command_line,
    descendants,
    snakemake_command,
    tiny_config,
    workflow_env,
)
from neuroscribe.backends.llm import ChatRequest, LLMClient, LLMError, OpenAIBackend

MODEL = "fake-model"


def _client(base_url: str, max_attempts: int = 3) -> tuple[LLMClient, list[float]]:
    sleeps: list[float] = []
    backend = OpenAIBackend(base_url, MODEL, api_key_env=None, timeout_s=5)
    return LLMClient(backend, None, max_attempts=max_attempts, sleep=sleeps.append), sleeps


# -- LLM servers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (401, "Incorrect API key provided"),
        (403, "Project does not have access to this model"),
        (404, "The model `gpt-5-nano` does not exist"),
    ],
    ids=["401", "403", "404"],
)
def test_a_server_that_refuses_the_request_fails_at_once(code: int, message: str) -> None:
    with fake_openai(Status(code, message)) as server:
        client, sleeps = _client(server.base_url)
        with pytest.raises(LLMError) as err:
            client.chat(ChatRequest.of(MODEL, "hi"))
        assert len(server.requests) == 1 and sleeps == []  # not retried: it would not help
    assert err.value.status == code and err.value.attempts == 1
    assert str(err.value) == (
        f"openai:{server.base_url}: request failed, not retryable: HTTP {code}: {message}"
    )


def test_a_base_url_without_the_api_path_fails_at_once_with_404() -> None:
    # `base_url: http://host:8000` instead of `http://host:8000/v1`: the server answers 404
    with FakeOpenAI() as server:
        base = server.base_url.removesuffix("/v1")
        client, sleeps = _client(base)
        with pytest.raises(LLMError, match=r"not retryable: HTTP 404: not found") as err:
            client.chat(ChatRequest.of(MODEL, "hi"))
        assert server.requests == [] and sleeps == []  # no chat request reached the API path
    assert err.value.status == 404 and err.value.attempts == 1


def test_a_server_that_is_not_running_is_retried_then_named() -> None:
    with socket.socket() as probe:  # a port on 127.0.0.1 where nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client, sleeps = _client(f"http://127.0.0.1:{port}/v1", max_attempts=3)
    with pytest.raises(LLMError) as err:
        client.chat(ChatRequest.of(MODEL, "hi"))
    assert len(sleeps) == 2 and all(s > 0 for s in sleeps)  # backed off between the attempts
    assert err.value.attempts == 3 and err.value.status is None
    assert str(err.value).startswith(
        f"openai:http://127.0.0.1:{port}/v1: gave up after 3 attempts; last error: "
        "APIConnectionError: Connection error."
    )


# -- failed neurons in the final table --------------------------------------------------------


def _chunk_tables(root: Path) -> dict[str, list[Path]]:
    """The chunk tables of one layer of two neurons, as the stages write them: neuron 0 got a
    label, neuron 1 failed in its concepts step (its scores carry the concepts' error)."""
    chunk = Path("m") / "conv" / "0000.parquet"
    paths = {s: root / s / chunk for s in ("exemplars", "captions", "concepts", "synthesis")}
    paths["scores"] = root / "scores" / chunk
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    key = {"model": "m", "layer": "conv"}
    exemplars = [
        key | {"neuron": n, "rank": r, "image_id": f"img{n}{r}", "row": r, "box": None}
        for n in (0, 1)
        for r in (0, 1)
    ]
    pd.DataFrame([e | {"activation": 2.0 - e["rank"]} for e in exemplars]).to_parquet(
        paths["exemplars"]
    )
    pd.DataFrame(
        [e | {"caption": f"a red thing {e['rank']}", "captioner": "annotations"} for e in exemplars]
    ).to_parquet(paths["captions"])
    pd.DataFrame(
        [key | {"neuron": n, "proposer": "batched:openai:http://llm/v1:m"} for n in (0, 1)]
    ).to_parquet(paths["concepts"])
    pd.DataFrame(
        {"concept": ["red thing"], "synthesizer": ["procedural:world-v1@64px"]}
    ).to_parquet(paths["synthesis"])
    error = "concepts: openai:http://llm/v1: malformed reply after one repair: expected an object"
    scores = [
        key
        | {
            "neuron": 0,
            "status": "ok",
            "error": None,
            "label": "red thing",
            "labels": ["red thing"],
            "score": 0.5,
            "score_kind": "combined",
            "candidates": ["red thing"],
            "rank_scores": [1.0],
            "similarities": [0.5],
            "combined": [0.5],
            "n_images": [4],
            "similarity_model": "target-features:penultimate",
        },
        key
        | {
            "neuron": 1,
            "status": "failed",
            "error": error,
            "label": None,
            "labels": [],
            "score": None,
            "score_kind": None,
            "candidates": [],
            "rank_scores": [],
            "similarities": [],
            "combined": [],
            "n_images": [],
            "similarity_model": None,
        },
    ]
    pd.DataFrame(scores).to_parquet(paths["scores"])
    return {stage: [path] for stage, path in paths.items()}


def test_a_failed_neuron_is_in_the_table_and_in_the_end_of_run_summary(tmp_path: Path) -> None:
    from neuroscribe.describe import failure_summary, write_descriptions

    tables = _chunk_tables(tmp_path / "results")
    out = tmp_path / "results" / "descriptions.parquet"
    details = tmp_path / "results" / "descriptions" / "dnd"
    write_descriptions(
        tables.pop("exemplars"),
        {"dnd": tables},
        {"m": "torchvision:resnet18@IMAGENET1K_V1"},
        ["topk", "dnd"],
        out,
        out.with_suffix(".csv"),
        {"dnd": {"parquet": details.with_suffix(".parquet"), "csv": details.with_suffix(".csv")}},
    )
    table = pd.read_parquet(out).set_index(["method", "neuron"])
    assert (table.loc["dnd", 0]["status"], table.loc["dnd", 0]["label"]) == ("ok", "red thing")
    failed = table.loc["dnd", 1]
    assert failed["status"] == "failed" and pd.isna(failed["label"])
    assert "malformed reply after one repair" in failed["error"]
    assert list(failed["exemplar_ids"]) == ["img10", "img11"]  # the exemplars are still there
    assert (table.loc["topk"]["status"] == "ok").all()

    assert failure_summary(out, "results/x/logs") == (
        f"dnd: 1 of 2 neurons described, 1 failed: see the `status` and `error` columns of {out} "
        "and the job logs under results/x/logs/"
    )


# -- writes cut short -------------------------------------------------------------------------


def test_a_table_write_cut_short_by_a_full_disk_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyarrow.parquet as pq

    from neuroscribe.tables import write_table

    rows = pd.DataFrame(
        {
            "image_id": ["a" * 16],
            "path": ["/x.png"],
            "dataset": ["d"],
            "label": [None],
            "width": [4],
            "height": [4],
        }
    )
    out = tmp_path / "probe" / "manifest.parquet"
    write_table(rows, out, "manifest")
    before = out.read_bytes()
    real = pq.write_table

    def disk_fills(table: Any, where: Any, **kwargs: Any) -> None:
        Path(where).write_bytes(b"PAR1 half a table")  # some bytes got out before the disk filled
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pq, "write_table", disk_fills)
    with pytest.raises(OSError) as err:
        write_table(pd.concat([rows, rows.assign(image_id="b" * 16)]), out, "manifest")
    assert err.value.errno == errno.ENOSPC
    assert out.read_bytes() == before  # the last complete file, untouched
    assert not list(out.parent.glob(".*.tmp-*"))  # and no half-written file beside it
    out.unlink()
    with pytest.raises(OSError):
        write_table(rows, out, "manifest")
    assert not out.exists() and not list(out.parent.glob(".*.tmp-*"))

    monkeypatch.setattr(pq, "write_table", real)  # space freed: the next write is whole
    write_table(rows, out, "manifest")
    assert pd.read_parquet(out)["image_id"].tolist() == ["a" * 16]


KILLED_MID_WRITE = """
import os, signal, sys
from neuroscribe.io import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    with open(tmp, "w") as f:
        f.write("half of it")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_job_killed_while_writing_leaves_nothing_under_the_final_name(tmp_path: Path) -> None:
    out = tmp_path / "shard-0000.h5"
    job = subprocess.run(
        [sys.executable, "-c", KILLED_MID_WRITE, str(out)], env=workflow_env(), timeout=60
    )
    assert job.returncode == -signal.SIGKILL
    assert not out.exists()  # a rerun sees the output as missing, never as done


# -- two runs, read-only folders --------------------------------------------------------------


def _probe_config(tmp_path: Path) -> Path:
    """A light config (the demo CNN's architecture on 6 small images) whose manifest is the job."""
    pics = tmp_path / "pics"
    pics.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        pixels = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(pics / f"{i}.png")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_config(pics)))
    return path


MANIFEST = "results/probe/probe/manifest.parquet"


def _run(cmd: list[str], *extra: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [*cmd, *extra], capture_output=True, text=True, env=workflow_env(), timeout=300
    )
    proc.stdout += proc.stderr
    return proc


def _start_and_wait_for_the_lock(workdir: Path, cmd: list[str]) -> subprocess.Popen[bytes]:
    """Start snakemake; return once it holds its lock on the working directory."""
    first = subprocess.Popen(
        cmd, env=workflow_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    locks = workdir / ".snakemake" / "locks"
    deadline = time.monotonic() + 240
    while not any(locks.glob("*.lock")):
        assert first.poll() is None, "the first run ended before it locked the folder"
        assert time.monotonic() < deadline, "the first run never locked the folder"
        time.sleep(0.01)
    return first


def test_a_second_run_in_the_same_folder_stops_at_the_lock(tmp_path: Path) -> None:
    config = _probe_config(tmp_path)
    cmd = snakemake_command(tmp_path, config, MANIFEST)
    first = _start_and_wait_for_the_lock(tmp_path, cmd)
    os.kill(first.pid, signal.SIGSTOP)  # it holds the lock for as long as this test needs
    try:
        second = _run(cmd)
        assert second.returncode != 0
        assert "LockException" in second.stdout
        assert "Directory cannot be locked" in second.stdout and str(tmp_path) in second.stdout
        # a dry run (to see what is left) is allowed beside a running one; it only warns
        dry = _run(cmd, "-n")
        assert dry.returncode == 0, dry.stdout
        assert "Another Snakemake instance is running" in dry.stdout
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert first.wait(timeout=300) == 0  # the first run was not disturbed
    assert (tmp_path / MANIFEST).exists() and not any((tmp_path / ".snakemake/locks").glob("*"))


def test_a_lock_left_by_a_killed_snakemake_is_removed_with_unlock(tmp_path: Path) -> None:
    config = _probe_config(tmp_path)
    cmd = snakemake_command(tmp_path, config, MANIFEST)
    first = _start_and_wait_for_the_lock(tmp_path, cmd)
    below = descendants(first.pid)  # its jobs, if any started: found before they are orphaned
    first.kill()  # kill -9 of snakemake itself (a closed terminal, a rebooted login node)
    first.wait(timeout=60)
    for pid in below:  # only the processes this test started
        if command_line(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert any((tmp_path / ".snakemake" / "locks").glob("*.lock"))

    # it stops at the lock, or (when the job had started) at the incomplete output it left:
    # either way without running, saying what to do
    stale = _run(cmd)
    assert stale.returncode != 0
    assert ("Directory cannot be locked" in stale.stdout and "--unlock" in stale.stdout) or (
        "Incomplete files" in stale.stdout and "--rerun-incomplete" in stale.stdout
    ), stale.stdout
    unlock = _run(cmd, "--unlock")
    assert unlock.returncode == 0, unlock.stdout
    again = _run(cmd, "--rerun-incomplete")
    assert again.returncode == 0, again.stdout
    assert len(pd.read_parquet(tmp_path / MANIFEST)) == 6


def _without_permission_override() -> list[str]:
    """A command prefix under which folder permissions apply: none for a normal user; for root,
    setpriv dropping the capabilities that let root write anywhere."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: read-only folders cannot be made")
    prefix = [
        setpriv,
        "--bounding-set=-dac_override,-dac_read_search",
        "--inh-caps=-dac_override,-dac_read_search",
        "--",
    ]
    probe = subprocess.run([*prefix, "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"setpriv cannot drop capabilities here: {probe.stderr.decode()[:200]}")
    return prefix


def test_a_read_only_results_folder_fails_before_any_job_naming_the_folder(
    tmp_path: Path,
) -> None:
    config = _probe_config(tmp_path)
    results = tmp_path / "results"
    results.mkdir()
    results.chmod(0o555)
    try:
        cmd = [*_without_permission_override(), *snakemake_command(tmp_path, config, MANIFEST)]
        proc = _run(cmd)
    finally:
        results.chmod(0o755)
    assert proc.returncode != 0
    # when the workflow is parsed: the model inspection cannot be cached under results/{run}/
    assert "cannot write results/probe/inspect/" in proc.stdout
    assert "(Permission denied): neuroscribe keeps everything under results/{run}/" in proc.stdout
    assert list(results.iterdir()) == []


# -- probe images -----------------------------------------------------------------------------


def _png_header(width: int, height: int) -> bytes:
    """A PNG file of a few dozen bytes that says it is `width`×`height` (and holds no pixels)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_an_image_too_large_to_decode_safely_is_rejected_unread(tmp_path: Path) -> None:
    from neuroscribe.config import DatasetSpec
    from neuroscribe.probe import build_manifest

    root = tmp_path / "images"
    root.mkdir()
    (root / "big.png").write_bytes(_png_header(10_000, 10_000))  # 100 megapixels
    (root / "huge.png").write_bytes(_png_header(30_000, 30_000))  # 900 megapixels
    Image.new("RGB", (20, 10), (200, 10, 10)).save(root / "photo.png")
    results = tmp_path / "results"
    manifest, rejected = results / "manifest.parquet", results / "rejected.parquet"
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    counts = build_manifest(
        [DatasetSpec(name="d", type="folder", path=str(root))], results, manifest, rejected
    )

    assert counts == (1, 2)
    # refused from the header: 900 megapixels of 8 bits would have been 900 MB
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 300_000  # KiB
    table = pd.read_parquet(rejected)
    why = dict(zip(table["path"], table["reason"], strict=True))
    assert why[str(root / "big.png")] == (
        "DecompressionBombWarning: Image size (100000000 pixels) exceeds limit of 89478485 "
        "pixels, could be decompression bomb DOS attack."
    )
    assert why[str(root / "huge.png")].startswith(
        "DecompressionBombError: Image size (900000000 pixels) exceeds limit of 178956970 pixels"
    )


# -- models and devices -----------------------------------------------------------------------


FACTORIES = """
import torch

def not_a_module():
    return 3

def a_module():
    return torch.nn.Linear(2, 2)
"""


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("torchvision:resnet5O", "torchvision has no model 'resnet5O'; closest: resnet50"),
        ("python:no_such_package.models:net", "python target: cannot import module "),
        ("python:{tmp}/missing.py:net", "python target: file '{tmp}/missing.py' does not exist"),
        ("python:{tmp}/factories.py:net", "python target: '{tmp}/factories.py' has no callable"),
        ("python:{tmp}/factories.py:not_a_module", "the factory returned int, not a torch.nn"),
    ],
    ids=["torchvision-typo", "no-module", "no-file", "no-factory", "not-a-module"],
)
def test_a_model_that_cannot_be_built_is_named(tmp_path: Path, spec: str, message: str) -> None:
    from neuroscribe.config import ConfigError, TargetSpec, targets_from_config, validate_config
    from neuroscribe.models import build_target

    (tmp_path / "factories.py").write_text(FACTORIES)
    cfg = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    base = targets_from_config(validate_config(cfg))[0].to_dict()
    target = TargetSpec.from_dict(
        base | {"spec": spec.format(tmp=tmp_path), "weights": None, "train": None}
    )
    with pytest.raises(ConfigError) as err:
        build_target(target, load_weights=False)
    assert message.format(tmp=tmp_path) in str(err.value)


def test_device_cuda_on_a_node_without_cuda_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from neuroscribe.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"config device is 'cuda' but this node has no CUDA"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"  # `auto` falls back to the CPU


# -- cluster ----------------------------------------------------------------------------------


def test_the_slurm_profile_checks_status_soon_after_the_start() -> None:
    """The SLURM plugin's first status check comes 40 s after the start by default, and no run
    (`snakemake plan` included) can end before it; the profile brings it down to seconds."""
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "profile.yaml").read_text())
    assert profile["executor"] == "slurm"
    assert profile["slurm-init-seconds-before-status-checks"] <= 5


# -- the tests themselves ---------------------------------------------------------------------


def test_tests_cannot_reach_the_network() -> None:
    start = time.monotonic()
    with socket.socket() as s, pytest.raises(OSError, match="network blocked in tests"):
        s.connect(("192.0.2.1", 443))  # TEST-NET-1: would hang, not fail, if it were tried
    assert time.monotonic() - start < 1
    with fake_openai(Reply("ok")) as server:  # loopback stays open for the fake servers
        client, _ = _client(server.base_url)
        assert client.chat(ChatRequest.of(MODEL, "hi")).text == "ok"
