"""Exemplars of an output layer: the model path against the top-K lookup (#13 item 13).

A layer without a spatial map (a classifier's output, a pooled feature vector) has no attention
crops, so its exemplars are its top-K images from the merged activation file. Before, each chunk
job still loaded the model and ran it over every top-K image of the chunk, only to find no map;
now the rule passes `crops: false` for such layers and the job never loads the model.

This times one exemplars chunk job (`neuroscribe.exemplars.chunk_exemplars`) both ways, each in
a fresh process so its peak memory is its own: `crops=True` (the old path, still what a layer
with maps runs) and `crops=False` (what an output layer runs now). The probe is N photo-like
JPEGs (benchmarks/activations.py `make_probe`), the target `torchvision:resnet18` with random
weights (same compute as trained ones), the layer `fc` (1000 neurons).

    .venv/bin/python benchmarks/exemplars.py                  # 1000 images, a chunk of 128
    .venv/bin/python benchmarks/exemplars.py --images 300 --neurons 32
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from activations import make_manifests, make_probe  # the same probe images

from neuroscribe.config import LayerSpec, TargetSpec, Transform

LAYER = LayerSpec("fc", "all", "avg", "cls")
TARGET = TargetSpec(
    name="resnet18",
    spec="torchvision:resnet18",
    weights=None,
    transform=Transform(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    layers=(LAYER,),
)


def peak_rss_mb() -> float:
    """This process's high-water mark (VmHWM), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(config: dict) -> dict:
    """One exemplars job, as the rule runs it; its wall time and peak memory."""
    from neuroscribe.exemplars import chunk_exemplars

    start = time.perf_counter()
    chunk_exemplars(
        config["layer_h5"],
        config["manifest"],
        TARGET,
        "fc",
        list(range(config["neurons"])),
        config["out"],
        top_k=10,
        crops=config["crops"],
        batch_size=64,
        workers=config["workers"],
        device="cpu",
        save_every=32,
    )
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb()}


def run_child(config: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(config)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def prepare(work: Path, images: int, workers: int) -> tuple[Path, Path]:
    """The probe, its manifest and the merged `fc` activation file, as the workflow makes them."""
    from neuroscribe.activations import extract_shard
    from neuroscribe.merge import merge_layer

    make_probe(work / "probe", images, 500, 375, "jpeg", 0, workers)
    manifests, _ = make_manifests(work / "probe", work, [images], workers)
    shard = work / "shard-0000.h5"
    extract_shard(manifests[images], TARGET, [LAYER], 0, 1, shard, workers=workers, device="cpu")
    layer = work / "fc.h5"
    merge_layer([shard], TARGET, LAYER, layer, top_k=10)
    return manifests[images], layer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--neurons", type=int, default=128, help="neurons of the chunk")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--workdir", type=Path, help="keep and reuse the probe here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        manifest, layer = prepare(work, args.images, args.workers)
        results = {}
        for crops in (True, False):
            config = {
                "layer_h5": str(layer),
                "manifest": str(manifest),
                "out": str(work / f"exemplars-{crops}.parquet"),
                "neurons": args.neurons,
                "crops": crops,
                "workers": args.workers,
            }
            results["model path (crops=True, before)" if crops else "lookup (now)"] = run_child(
                config
            )
    print(f"exemplars of {args.neurons} neurons of resnet18 fc, top-10 of {args.images} images:")
    for name, r in results.items():
        print(f"  {name:<34} {r['seconds']:7.2f} s, peak RSS {r['peak_rss_mb']:7.0f} MB")
    print(json.dumps({"images": args.images, "neurons": args.neurons, **results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
