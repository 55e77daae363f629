"""A real single-node SLURM cluster on this machine, for workflow tests (facts:
../shared/notes/slurm-local.md).

munged, slurmctld and slurmd from Debian's `munge` and `slurm-wlm` packages (`make test` installs
them when run as root). The node offers two fake GPUs (GRES backed by empty files), so GPU
requests are scheduled and visible in `scontrol show job`, while jobs run on the CPU. The
config is also written to /etc/slurm/slurm.conf because `srun` inside a batch job reads only
the default path; an existing file there is restored at the end.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
PARTITION = "gpu"  # the partition profiles/slurm asks for by default
SYSTEM_CONF = Path("/etc/slurm/slurm.conf")


def unavailable_reason() -> str | None:
    """Why a cluster cannot be started here, or None."""
    if os.geteuid() != 0:
        return "starting slurmctld/slurmd needs root"
    missing = [d for d in (*DAEMONS, "sbatch", "squeue", "scontrol") if shutil.which(d) is None]
    if missing:
        return (
            f"SLURM/munge not installed ({', '.join(missing)}); `make test` installs them as root"
        )
    return None


@dataclass(frozen=True)
class Cluster:
    root: Path

    def scontrol_job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o` as key=value pairs."""
        out = subprocess.run(
            ["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, check=True
        ).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def jobs(self) -> list[SlurmJob]:
        """Jobs squeue knows, with the rule or group each runs (from the plugin's comment)."""
        out = subprocess.run(
            ["squeue", "-h", "-o", "%i|%k|%T"], capture_output=True, text=True, check=True
        ).stdout
        jobs = []
        for line in out.splitlines():
            job_id, comment, state = line.split("|")
            rule = comment.removeprefix("rule_").split("_wildcards_")[0]
            jobs.append(SlurmJob(job_id, rule, state))
        return jobs

    def kill(self, job_id: str) -> None:
        """SIGKILL every process of the job, batch script included (a node lost mid-job)."""
        subprocess.run(["scancel", "--signal=KILL", "--full", job_id], check=True)

    def requeue(self, job_id: str) -> None:
        """Put a running job back in the queue, as preemption with requeue does."""
        subprocess.run(["scontrol", "requeue", job_id], check=True)


@dataclass(frozen=True)
class SlurmJob:
    id: str
    rule: str  # a rule name, or a group's name followed by its rules ("propose_captions_...")
    state: str


def _node_memory_mb() -> int:
    total_kb = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    return total_kb // 1024 - 2048  # leave room for the daemons and the test process


def _write_config(root: Path) -> Path:
    for d in ("state", "spool", "log"):
        (root / d).mkdir(parents=True, exist_ok=True)
    gpus = [root / f"fakegpu{i}" for i in range(2)]
    for g in gpus:
        g.touch()
    (root / "gres.conf").write_text(
        f"AutoDetect=off\nNodeName=localhost Name=gpu File={root}/fakegpu[0-1]\n"
    )
    conf = root / "slurm.conf"
    conf.write_text(
        "\n".join(
            [
                "ClusterName=neuroscribe-test",
                "SlurmctldHost=localhost",
                "SlurmUser=root",
                "AuthType=auth/munge",
                f"StateSaveLocation={root}/state",
                f"SlurmdSpoolDir={root}/spool",
                f"SlurmctldPidFile={root}/slurmctld.pid",
                f"SlurmdPidFile={root}/slurmd.pid",
                f"SlurmctldLogFile={root}/log/slurmctld.log",
                f"SlurmdLogFile={root}/log/slurmd.log",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core_Memory",
                "ReturnToService=2",
                "JobAcctGatherType=jobacct_gather/none",
                "AccountingStorageType=accounting_storage/none",
                "MinJobAge=3600",  # squeue (the status command) must still see finished jobs
                "SchedulerParameters=sched_interval=1",
                "GresTypes=gpu",
                f"NodeName=localhost CPUs={os.cpu_count()} RealMemory={_node_memory_mb()} "
                "Gres=gpu:2 State=UNKNOWN",
                f"PartitionName={PARTITION} Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
                "",
            ]
        )
    )
    return conf


def _start_munge() -> None:
    ok = subprocess.run("munge -n | unmunge", shell=True, capture_output=True, text=True)
    if "Success" in ok.stdout:
        return
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    subprocess.run(["su", "-s", "/bin/sh", "munge", "-c", "/usr/sbin/munged"], check=True)


def _wait_idle(timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = subprocess.run(
            ["sinfo", "-h", "-o", "%t"], capture_output=True, text=True
        ).stdout.strip()
        if state in ("idle", "mix", "alloc"):
            return
        time.sleep(0.5)
    raise RuntimeError(f"the SLURM node did not come up (state {state!r})")


@contextmanager
def slurm_cluster(root: Path) -> Iterator[Cluster]:
    conf = _write_config(root)
    system_files = {SYSTEM_CONF: conf, SYSTEM_CONF.parent / "gres.conf": root / "gres.conf"}
    backups = {f: f.read_bytes() if f.exists() else None for f in system_files}
    SYSTEM_CONF.parent.mkdir(parents=True, exist_ok=True)
    for dest, src in system_files.items():
        shutil.copy(src, dest)
    _start_munge()
    try:
        subprocess.run(["slurmctld", "-f", str(conf)], check=True)
        subprocess.run(["slurmd", "-f", str(conf)], check=True)
        _wait_idle()
        yield Cluster(root)
    finally:
        subprocess.run(["scancel", "--user", "root"], capture_output=True)
        for name in ("slurmd", "slurmctld"):
            pid_file = root / f"{name}.pid"
            if pid_file.exists():
                with suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
        for dest, backup in backups.items():
            if backup is None:
                dest.unlink(missing_ok=True)
            else:
                dest.write_bytes(backup)
