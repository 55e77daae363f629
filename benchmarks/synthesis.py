"""Diffusion images per neuron after de-duplication (Describe-and-Dissect, part 2).

The reference code draws Q=10 images for each of ~5 candidates of every neuron: 50 per neuron,
redrawn for every neuron. neuroscribe draws each distinct candidate phrase once per run (the
content-addressed image store). This counts, for the candidates the concept stage proposes:

- on a finished run (`--results results/demo`, e.g. after `make demo`): its concepts files;
- on N synthetic neurons of the demo world (default 256, as in benchmarks/concepts.py), with
  the `none` backend's candidates, chunk by chunk as the workflow runs them.

    .venv/bin/python benchmarks/synthesis.py --results results/demo
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from concepts import synthetic_exemplars

from neuroscribe.backends.captioners import CaptionRequest
from neuroscribe.demo.annotations import AnnotationCaptioner
from neuroscribe.demo.world import render_world
from neuroscribe.methods.dnd.concepts import FrequencyProposer
from neuroscribe.probe import image_id

REFERENCE_PER_NEURON = 50


def report(name: str, chunks: list[list[list[str]]], q: int) -> None:
    """`chunks`: per chunk, per neuron, its candidates."""
    neurons = sum(len(c) for c in chunks)
    candidates = sum(len(n) for c in chunks for n in c)
    per_chunk = sum(len({x for n in c for x in n}) for c in chunks)
    run = len({x for c in chunks for n in c for x in n})
    print(f"{name}: {neurons} neurons in {len(chunks)} chunk(s), {candidates} candidates")
    print(f"  {'':<34} {'prompts':>8} {'images':>8} {'images/neuron':>14}")
    rows = [
        ("reference (per neuron, no sharing)", neurons * 5),
        ("every candidate, no sharing", candidates),
        ("distinct per chunk job", per_chunk),
        ("distinct per run (the image store)", run),
    ]
    for label, prompts in rows:
        print(f"  {label:<34} {prompts:>8} {prompts * q:>8} {prompts * q / neurons:>14.2f}")
    print(
        f"  reference draws {REFERENCE_PER_NEURON} per neuron: {REFERENCE_PER_NEURON * neurons / (run * q):.1f}x more"
    )


def from_results(results: Path) -> list[list[list[str]]]:
    files = sorted((results / "concepts").glob("*/*/*.parquet"))
    if not files:
        raise SystemExit(f"no concepts files under {results}/concepts; run the workflow first")
    return [[list(c) for c in pd.read_parquet(f)["candidates"]] for f in files]


def synthetic(neurons: int, chunk_size: int, top_k: int, images: int, seed: int):
    with tempfile.TemporaryDirectory() as tmp:
        annotations = render_world(Path(tmp) / "world", images, 64, seed)
        annotations["image_id"] = [image_id("world", r) for r in annotations["relpath"]]
        exemplars = synthetic_exemplars(annotations, neurons, top_k, seed)
        captioner = AnnotationCaptioner.from_world([("world", Path(tmp) / "world")])
        paths = dict(zip(annotations["image_id"], annotations["relpath"], strict=True))
        chunks = []
        for start in range(0, neurons, chunk_size):
            batch = exemplars[start : start + chunk_size]
            captions = [
                captioner.caption([CaptionRequest(i, paths[i]) for i in ids]) for ids in batch
            ]
            records = FrequencyProposer(n=5).propose(list(enumerate(captions, start)))
            chunks.append([r.candidates for r in records])
        return chunks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, help="a finished run, e.g. results/demo")
    parser.add_argument("--neurons", type=int, default=256)
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--images-per-concept", type=int, default=10)
    parser.add_argument("--world", type=int, default=2000, help="images in the synthetic world")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    q = args.images_per_concept
    if args.results:
        report(f"run {args.results}", from_results(args.results), q)
    chunks = synthetic(args.neurons, args.chunk_size, args.top_k, args.world, args.seed)
    report("synthetic layer", chunks, q)


if __name__ == "__main__":
    main()
