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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1024x5000,2048x10000", help="NEURONSxIMAGES,...")
    parser.add_argument("--concepts", type=int, default=3000)
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--memory-mb", type=float, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
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
