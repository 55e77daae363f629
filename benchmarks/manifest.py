"""Probe manifest at scale: what hashing every file (to reject byte-identical duplicates) costs.

Renders N probe images (the demo world's 64 px PNGs by default, or photo-like JPEGs) with
`make_probe` from benchmarks/activations.py, then times `neuroscribe.probe.build_manifest` over
them with `--workers` processes, as the probe_manifest job runs it: once as it is ("hashing"), and
once with the hash swapped for a stand-in that reads nothing ("no hashing": each file's own path,
unique, so no file is rejected as a duplicate in either mode). The modes alternate for
`--repeats` rounds and the best of each is reported (other work on the machine only ever makes a
run slower). Also timed: the hash alone over every file, in this one process.

    .venv/bin/python benchmarks/manifest.py                    # 50,000 64 px PNGs, 2 workers
    .venv/bin/python benchmarks/manifest.py --images 5000 --image-px 500x375 --image-format jpeg
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path

from activations import make_probe  # benchmarks/activations.py: the same probe images

from neuroscribe import probe
from neuroscribe.config import DatasetSpec


def cpu_seconds() -> float:
    """User + system CPU of this process and its finished children (the pool's workers)."""
    own, children = (
        resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed_manifest(dataset: DatasetSpec, work: Path, workers: int) -> tuple[float, float, int]:
    """Wall and CPU seconds of one `build_manifest` (as the job runs it), and files accepted."""
    start, cpu = time.perf_counter(), cpu_seconds()
    accepted, _ = probe.build_manifest(
        [dataset], work, work / "manifest.parquet", work / "rejected.parquet", workers=workers
    )
    return time.perf_counter() - start, cpu_seconds() - cpu, accepted


def compare(
    dataset: DatasetSpec, work: Path, workers: int, repeats: int
) -> dict[str, tuple[float, float]]:
    """Best wall and best CPU seconds of the manifest with and without hashing, alternating the
    modes. CPU time is the steadier number on a shared machine: others' work adds only wall."""
    real_digest = probe.file_digest
    best = {"hashing": (float("inf"),) * 2, "no hashing": (float("inf"),) * 2}
    for _ in range(repeats):
        for mode in best:
            # the workers are forked, so they see the module as patched here
            probe.file_digest = real_digest if mode == "hashing" else str
            try:
                wall, cpu, accepted = timed_manifest(dataset, work, workers)
            finally:
                probe.file_digest = real_digest
            best[mode] = (min(best[mode][0], wall), min(best[mode][1], cpu))
            print(f"  {mode:<10} {wall:6.1f} s wall, {cpu:6.1f} s CPU ({accepted} accepted)")
    return best


def hash_alone(files: list[Path]) -> tuple[float, int]:
    """Seconds to hash every file in this process, and the bytes hashed."""
    start = time.perf_counter()
    for f in files:
        probe.file_digest(str(f))
    return time.perf_counter() - start, sum(f.stat().st_size for f in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--image-px", default="64x64", help="WIDTHxHEIGHT")
    parser.add_argument("--image-format", choices=["png", "jpeg"], default="png")
    parser.add_argument("--workers", type=int, default=2, help="the manifest job's threads")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", type=Path, help="keep the images here and reuse them")
    args = parser.parse_args()
    if multiprocessing.get_start_method() != "fork":
        raise SystemExit("the no-hashing mode patches the module its forked workers run")
    width, height = (int(v) for v in args.image_px.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or Path(tmp)
        folder, work = root / "probe", root / "work"
        work.mkdir(parents=True, exist_ok=True)
        made = make_probe(folder, args.images, width, height, args.image_format, 0, args.workers)
        for notes in folder.glob("*/annotations.parquet"):  # the rendered worlds' own tables
            notes.unlink()
        files = sorted(p for p in folder.rglob("*") if p.is_file() and "/." not in str(p))
        origin = "reused" if made["reused"] else f"rendered in {made['seconds']:.0f} s"
        print(
            f"{len(files)} {args.image_format.upper()} files of {width}x{height}, "
            f"{made['mean_bytes'] / 1024:.1f} KiB on average ({origin})"
        )
        hash_seconds, size = hash_alone(files)  # also reads every file into the page cache
        dataset = DatasetSpec(name="bench", type="folder", path=str(folder))
        best = compare(dataset, work, args.workers, args.repeats)
    for i, what in enumerate(("wall", "CPU")):
        with_, without = best["hashing"][i], best["no hashing"][i]
        print(
            f"manifest with {args.workers} workers, best {what} of {args.repeats}: "
            f"{with_:.1f} s with hashing, {without:.1f} s without: "
            f"{with_ - without:+.1f} s ({(with_ - without) / without:+.1%})"
        )
    print(
        f"hashing alone, 1 process: {hash_seconds:.2f} s for {size / 2**20:.0f} MiB "
        f"({size / 2**20 / hash_seconds:.0f} MiB/s, {hash_seconds / len(files) * 1e6:.0f} µs a file)"
    )


if __name__ == "__main__":
    main()
