"""CLIP-Dissect's scoring (the `clipdissect` stage's soft-WPMI) at layer scale, on the CPU.

The layer's activations are a float16 [images, neurons] matrix in an HDF5 file laid out as the
merge writes it (one neuron per chunk), read by the stage's own code a block of neurons at a
time. The image-concept matrix is the cosine similarity of random unit image embeddings and the
concepts' embeddings (random too: the time is the scoring's, whatever CLIP model made them; the
concepts are the real `wordfreq` list). Each size runs in its own process, so its peak memory
(ru_maxrss) is its own; the largest array the scoring would hold without neuron blocks,
neurons x top_k x concepts floats, is printed beside it.

    .venv/bin/python benchmarks/clipdissect.py                 # 1024 x 5000 and 2048 x 10000
    .venv/bin/python benchmarks/clipdissect.py --sizes 2048x10000 --concepts 20000

`--stage NEURONSxIMAGES` runs the whole stage instead (`describe_layer`, the function its rule
calls) with the `clip` backend on a random-weight tiny CLIP (tests/tiny_diffusion.py) and that
many rendered 32 px demo images: image and concept embeddings (then their cache), scoring and
the table, with the time of each part.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from neuroscribe.methods.clipdissect.concepts import wordfreq_concepts
from neuroscribe.methods.clipdissect.wpmi import WpmiSettings, best_concepts, soft_wpmi

DIM = 512  # CLIP ViT-B/16's embedding size


def unit(rng: np.random.Generator, n: int) -> torch.Tensor:
    x = torch.from_numpy(rng.normal(size=(n, DIM)).astype(np.float32))
    return torch.nn.functional.normalize(x, dim=1)


def one_size(neurons: int, images: int, concepts: int, top_k: int, memory_mb: float) -> dict:
    rng = np.random.default_rng(0)
    words = wordfreq_concepts(concepts * 2)[:concepts]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "layer.h5"
        with h5py.File(path, "w") as h5:
            h5.create_dataset(
                "activations",
                data=rng.normal(size=(images, neurons)).astype(np.float16),
                chunks=(images, 1),
            )
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        start = time.perf_counter()
        sim = unit(rng, images) @ unit(rng, len(words)).T
        with h5py.File(path, "r") as h5:
            scores = soft_wpmi(
                h5["activations"], sim, WpmiSettings(top_k=top_k), memory_mb=memory_mb
            )
        index, _ = best_concepts(scores, 3)
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "neurons": neurons,
        "images": images,
        "concepts": len(words),
        "seconds": seconds,
        "ms_per_neuron": 1000 * seconds / neurons,
        "peak_mb": peak,
        "scoring_mb": peak - base,
        "unblocked_mb": neurons * top_k * len(words) * 4 / 2**20,
        "first_label": words[index[0, 0]],
    }


def stage(neurons: int, images: int, concepts: int, top_k: int, memory_mb: float) -> dict:
    """The `clipdissect` stage end to end with a random-weight CLIP; a second call is served by
    the embedding cache."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_diffusion import build_tiny_clip

    from neuroscribe.config import DatasetSpec
    from neuroscribe.demo.world import images_folder, render_world
    from neuroscribe.methods.clipdissect.stages import describe_layer
    from neuroscribe.probe import build_manifest

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        render_world(root / "world", n_images=images, size=32, seed=0)
        build_manifest(
            [DatasetSpec(name="w", type="folder", path=str(images_folder(root / "world")))],
            root,
            root / "manifest.parquet",
            root / "rejected.parquet",
        )
        import pandas as pd

        ids = pd.read_parquet(root / "manifest.parquet")["image_id"].to_numpy()
        with h5py.File(root / "layer.h5", "w") as h5:
            h5.create_dataset(
                "activations",
                data=rng.normal(size=(len(ids), neurons)).astype(np.float16),
                chunks=(len(ids), 1),
            )
            h5["rows"] = np.arange(len(ids))
            h5["image_ids"] = ids.astype("S16")
            h5["neurons"] = np.arange(neurons)
            h5.attrs.update({"model": "bench", "layer": "layer"})
        clip = build_tiny_clip(root / "clip")
        (root / "concepts.txt").write_text("\n".join(wordfreq_concepts(concepts * 2)[:concepts]))
        setup = time.perf_counter() - start
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        times = []
        for _ in range(2):  # the second run reads the embeddings from the cache
            start = time.perf_counter()
            describe_layer(
                layer_file=str(root / "layer.h5"),
                manifest=str(root / "manifest.parquet"),
                out=str(root / "out.parquet"),
                concepts=str(root / "concepts.txt"),
                wordfreq_words=concepts,
                backend={
                    "backend": "clip",
                    "model": str(clip),
                    "batch_size": 256,
                    "text_batch_size": 1000,
                },
                scoring={"top_k": top_k},
                worlds=[],
                cache=str(root / "cache"),
                device="cpu",
                dtype="float32",
                memory_mb=memory_mb,
            )
            times.append(time.perf_counter() - start)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        labelled = len(pd.read_parquet(root / "out.parquet"))
    return {
        "neurons": neurons,
        "images": len(ids),
        "concepts": concepts,
        "setup_s": setup,
        "first_s": times[0],
        "cached_s": times[1],
        "ms_per_neuron": 1000 * times[0] / neurons,
        "peak_mb": peak,
        "stage_mb": peak - base,
        "rows": labelled,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1024x5000,2048x10000", help="NEURONSxIMAGES,...")
    parser.add_argument("--concepts", type=int, default=3000)
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--memory-mb", type=float, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--stage", metavar="NEURONSxIMAGES", help="run the whole stage instead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.stage:
        neurons, images = (int(v) for v in args.stage.split("x"))
        r = stage(neurons, images, args.concepts, args.top_k, args.memory_mb)
        print(
            f"clipdissect stage, random-weight CLIP, {r['neurons']} neurons x {r['images']} "
            f"images x {r['concepts']} concepts: {r['first_s']:.1f} s "
            f"({r['ms_per_neuron']:.1f} ms/neuron, image and concept embeddings included), "
            f"{r['cached_s']:.1f} s again with the embeddings cached; peak RSS "
            f"{r['peak_mb']:.0f} MB ({r['stage_mb']:.0f} MB over the set-up); {r['rows']} rows "
            f"(set-up: rendering, manifest, files {r['setup_s']:.0f} s)"
        )
        print(json.dumps(r))
        return
    if args.one:
        neurons, images = (int(v) for v in args.one.split("x"))
        result = one_size(neurons, images, args.concepts, args.top_k, args.memory_mb)
        print(json.dumps(result))
        return
    print(
        f"soft-WPMI, top_k {args.top_k}, block memory {args.memory_mb:.0f} MB, "
        f"{args.threads} threads"
    )
    for size in args.sizes.split(","):
        cmd = [
            sys.executable,
            __file__,
            "--one",
            size,
            f"--concepts={args.concepts}",
            f"--top-k={args.top_k}",
            f"--memory-mb={args.memory_mb}",
            f"--threads={args.threads}",
        ]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        print(
            f"  {r['neurons']} neurons x {r['images']} images x {r['concepts']} concepts: "
            f"{r['seconds']:.1f} s ({r['ms_per_neuron']:.2f} ms/neuron), peak RSS "
            f"{r['peak_mb']:.0f} MB ({r['scoring_mb']:.0f} MB for the scoring; without neuron "
            f"blocks the gathered rows alone would be {r['unblocked_mb']:.0f} MB)"
        )


if __name__ == "__main__":
    main()
