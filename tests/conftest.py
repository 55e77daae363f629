"""Shared fixtures. Tests never touch the network: hubs are switched off and any connection to a
non-loopback address fails at once instead of hanging."""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
_connect = socket.socket.connect


def _loopback_only(self: socket.socket, address: object) -> object:
    host = address[0] if isinstance(address, tuple) else None
    if host is not None and self.family in (socket.AF_INET, socket.AF_INET6):
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if not loopback:
            raise OSError(f"network blocked in tests: connection to {host}")
    return _connect(self, address)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket.socket, "connect", _loopback_only)


def workflow_env() -> dict[str, str]:
    """Environment for workflow subprocesses: this interpreter's `python` first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    return env


@pytest.fixture
def job_env() -> dict[str, str]:
    return workflow_env()


def snakemake_command(workdir: Path, configfile: Path, *args: str) -> list[str]:
    """The snakemake CLI running the real Snakefile in `workdir`."""
    return [
        str(Path(sys.executable).parent / "snakemake"),
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(configfile),
        "--cores",
        "2",
        *args,
    ]


def run_snakemake(
    workdir: Path, configfile: Path, *args: str, env: dict[str, str], check: bool = True
) -> subprocess.CompletedProcess[str]:
    """The real Snakefile through the snakemake CLI, in `workdir`."""
    cmd = snakemake_command(workdir, configfile, *args)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _parent_of(pid: int) -> int | None:
    """The parent pid of `pid` from /proc, or None if it has exited."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes().decode(errors="replace")
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and ")", so fields start after the last ")"
    return int(stat[stat.rindex(")") + 1 :].split()[1])


def descendants(pid: int) -> list[int]:
    """Every living process below `pid` (its children, theirs, ...), found by walking /proc, so a
    test signals only processes it started itself, never other runs or users on the machine."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (parent := _parent_of(int(entry.name))) is not None:
            children.setdefault(parent, []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def command_line(pid: int) -> list[str]:
    """The arguments `pid` was started with ([] if it has exited)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    # each argument ends with a NUL (a process that rewrote its title may drop the last one)
    return raw.removesuffix(b"\0").decode(errors="replace").split("\0") if raw else []


def tiny_config(probe_root: Path) -> dict[str, object]:
    """A complete, light config: the demo CNN's architecture (random weights) on a folder of
    images, exemplars only; run `probe`, so its manifest is results/probe/probe/manifest.parquet."""
    return {
        "run": "probe",
        "targets": [
            {
                "name": "net",
                "spec": "python:neuroscribe.demo.cnn:tiny_cnn",
                "transform": {"resize": 64, "crop": 64},
                "layers": ["conv2"],
            }
        ],
        "probe": {"datasets": [{"name": "pics", "type": "folder", "path": str(probe_root)}]},
        "methods": ["topk"],
        "device": "cpu",
        # the report has its own tests (test_report.py, test_workflow.py)
        "report": {"enabled": False},
    }
