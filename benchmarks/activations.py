#!/usr/bin/env python
"""Benchmark activation extraction: the package's `extract_shard` against a bare forward pass.

Two timings over the same images, model, batch size, device and dtype:

* pipeline: `neuroscribe.activations.extract_shard` over all N probe images as one shard:
  model build, image decoding in DataLoader worker processes, one forward pass per batch with
  every requested layer hooked, pooling, copies into the output buffers, the HDF5 write.
* bare: the same model and batches, a plain `model(x)` under `torch.inference_mode()` over
  tensors decoded and transformed beforehand and already in memory (on the device): no decoding,
  no hooks, no pooling, no output. This is the floor the pipeline is measured against.

The project's target is pipeline/bare <= 1.2. Then the pipeline runs again in fresh
subprocesses for N and K*N images and the peak memory of each is reported, to check that peak
memory grows with the number of images by no more than the output matrix (images x neurons x 2 bytes).

Human-readable lines go to stdout, then one final line of JSON with every number.

    python benchmarks/activations.py --size tiny
    python benchmarks/activations.py --size real --device cuda --images 4096 --batch-size 128
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

CHILD_TAG = "BENCH_CHILD_RESULT "
MIB = 1 << 20
MALLOC_MMAP_THRESHOLD = 128 * 1024
RSS_TOLERANCE = 16 * MIB
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# --size presets; every field can be overridden on the command line
PRESETS: dict[str, dict[str, Any]] = {
    # the built-in demo: tiny CNN on 64 px PNG shapes, exactly what `config/demo.yaml` runs
    "tiny": {
        "model": "python:neuroscribe.demo.cnn:tiny_cnn",
        "layers": "conv2,conv3,fc",
        "resize": 64,
        "crop": 64,
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "images": 2048,
        "image_px": "64x64",
        "image_format": "png",
        "repeats": 3,
        "memory_scale": 4,
    },
    # ImageNet-like: a torchvision CNN at 224 px on 500x375 textured JPEGs (ImageNet-val size)
    "real": {
        "model": "torchvision:resnet18",
        "layers": "layer1,layer2,layer3,layer4,fc",
        "resize": 256,
        "crop": 224,
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "images": 256,
        "image_px": "500x375",
        "image_format": "jpeg",
        "repeats": 2,
        "memory_scale": 2,
    },
}
TARGET_RATIO = 1.2


# -- probe images ------------------------------------------------------------------------------


def _render_chunk(task: tuple[str, int, int, int, int, str, int]) -> tuple[int, int]:
    """Render `n` demo-world scenes with `render_world`, then (unless they are already what was asked
    for) resize them, add texture and save them as JPEG/PNG. Returns (files, bytes)."""
    import numpy as np
    from PIL import Image

    from neuroscribe.demo.world import images_folder, render_world

    folder, n, width, height, seed, fmt, quality = task
    out = Path(folder)
    direct = fmt == "png" and width == height and width <= 256
    render_world(out, n, width if direct else 256, seed)
    total = 0
    files = sorted(images_folder(out).rglob("*.png"))
    if direct:
        return len(files), sum(f.stat().st_size for f in files)
    rng = np.random.default_rng(seed + 1_000_003)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for path in files:
        with Image.open(path) as img:
            base = np.asarray(img.convert("RGB").resize((width, height), Image.BICUBIC), np.float32)
        # a random colour gradient and sensor-like noise, so the file size and the entropy-decoding
        # work are those of a photo rather than of a flat drawing (which decodes far faster)
        gx, gy = rng.uniform(-40, 40, size=(2, 3))
        gradient = (xx[..., None] / width - 0.5) * gx + (yy[..., None] / height - 0.5) * gy
        noise = rng.normal(0.0, 12.0, size=base.shape)
        pixels = np.clip(base + gradient + noise, 0, 255).astype(np.uint8)
        target = path.with_suffix(".jpg" if fmt == "jpeg" else ".png")
        if fmt == "jpeg":
            Image.fromarray(pixels).save(target, format="JPEG", quality=quality)
        else:
            Image.fromarray(pixels).save(target, format="PNG")
        if target != path:
            path.unlink()
        total += target.stat().st_size
    return len(files), total


def make_probe(
    folder: Path, n: int, width: int, height: int, fmt: str, seed: int, procs: int
) -> dict[str, Any]:
    """N probe images under `folder` (reused if a previous run made the same ones)."""
    stamp = folder / ".bench-probe.json"
    want = {"width": width, "height": height, "format": fmt, "seed": seed, "v": 1}
    if stamp.exists():
        info = json.loads(stamp.read_text())
        if info.get("want") == want and info.get("files", 0) >= n:
            return {**info, "reused": True, "seconds": 0.0}
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    chunk = 256
    tasks = [
        (str(folder / f"c{i:04d}"), min(chunk, n - start), width, height, seed + i, fmt, 90)
        for i, start in enumerate(range(0, n, chunk))
    ]
    with ProcessPoolExecutor(max(1, min(procs, len(tasks)))) as pool:
        done = list(pool.map(_render_chunk, tasks))
    files, size = sum(d[0] for d in done), sum(d[1] for d in done)
    info = {"want": want, "files": files, "mean_bytes": size / max(files, 1)}
    stamp.write_text(json.dumps(info))
    return {**info, "reused": False, "seconds": time.perf_counter() - t0}


def make_manifests(
    folder: Path, work: Path, sizes: list[int], procs: int
) -> tuple[dict[int, Path], float]:
    """`build_manifest` over the whole probe folder, then one manifest per size (its first rows)."""
    import pandas as pd

    from neuroscribe.config import DatasetSpec
    from neuroscribe.probe import build_manifest
    from neuroscribe.tables import write_table

    full = work / "manifest-all.parquet"
    t0 = time.perf_counter()
    dataset = DatasetSpec(name="bench", type="folder", path=str(folder), labels="none")
    build_manifest([dataset], work, full, work / "rejected.parquet", workers=procs)
    seconds = time.perf_counter() - t0
    table = pd.read_parquet(full)
    out = {}
    for n in sorted(set(sizes)):
        if n > len(table):
            raise SystemExit(f"asked for {n} images but the probe has only {len(table)}")
        path = work / f"manifest-{n}.parquet"
        write_table(table.iloc[:n].reset_index(drop=True), path, "manifest")
        out[n] = path
    return out, seconds


# -- machine and load --------------------------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info(device: Any) -> dict[str, Any]:
    import h5py
    import PIL
    import torch
    import torchvision

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    info = {
        "cpus": os.cpu_count(),
        "cpus_usable": usable,
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pillow": PIL.__version__,
        "h5py": h5py.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": (
            torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model()
        ),
        "date": datetime.date.today().isoformat(),
    }
    return info


class CpuMeter:
    """CPU seconds used by this process, by its reaped children, and by everything else on the
    machine (from /proc/stat) between start() and stop()."""

    def __init__(self) -> None:
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def _machine_busy(self) -> float | None:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        # user nice system idle iowait irq softirq steal (guest time is already in user)
        return (sum(fields[:8]) - idle) / self.tick

    def start(self) -> CpuMeter:
        self.t0 = time.perf_counter()
        self.self0 = resource.getrusage(resource.RUSAGE_SELF)
        self.kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.busy0 = self._machine_busy()
        return self

    def stop(self) -> dict[str, Any]:
        wall = time.perf_counter() - self.t0
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        busy = self._machine_busy()
        own = (me.ru_utime + me.ru_stime) - (self.self0.ru_utime + self.self0.ru_stime)
        children = (kids.ru_utime + kids.ru_stime) - (self.kids0.ru_utime + self.kids0.ru_stime)
        others = None
        if busy is not None and self.busy0 is not None:
            others = max(0.0, (busy - self.busy0) - own - children)
        return {
            "wall_s": wall,
            "cpu_main_s": own,
            "cpu_main_sys_s": me.ru_stime - self.self0.ru_stime,
            "page_faults_main": me.ru_minflt - self.self0.ru_minflt,
            "cpu_children_s": children,
            "cpu_others_s": others,
        }


def loadavg() -> float | None:
    with contextlib.suppress(OSError, AttributeError):
        return round(os.getloadavg()[0], 2)
    return None


# -- model and transform -----------------------------------------------------------------------


def make_target(args: argparse.Namespace) -> Any:
    from neuroscribe.config import LayerSpec, TargetSpec, Transform

    layers = tuple(
        LayerSpec(name=name.strip(), neurons="all", pooling="avg", tokens="cls")
        for name in args.layers.split(",")
        if name.strip()
    )
    return TargetSpec(
        name=args.model.rsplit(":", 1)[-1],
        spec=args.model,
        weights=None,  # architecture with random weights: nothing to download
        transform=Transform(args.resize, args.crop, tuple(args.mean), tuple(args.std)),
        layers=layers,
    )


def autocast(device: Any, dtype: Any) -> contextlib.AbstractContextManager:
    """What extract_shard does: autocast unless the compute dtype is float32."""
    import torch

    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def neuron_counts(target: Any) -> dict[str, int]:
    """Pooled width of every requested layer, from one dummy forward pass."""
    import torch

    from neuroscribe.models import LayerRecorder, build_target

    with torch.device("cpu"):
        loaded = build_target(target)
    recorder = LayerRecorder(loaded, list(target.layers))
    with torch.inference_mode():
        out = recorder.run(torch.zeros(1, 3, target.transform.crop, target.transform.crop))
    recorder.close()
    return {name: int(v.shape[1]) for name, v in out.items()}


# -- the two modes -----------------------------------------------------------------------------


class Breakdown:
    """Where the pipeline's wall time goes, from clock reads around calls extract_shard makes
    (the package is not changed: its module-level names are swapped for timed subclasses while
    the benchmark runs; the added cost is a few clock reads per batch)."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.t: dict[str, float] = {
            "model_build_s": 0.0,
            "loader_start_stop_s": 0.0,
            "first_batch_wait_s": 0.0,
            "batch_wait_s": 0.0,
            "forward_hooks_pool_s": 0.0,
            "hdf5_write_s": 0.0,
        }
        self.batches = 0

    @contextlib.contextmanager
    def installed(self) -> Any:
        import neuroscribe.activations as act

        meter = self
        original = (act.DataLoader, act.LayerRecorder, act.build_target, act.atomic_path)

        class TimedLoader(act.DataLoader):  # type: ignore[misc,valid-type]
            def __iter__(self) -> Any:
                t0 = time.perf_counter()
                it = super().__iter__()  # starts the worker processes
                meter.t["loader_start_stop_s"] += time.perf_counter() - t0
                first = True
                while True:
                    t0 = time.perf_counter()
                    try:
                        batch = next(it)
                    except StopIteration:  # the last next() also shuts the workers down
                        meter.t["loader_start_stop_s"] += time.perf_counter() - t0
                        return
                    dt = time.perf_counter() - t0
                    meter.t["first_batch_wait_s" if first else "batch_wait_s"] += dt
                    first = False
                    yield batch

        class TimedRecorder(act.LayerRecorder):  # type: ignore[misc,valid-type]
            def run(self, x: Any) -> Any:
                sync(meter.device)
                t0 = time.perf_counter()
                out = super().run(x)
                sync(meter.device)
                meter.t["forward_hooks_pool_s"] += time.perf_counter() - t0
                meter.batches += 1
                return out

        def timed_build(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original[2](*a, **kw)
            finally:
                meter.t["model_build_s"] += time.perf_counter() - t0

        @contextlib.contextmanager
        def timed_atomic(path: Any) -> Any:
            t0 = time.perf_counter()
            try:
                with original[3](path) as tmp:
                    yield tmp
            finally:
                meter.t["hdf5_write_s"] += time.perf_counter() - t0

        act.DataLoader, act.LayerRecorder = TimedLoader, TimedRecorder
        act.build_target, act.atomic_path = timed_build, timed_atomic
        try:
            yield self
        finally:
            act.DataLoader, act.LayerRecorder, act.build_target, act.atomic_path = original


def run_pipeline(
    manifest: Path, target: Any, out: Path, args: argparse.Namespace, quiet: bool = True
) -> float:
    """One extract_shard call over the whole manifest as a single shard; returns wall seconds."""
    from neuroscribe.activations import extract_shard

    sink = io.StringIO()
    with contextlib.redirect_stderr(sink) if quiet else contextlib.nullcontext():
        t0 = time.perf_counter()
        extract_shard(
            manifest,
            target,
            list(target.layers),
            shard=0,
            n_shards=1,
            out=out,
            batch_size=args.batch_size,
            workers=args.workers,
            device=args.device,
            dtype=args.dtype,
        )
        seconds = time.perf_counter() - t0
    out.unlink(missing_ok=True)
    return seconds


def predecode(manifest: Path, target: Any, args: argparse.Namespace, device: Any) -> tuple:
    """The exact batches the pipeline feeds the model (same Dataset, transform and batch size),
    decoded here in this process, then moved to the device. Returns (batches, seconds)."""
    import pandas as pd
    import torch
    from torch.utils.data import DataLoader

    from neuroscribe.activations import ProbeImages

    paths = pd.read_parquet(manifest, columns=["path"])["path"].tolist()
    # one intra-op thread, as in a DataLoader worker: with more, ToTensor/Normalize on one image
    # are split across threads and become far slower whenever a core is busy elsewhere
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        loader = DataLoader(
            ProbeImages(paths, target.transform), batch_size=args.batch_size, num_workers=0
        )
        batches = [images for images, _ in loader]
        seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    from neuroscribe.activations import Normalizer

    normalize = Normalizer(target.transform, device)
    with torch.inference_mode():
        batches = [normalize(b.to(device)) for b in batches]
    sync(device)
    return batches, seconds


def run_bare(model: Any, batches: list, device: Any, dtype: Any) -> float:
    import torch

    with torch.inference_mode(), autocast(device, dtype):
        sync(device)
        t0 = time.perf_counter()
        for x in batches:
            model(x)
        sync(device)
        return time.perf_counter() - t0


# -- memory: the pipeline in a fresh process ---------------------------------------------------


def _vm_kib(pid: int | str, field: str) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def _pss_rss_kib(pid: int) -> tuple[int, int]:
    pss = rss = 0
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
            elif line.startswith("Rss:"):
                rss = int(line.split()[1])
    return pss, rss


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            with contextlib.suppress(OSError, ValueError):
                kids = [int(k) for k in (task / "children").read_text().split()]
                out += kids
                todo += kids
    return out


class TreeSampler(threading.Thread):
    """Polls the memory of a process and its descendants (Linux /proc) until stopped: peak sum of
    PSS (shared pages split between the processes that map them) and of RSS over the tree."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_pss_kib = self.peak_rss_kib = self.peak_procs = 0
        self.available = Path(f"/proc/{pid}/smaps_rollup").exists()
        self._halt = threading.Event()

    def run(self) -> None:
        while self.available and not self._halt.is_set():
            pids = [self.pid, *_descendants(self.pid)]
            sizes = [_pss_rss_kib(p) for p in pids]
            self.peak_pss_kib = max(self.peak_pss_kib, sum(s[0] for s in sizes))
            self.peak_rss_kib = max(self.peak_rss_kib, sum(s[1] for s in sizes))
            self.peak_procs = max(self.peak_procs, len(pids))
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def child_pipeline(config: dict[str, Any]) -> dict[str, Any]:
    """Runs in the fresh subprocess: imports, then one extract_shard; reports peak memory."""
    t_start = time.perf_counter()
    import torch

    from neuroscribe.activations import extract_shard
    from neuroscribe.config import TargetSpec
    from neuroscribe.device import resolve_device

    if config["threads"]:
        torch.set_num_threads(config["threads"])
    import_s = time.perf_counter() - t_start
    target = TargetSpec.from_dict(config["target"])
    rss_before = _vm_kib("self", "VmRSS")
    # tracemalloc sees every Python object and every numpy buffer (the output matrix included)
    # but not torch's tensors: an exact, noise-free peak for what can scale with the image count
    tracemalloc.start()
    traced_base = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    extract_shard(
        config["manifest"],
        target,
        list(target.layers),
        shard=0,
        n_shards=1,
        out=config["out"],
        batch_size=config["batch_size"],
        workers=config["workers"],
        device=config["device"],
        dtype=config["dtype"],
    )
    wall = time.perf_counter() - t0
    traced_peak = tracemalloc.get_traced_memory()[1] - traced_base
    tracemalloc.stop()
    Path(config["out"]).unlink(missing_ok=True)
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    # VmHWM is this process's own high-water mark; Linux carries ru_maxrss over execve, so for a
    # subprocess it would be at least the parent's RSS at fork time
    hwm = _vm_kib("self", "VmHWM")
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = {
        "images": config["images"],
        "import_s": import_s,
        "extract_s": wall,
        "rss_before_extract_bytes": (rss_before or 0) * 1024,
        "peak_rss_main_bytes": hwm * 1024 if hwm is not None else me.ru_maxrss * scale,
        "peak_traced_heap_bytes": traced_peak,
        # largest single reaped child (a DataLoader worker), not a sum; it counts the pages it
        # shares copy-on-write with this process (forked), so it overlaps the main figure
        "peak_rss_largest_worker_bytes": kids.ru_maxrss * scale,
    }
    dev = resolve_device(config["device"])
    if dev.type == "cuda":
        result["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(dev)
    return result


def measure_memory(
    manifest: Path, n: int, target: Any, args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    config = {
        "manifest": str(manifest),
        "target": target.to_dict(),
        "out": str(work / f"memory-{n}.h5"),
        "batch_size": args.batch_size,
        "workers": args.workers,
        "device": args.device,
        "dtype": args.dtype,
        "threads": args.threads,
        "images": n,
    }
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-pipeline", json.dumps(config)]
    t0 = time.perf_counter()
    env = dict(os.environ)
    if args.malloc == "fixed":
        # glibc: a fixed mmap threshold turns off the dynamic one, which otherwise lets freed
        # multi-MiB tensors stay in the heap and makes peak RSS vary by hundreds of MiB run to run
        env["MALLOC_MMAP_THRESHOLD_"] = str(MALLOC_MMAP_THRESHOLD)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    sampler = TreeSampler(proc.pid)
    sampler.start()
    stdout, stderr = proc.communicate()
    sampler.stop()
    total = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"memory child for {n} images failed:\n{stderr[-4000:]}")
    line = next(x for x in stdout.splitlines()[::-1] if x.startswith(CHILD_TAG))
    result = json.loads(line[len(CHILD_TAG) :])
    result["process_wall_s"] = total
    if sampler.available:
        result["peak_tree_pss_bytes"] = sampler.peak_pss_kib * 1024
        result["peak_tree_rss_bytes"] = sampler.peak_rss_kib * 1024
        result["peak_tree_processes"] = sampler.peak_procs
    return result


# -- report ------------------------------------------------------------------------------------


def mib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / MIB:,.1f} MiB"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__,
        epilog="See benchmarks/README.md for what each number includes.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = p.add_argument
    add("--size", choices=sorted(PRESETS), default="real", help="preset (default: real)")
    add("--model", help=f"target spec; default {_preset('model')}")
    add("--layers", help=f"comma-separated layer names; default {_preset('layers')}")
    add("--resize", type=int, help=f"transform resize; default {_preset('resize')}")
    add("--crop", type=int, help=f"transform centre crop; default {_preset('crop')}")
    add("--images", type=int, help=f"N, probe images timed; default {_preset('images')}")
    add("--image-px", help=f"probe image size on disk, WxH; default {_preset('image_px')}")
    add("--image-format", choices=["jpeg", "png"], help=f"default {_preset('image_format')}")
    add("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    add("--workers", type=int, default=2, help="DataLoader decoding workers (default: 2)")
    add("--device", choices=["auto", "cpu", "cuda"], default="auto", help="(default: auto)")
    add(
        "--dtype",
        choices=["auto", "float32", "float16", "bfloat16"],
        default="auto",
        help="compute dtype of both modes; auto: float16 autocast on CUDA, float32 on CPU",
    )
    add("--threads", type=int, default=0, help="torch intra-op threads (default 0: torch's own)")
    add(
        "--repeats",
        type=int,
        help=f"timed runs per mode, alternating, best used; default {_preset('repeats')}",
    )
    add(
        "--memory-scale",
        type=int,
        help=f"memory runs use N and K*N images (0 or 1: none); default {_preset('memory_scale')}",
    )
    add(
        "--malloc",
        choices=["fixed", "default"],
        default="fixed",
        help="glibc allocator in the memory runs: fixed mmap threshold (reproducible peak RSS) "
        "or the default dynamic one (what a job sees, noisier); default fixed",
    )
    add("--no-breakdown", action="store_true", help="time extract_shard without instrumentation")
    add("--workdir", help="keep probe images and manifests here and reuse them (default: tmp)")
    add("--seed", type=int, default=0, help="probe rendering seed (default: 0)")
    add("--verbose", action="store_true", help="show extract_shard's progress bar")
    add("--child-pipeline", metavar="JSON", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_pipeline:
        return args
    preset = PRESETS[args.size]
    if args.model is not None and args.model != preset["model"] and args.layers is None:
        p.error(f"--model {args.model} is not the preset's model: give its --layers too")
    for key in preset:
        if getattr(args, key, None) is None:
            setattr(args, key, preset[key])
    try:
        args.width, args.height = (int(v) for v in args.image_px.lower().split("x"))
    except ValueError:
        p.error(f"--image-px {args.image_px!r}: expected WIDTHxHEIGHT, e.g. 500x375")
    if args.crop > args.resize:
        p.error("--crop must not exceed --resize")
    if min(args.images, args.batch_size, args.repeats) < 1 or args.workers < 0:
        p.error("--images, --batch-size and --repeats must be >= 1, --workers >= 0")
    return args


def _preset(key: str) -> str:
    return ", ".join(f"{size}={preset[key]}" for size, preset in PRESETS.items())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child_pipeline:
        result = child_pipeline(json.loads(args.child_pipeline))
        print(CHILD_TAG + json.dumps(result), flush=True)
        return 0

    import torch

    from neuroscribe.device import resolve_device, resolve_dtype
    from neuroscribe.models import build_target

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    target = make_target(args)
    machine = machine_info(device)
    n = args.images
    sizes = [n] + ([n * args.memory_scale] if args.memory_scale > 1 else [])
    procs = machine["cpus_usable"]

    with contextlib.ExitStack() as stack:
        if args.workdir:
            work = Path(args.workdir).resolve()
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nsbench-")))
        tag = f"{args.width}x{args.height}-{args.image_format}-{args.seed}"
        probe = make_probe(
            work / f"probe-{tag}",
            max(sizes),
            args.width,
            args.height,
            args.image_format,
            args.seed,
            procs,
        )
        manifests, manifest_s = make_manifests(
            work / f"probe-{tag}", work, [*sizes, min(n, args.batch_size)], procs
        )
        widths = neuron_counts(target)
        neurons = sum(widths.values())

        print(f"neuroscribe activation benchmark, --size {args.size}, {n} images")
        print(
            f"machine: {machine['cpus_usable']} usable CPUs ({machine['cpu_model']}), "
            f"python {machine['python']}, torch {machine['torch']} "
            f"({machine['torch_threads']} intra-op threads), torchvision {machine['torchvision']}, "
            f"device {device} ({machine['device_name']}), compute dtype {str(dtype).split('.')[-1]}"
        )
        print(
            f"target: {args.model} (random weights), layers "
            + ", ".join(f"{k}={v}" for k, v in widths.items())
            + f" = {neurons} neurons; resize {args.resize} crop {args.crop}; "
            f"batch {args.batch_size}; {args.workers} DataLoader workers"
        )
        print(
            f"probe: {probe['files']} {args.image_format.upper()} files {args.width}x{args.height} "
            f"(mean {probe['mean_bytes'] / 1024:.1f} KiB), "
            + ("reused" if probe["reused"] else f"made in {probe['seconds']:.1f} s")
            + f"; manifest built in {manifest_s:.1f} s (not timed below)"
        )

        # warm-up, not timed: imports and first-call costs of h5py/pandas/transforms, the page
        # cache for the files, kernel selection for the batch shape
        warm = manifests[min(n, args.batch_size)]
        run_pipeline(warm, target, work / "warmup.h5", args)
        t0 = time.perf_counter()
        with torch.device(device):
            loaded = build_target(target)
        model = loaded.module.to(device)
        sync(device)
        build_s = time.perf_counter() - t0
        batches, decode_s = predecode(manifests[n], target, args, device)
        run_bare(model, batches[:1], device, dtype)

        breakdown = Breakdown(device)
        bare_runs, pipe_runs, pipe_cpu, bare_cpu, parts = [], [], [], [], []
        load_before = loadavg()
        for _ in range(args.repeats):
            meter = CpuMeter().start()
            bare_runs.append(run_bare(model, batches, device, dtype))
            bare_cpu.append(meter.stop())
            breakdown.reset()
            meter = CpuMeter().start()
            with breakdown.installed() if not args.no_breakdown else contextlib.nullcontext():
                pipe_runs.append(
                    run_pipeline(manifests[n], target, work / "pipeline.h5", args, not args.verbose)
                )
            pipe_cpu.append(meter.stop())
            parts.append(dict(breakdown.t))
        load_after = loadavg()
        del batches

        best_bare, best_pipe = min(bare_runs), min(pipe_runs)
        i_pipe = pipe_runs.index(best_pipe)
        part = parts[i_pipe]
        ratio = best_pipe / best_bare
        ratio_no_build = (
            (best_pipe - part["model_build_s"]) / best_bare if not args.no_breakdown else None
        )
        met = ratio <= TARGET_RATIO

        print()
        print(
            "excluded from both timings: interpreter start and imports, probe rendering, "
            "manifest build, one warm-up batch per mode"
        )
        print(
            f"bare     {best_bare:8.2f} s  {n / best_bare:8.1f} img/s   model(x) over pre-decoded "
            "batches already on the device; no decoding, hooks, pooling or output"
        )
        print(
            f"pipeline {best_pipe:8.2f} s  {n / best_pipe:8.1f} img/s   extract_shard: model "
            "build, DataLoader start, decoding in workers, hooks, pooling, HDF5 write"
        )
        if args.repeats > 1:
            print(
                "  all runs: bare "
                + ", ".join(f"{t:.2f}" for t in bare_runs)
                + " s; pipeline "
                + ", ".join(f"{t:.2f}" for t in pipe_runs)
                + " s (best used)"
            )
        verdict = "met" if met else "NOT met"
        extra = f"; {ratio_no_build:.3f} without the model build" if ratio_no_build else ""
        print(f"ratio pipeline/bare {ratio:.3f} (target <= {TARGET_RATIO}: {verdict}){extra}")
        print(
            f"model build alone {build_s:.2f} s; decode+transform {decode_s / n * 1000:.2f} "
            f"ms/img on one thread ({decode_s:.1f} CPU-s for {n} images, the work the workers "
            "add next to the forward pass)"
        )
        if not args.no_breakdown:
            other = best_pipe - sum(part.values())
            print(
                "pipeline breakdown: "
                f"model build {part['model_build_s']:.2f} s, "
                f"DataLoader start+stop {part['loader_start_stop_s']:.2f} s, "
                f"first batch wait {part['first_batch_wait_s']:.2f} s, "
                f"later batch waits {part['batch_wait_s']:.2f} s, "
                f"forward+hooks+pool {part['forward_hooks_pool_s']:.2f} s "
                f"(bare forward {best_bare:.2f} s), "
                f"HDF5 write {part['hdf5_write_s']:.2f} s, other {other:.2f} s"
            )
        pc, bc = pipe_cpu[i_pipe], bare_cpu[bare_runs.index(best_bare)]
        cap = machine["cpus_usable"]
        print(
            f"CPU seconds: bare main {bc['cpu_main_s']:.1f} (system {bc['cpu_main_sys_s']:.1f}, "
            f"{bc['page_faults_main']:,} page faults); pipeline main {pc['cpu_main_s']:.1f} "
            f"(system {pc['cpu_main_sys_s']:.1f}) + workers {pc['cpu_children_s']:.1f}; "
            f"capacity {cap} CPUs x {pc['wall_s']:.1f} s = {cap * pc['wall_s']:.1f}"
        )
        others = [m["cpu_others_s"] for m in bare_cpu + pipe_cpu if m["cpu_others_s"] is not None]
        walls = sum(m["wall_s"] for m in bare_cpu + pipe_cpu)
        others_frac = sum(others) / (cap * walls) if others and walls else None
        if others_frac is not None:
            note = (
                "  WARNING: the machine was busy, timings are unreliable"
                if others_frac > 0.05
                else ""
            )
            print(
                f"other processes used {others_frac:.0%} of the machine's CPU during the timed "
                f"runs (load average {load_before} before, {load_after} after){note}"
            )

        memory: dict[str, Any] = {}
        if len(sizes) > 1:
            print()
            print(
                "peak memory, pipeline in a fresh process per run (python + imports + "
                f"extract_shard; malloc {args.malloc}):"
            )
            runs = [measure_memory(manifests[s], s, target, args, work) for s in sizes]
            for r in runs:
                print(
                    f"  {r['images']:6d} images: traced heap {mib(r['peak_traced_heap_bytes'])}, "
                    f"RSS main {mib(r['peak_rss_main_bytes'])} "
                    f"(after imports {mib(r['rss_before_extract_bytes'])}), "
                    f"largest worker {mib(r['peak_rss_largest_worker_bytes'])} (incl. shared pages), "
                    f"whole tree PSS {mib(r.get('peak_tree_pss_bytes'))} "
                    f"(sampled every 50 ms); extract {r['extract_s']:.1f} s, "
                    f"imports {r['import_s']:.1f} s"
                    + (
                        f", CUDA max allocated {mib(r['cuda_max_allocated_bytes'])}"
                        if "cuda_max_allocated_bytes" in r
                        else ""
                    )
                )
            small, large = runs[0], runs[-1]
            added = large["images"] - small["images"]
            matrix_growth = added * neurons * 2
            traced_growth = large["peak_traced_heap_bytes"] - small["peak_traced_heap_bytes"]
            rss_growth = large["peak_rss_main_bytes"] - small["peak_rss_main_bytes"]
            tree_growth = (
                large["peak_tree_pss_bytes"] - small["peak_tree_pss_bytes"]
                if "peak_tree_pss_bytes" in large
                else None
            )
            per_image = traced_growth / added
            holds = traced_growth <= 1.1 * matrix_growth
            prefetch = (
                args.workers * 4 * args.batch_size * 3 * args.crop**2 * 4 if args.workers else 0
            )
            print(
                f"  growth {small['images']} -> {large['images']} images: output matrix "
                f"{mib(matrix_growth)} ({neurons} neurons x 2 bytes = {neurons * 2} B per image); "
                f"traced Python/numpy heap peak {mib(traced_growth)} ({per_image:.0f} B per image, "
                f"{traced_growth / matrix_growth:.2f}x the matrix)"
            )
            print(
                f"  claim 'peak memory grows by no more than the output matrix' (exact, traced "
                f"heap, 10% allowance): {'holds' if holds else 'DOES NOT hold'}"
            )
            full_queue = args.workers * 4 * args.batch_size
            rss_ok = rss_growth <= 1.1 * matrix_growth + RSS_TOLERANCE
            if args.malloc == "fixed":
                print(
                    f"  main-process peak RSS grew {mib(rss_growth)} (malloc mmap threshold fixed at "
                    f"{MALLOC_MMAP_THRESHOLD // 1024} KiB): "
                    + ("consistent" if rss_ok else "NOT consistent")
                    + f" with the claim (allowance 1.1 x matrix + {mib(RSS_TOLERANCE)}); "
                    f"whole-tree PSS grew {mib(tree_growth)}"
                )
            else:
                print(
                    f"  main-process peak RSS grew {mib(rss_growth)}, whole-tree PSS "
                    f"{mib(tree_growth)}; with glibc's default dynamic mmap threshold, peaks of "
                    "identical runs differ by up to a few hundred MiB (--malloc fixed steadies them)"
                )
            print(
                f"  DataLoader prefetch (workers x 4 batches of float32 images) holds up to "
                f"{mib(prefetch)}, reached once N >= {full_queue}"
                + (
                    f"; the {small['images']}-image run is below that, so the whole-tree growth "
                    "includes the prefetch queue filling up (bounded, not per image)"
                    if args.workers and small["images"] < full_queue
                    else ""
                )
            )
            memory = {
                "runs": runs,
                "matrix_bytes_per_image": neurons * 2,
                "matrix_growth_bytes": matrix_growth,
                "traced_heap_peak_growth_bytes": traced_growth,
                "traced_heap_growth_bytes_per_image": per_image,
                "traced_growth_over_matrix_growth": traced_growth / matrix_growth,
                "claim_holds": holds,
                "main_peak_rss_growth_bytes": rss_growth,
                "rss_consistent_with_claim": rss_ok if args.malloc == "fixed" else None,
                "malloc": args.malloc,
                "tree_pss_growth_bytes": tree_growth,
                "prefetch_bound_bytes": prefetch,
            }

    summary = {
        "benchmark": "activations",
        "size": args.size,
        "config": {
            "model": args.model,
            "weights": None,
            "layers": widths,
            "neurons": neurons,
            "resize": args.resize,
            "crop": args.crop,
            "images": n,
            "image_px": [args.width, args.height],
            "image_format": args.image_format,
            "image_mean_bytes": probe["mean_bytes"],
            "batch_size": args.batch_size,
            "workers": args.workers,
            "device": str(device),
            "dtype": str(dtype).split(".")[-1],
            "repeats": args.repeats,
            "breakdown_instrumented": not args.no_breakdown,
        },
        "machine": machine,
        "bare_s": best_bare,
        "pipeline_s": best_pipe,
        "bare_runs_s": bare_runs,
        "pipeline_runs_s": pipe_runs,
        "bare_img_per_s": n / best_bare,
        "pipeline_img_per_s": n / best_pipe,
        "ratio": ratio,
        "ratio_without_model_build": ratio_no_build,
        "target_ratio": TARGET_RATIO,
        "target_met": met,
        "model_build_s": build_s,
        "decode_transform_ms_per_img_one_process": decode_s / n * 1000,
        "pipeline_breakdown_s": None if args.no_breakdown else part,
        "cpu": {"bare": bare_cpu, "pipeline": pipe_cpu},
        "other_load_fraction": others_frac,
        "loadavg": [load_before, load_after],
        "memory": memory,
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
