"""Work per neuron of the Describe-and-Dissect "describe" half: captions and LLM requests.

Runs the caption and concept stages' code on the demo world for N synthetic neurons (each prefers
one attribute or attribute pair of the world, so exemplars overlap between neurons the way they
do in a real layer) and prints, per neuron: exemplars, distinct exemplars, images actually
captioned, and LLM requests and tokens in each prompt mode, against the reference code's
structure (K caption simplifications + N summaries, at least 15 requests per neuron).

The LLM is an OpenAI-compatible server on 127.0.0.1 (tests/fake_openai.py) answering through the
real `openai` client, so request counts are what an endpoint would see. Its token counts are
whitespace words (a real tokenizer gives about 1.3 times more); its wall time means nothing and
is not printed. "calls" counts requests before the cache (what code without a cache pays);
"requests" counts what reached the server.

    .venv/bin/python benchmarks/concepts.py            # N=256 neurons, K=10, chunks of 128
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the fake OpenAI-compatible server

from fake_openai import fake_openai, labeller  # noqa: E402

from neuroscribe.backends.captioners import CachedCaptioner, CaptionRequest  # noqa: E402
from neuroscribe.backends.llm import LLMClient, OpenAIBackend  # noqa: E402
from neuroscribe.cache import DiskCache  # noqa: E402
from neuroscribe.demo.annotations import AnnotationCaptioner  # noqa: E402
from neuroscribe.demo.world import render_world  # noqa: E402
from neuroscribe.methods.dnd.concepts import BatchedProposer, ConceptSettings, ReferenceProposer  # noqa: E402
from neuroscribe.probe import image_id  # noqa: E402


def attribute_matrix(annotations: pd.DataFrame) -> pd.DataFrame:
    """images × attributes (shape/colour/texture of the main object, background) as 0/1."""
    main = [objs[0] for objs in annotations["objects"]]
    table = pd.DataFrame(
        {
            "shape": [o["shape"] for o in main],
            "colour": [o["colour"] for o in main],
            "texture": [o["texture"] for o in main],
            "background": annotations["background"],
        }
    )
    return pd.get_dummies(table).astype(float)


def synthetic_exemplars(
    annotations: pd.DataFrame, n_neurons: int, top_k: int, seed: int
) -> list[list[str]]:
    """Per neuron, the image ids of its top-K images: a noisy detector of 1-2 attributes."""
    attrs = attribute_matrix(annotations)
    rng = np.random.default_rng(seed)
    ids = annotations["image_id"].to_numpy()
    out = []
    for _ in range(n_neurons):
        chosen = rng.choice(attrs.columns, size=rng.integers(1, 3), replace=False)
        activation = attrs[list(chosen)].sum(axis=1).to_numpy() + rng.normal(0, 0.3, len(ids))
        out.append(list(ids[np.argsort(-activation, kind="stable")[:top_k]]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--neurons", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--candidates", type=int, default=5)
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        annotations = render_world(root / "world", args.images, 64, args.seed)
        annotations["image_id"] = [image_id("world", r) for r in annotations["relpath"]]
        exemplars = synthetic_exemplars(annotations, args.neurons, args.top_k, args.seed)
        paths = dict(zip(annotations["image_id"], annotations["relpath"], strict=True))

        # captions: one CachedCaptioner call per chunk job, one cache for the run
        captioner = AnnotationCaptioner.from_world([("world", root / "world")])
        captions: list[list[str]] = []
        t0 = time.perf_counter()
        with DiskCache(root / "cache", "captions") as store:
            cached = CachedCaptioner(captioner, store)
            for start in range(0, args.neurons, args.chunk_size):
                chunk = exemplars[start : start + args.chunk_size]
                flat = [CaptionRequest(i, paths[i]) for ids in chunk for i in ids]
                texts = iter(cached.caption(flat))
                captions += [[next(texts) for _ in ids] for ids in chunk]
        caption_s = time.perf_counter() - t0
        stats = cached.stats
        distinct_per_neuron = np.mean([len(set(ids)) for ids in exemplars])
        n = args.neurons
        print(f"neurons {n}, top-K {args.top_k}, chunks of {args.chunk_size}, world {args.images}")
        print(
            f"captions: {stats.requests / n:.2f} exemplars/neuron, "
            f"{distinct_per_neuron:.2f} distinct/neuron, "
            f"{stats.captioned / n:.2f} captioned/neuron "
            f"({stats.captioned} images for {stats.requests} exemplars; "
            f"{stats.cache_hits} cache hits across chunks; {caption_s:.2f} s)"
        )
        ok = stats.captioned / n <= distinct_per_neuron
        print(
            f"  target captioned/neuron <= distinct exemplars/neuron: {'met' if ok else 'NOT met'}"
        )

        neurons = list(enumerate(captions))
        modes = [
            ("reference", ReferenceProposer, 1),
            ("batched", BatchedProposer, 1),
            ("batched x8", BatchedProposer, 8),
        ]
        print(f"LLM ({args.candidates} candidates per neuron):")
        print(
            f"  {'mode':<12} {'calls/neuron':>13} {'requests/neuron':>16} "
            f"{'prompt words/neuron':>20} {'reply words/neuron':>19} {'rerun requests':>15}"
        )
        results = {}
        with fake_openai(default=labeller) as server:
            for name, cls, per in modes:
                settings = ConceptSettings(
                    model="fake-model", n=args.candidates, neurons_per_request=per
                )
                with DiskCache(root / f"cache-{name}", "llm") as store:
                    backend = OpenAIBackend(server.base_url, "fake-model", api_key_env=None)
                    records = cls(LLMClient(backend, store, max_concurrency=8), settings).propose(
                        neurons
                    )
                    before = len(server.requests)
                    cls(LLMClient(backend, store), settings).propose(neurons)
                    rerun = len(server.requests) - before
                req = sum(r.llm_requests for r in records) / n
                calls = sum(r.llm_requests + r.llm_cache_hits for r in records) / n
                results[name] = req
                print(
                    f"  {name:<12} {calls:>13.2f} {req:>16.2f} "
                    f"{sum(r.prompt_tokens for r in records) / n:>20.1f} "
                    f"{sum(r.completion_tokens for r in records) / n:>19.1f} {rerun:>15}"
                )
        ok = results["batched"] <= 1
        print(
            f"  target batched requests/neuron <= 1: {'met' if ok else 'NOT met'} "
            f"({results['batched']:.2f}; reference mode {results['reference']:.2f}, "
            f"{results['reference'] / results['batched']:.0f}x more)"
        )


if __name__ == "__main__":
    main()
