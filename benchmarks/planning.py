"""Planning at scale: `snakemake -n` time and peak memory for a dissection of many neurons.

Builds a config whose target has `--neurons` neurons across `--layers` layers (a python: model
of wide Linear layers, inspected on the meta device like any target, so no weights are made),
with Describe-and-Dissect on, at the default chunk size, and times a dry run of the real
Snakefile under profiles/slurm in a fresh process. Prints wall seconds, peak memory (max RSS
of the snakemake process), the jobs it plans per rule, the SLURM jobs they make with the
profile's groups, and the part of a parse spent surveying the probe folder (listing, one stat per
file for the manifest's fingerprint).

    .venv/bin/python benchmarks/planning.py                 # 100,000 neurons, 4 layers
"""

from __future__ import annotations

import argparse
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

FACTORY = """
from torch import nn


class Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.layers = nn.ModuleList(nn.Linear(3, {width}) for _ in range({layers}))

    def forward(self, x):
        x = self.stem(x)
        return [layer(x) for layer in self.layers]


def build() -> nn.Module:
    return Wide()
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--neurons", type=int, default=100_000)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--images", type=int, default=50_000, help="probe files (empty PNGs)")
    parser.add_argument("--chunk-size", type=int, default=None, help="default: the config's")
    args = parser.parse_args()
    width = args.neurons // args.layers
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "wide.py").write_text(FACTORY.format(width=width, layers=args.layers))
        probe = root / "probe"
        probe.mkdir()
        Image.new("RGB", (8, 8)).save(probe / "0.png")
        for i in range(1, args.images):  # the planner only lists files; links are enough
            (probe / f"{i}.png").symlink_to(probe / "0.png")
        cfg = {
            "run": "scale",
            "targets": [
                {
                    "name": "wide",
                    "spec": f"python:{root / 'wide.py'}:build",
                    "layers": [f"layers.{i}" for i in range(args.layers)],
                }
            ],
            "probe": {"datasets": [{"name": "probe", "type": "folder", "path": str(probe)}]},
            "methods": ["topk", "dnd"],
            "llm": {"backend": "none"},
        }
        if args.chunk_size:
            cfg["chunk_size"] = args.chunk_size
        config = root / "config.yaml"
        config.write_text(yaml.safe_dump(cfg))
        cmd = [
            str(Path(sys.executable).parent / "snakemake"),
            "-n",
            "--quiet",
            "rules",
            "--snakefile",
            str(REPO / "Snakefile"),
            "--directory",
            str(root),
            "--configfile",
            str(config),
            "--profile",  # the cluster's: its groups are part of the DAG it builds
            str(REPO / "profiles" / "slurm"),
        ]
        for label in ("first (inspects the model)", "again (inspection cached)"):
            start = time.perf_counter()
            before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - start
            peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
            if proc.returncode:
                raise SystemExit(proc.stdout + proc.stderr)
            jobs = {
                m.group(1): int(m.group(2))
                for m in re.finditer(r"^(\w+)\s+(\d+)$", proc.stdout + proc.stderr, re.M)
            }
            total = jobs.pop("total", sum(jobs.values()))
            note = "" if before == 0 else " (max over both runs)"
            print(
                f"{label}: {wall:.1f} s, peak RSS {peak_mb:.0f} MB{note}, {total} jobs planned "
                f"for {width * args.layers} neurons and {args.images} probe files"
            )
        print("  jobs per rule: " + ", ".join(f"{k} {v}" for k, v in jobs.items()))
        slurm = slurm_jobs(jobs)
        print(
            f"  SLURM jobs with profiles/slurm: {slurm['total']} ("
            + ", ".join(f"{k} {v}" for k, v in slurm["submitted"].items())
            + ")"
        )
        print(f"  of which the probe survey: {survey_seconds(probe):.2f} s")
        ok = wall <= 30 and peak_mb <= 2048
        print(f"  target <= 30 s and <= 2 GB: {'met' if ok else 'NOT met'}")


def survey_seconds(probe: Path) -> float:
    """What a parse spends on the probe folder, in this process as in snakemake's: listing it,
    one stat per file for the manifest's fingerprint, counting image extensions (with loading
    Pillow's plugins once for their extensions)."""
    from neuroscribe.config import DatasetSpec
    from neuroscribe.probe import survey_probe

    start = time.perf_counter()
    survey_probe([DatasetSpec(name="probe", type="folder", path=str(probe))])
    return time.perf_counter() - start


# the methods the benchmark's config runs (their stages' groups and order)
METHODS = {"methods": ["topk", "dnd"]}


def slurm_jobs(jobs: dict[str, int]) -> dict:
    """What `snakemake plan --profile profiles/slurm` reports for these jobs (the same count,
    without needing a SLURM cluster to run the plan target)."""
    from neuroscribe.fanout import chunk_groups
    from neuroscribe.plan import cluster_jobs, stage_order

    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "profile.yaml").read_text())
    cluster = {
        "executor": "slurm",
        "remote": True,
        "groups": chunk_groups(METHODS),
        "local": ["all", "render_demo_probe", "evaluation_summary", "plan"],
        "group_components": profile["group-components"],
    }
    return cluster_jobs(jobs, cluster, stage_order(METHODS))


if __name__ == "__main__":
    main()
