"""Work per neuron of TeLLMe: images captioned, LLM requests and prompt tokens, against the
reference code's structure.

Runs neuroscribe's TeLLMe code (its image sets, the caption cache, and the `tellme` stage's
`explain_chunk` with the LLM explainer and the LLM simulator) on the demo world for N synthetic
neurons (each a noisy detector of one or two attributes of the world, so top images overlap
between neurons as in a real layer), and the reference structure on the same neurons: per
neuron, 10 rounds of one explanation request (2 few-shot neurons of 75 captions each, then the
neuron's 75 captions) and one simulation request (2 few-shot neurons of 50 captions with their
values, then the neuron's 50 captions), as the authors' code runs it at the least (it repeats a
round's simulation until its interval is narrow enough), with every probe image captioned.

The LLM is an OpenAI-compatible server on 127.0.0.1 (tests/fake_openai.py) answering through the
real `openai` client, so request counts are what an endpoint would see; its token counts are
whitespace words (a real tokenizer gives about 1.3 times more), the same for both structures.

    .venv/bin/python benchmarks/tellme.py            # N=256 neurons, k=3, chunks of 128
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the fake OpenAI-compatible server
sys.path.insert(0, str(REPO / "benchmarks"))

from concepts import attribute_matrix  # noqa: E402
from fake_openai import fake_openai, tellme_responder  # noqa: E402

from neuroscribe.backends.captioners import CachedCaptioner, CaptionRequest  # noqa: E402
from neuroscribe.backends.llm import ChatRequest, LLMClient, OpenAIBackend  # noqa: E402
from neuroscribe.cache import DiskCache  # noqa: E402
from neuroscribe.demo.annotations import AnnotationCaptioner  # noqa: E402
from neuroscribe.demo.world import render_world  # noqa: E402
from neuroscribe.evaluation.split import heldout_mask  # noqa: E402
from neuroscribe.methods.tellme.sets import SetSizes, neuron_sets  # noqa: E402
from neuroscribe.methods.tellme.stages import explain_chunk  # noqa: E402
from neuroscribe.probe import image_id  # noqa: E402

# the reference's sizes: explanation listings, simulation listings, few-shot neurons, rounds
REFERENCE = {"explain": 75, "simulate": 50, "few_shot": 2, "rounds": 10}


def activations(annotations: pd.DataFrame, n_neurons: int, seed: int) -> np.ndarray:
    """[images, neurons]: each neuron a noisy detector of 1-2 attributes of the main object."""
    attrs = attribute_matrix(annotations)
    rng = np.random.default_rng(seed)
    columns = []
    for _ in range(n_neurons):
        chosen = rng.choice(attrs.columns, size=rng.integers(1, 3), replace=False)
        noise = rng.normal(0, 0.3, len(attrs))
        columns.append(attrs[list(chosen)].sum(axis=1).to_numpy() + noise)
    return np.stack(columns, axis=1).astype(np.float32)


def listing(captions: list[str], values: list[object]) -> str:
    return "\n".join(f"{c}\t{v}" for c, v in zip(captions, values, strict=True))


def reference_requests(
    captions: dict[str, str], ids: np.ndarray, values: np.ndarray, rng: np.random.Generator
) -> list[ChatRequest]:
    """One neuron's requests in the reference structure (texts in our words, sizes theirs)."""
    order = np.argsort(-values)
    top = [captions[ids[i]] for i in order[: REFERENCE["explain"]]][::-1]
    quantised = [round(10 * (values[i] - values.min()) / np.ptp(values)) for i in order]
    shots = []
    for _ in range(REFERENCE["few_shot"]):  # few-shot neurons: listings of the same size
        shots += [
            {
                "role": "user",
                "content": "Neuron\n<start>\n" + listing(top, quantised[:75]) + "\n<end>",
            },
            {"role": "assistant", "content": "an example explanation of a few words"},
        ]
    requests = []
    for _ in range(REFERENCE["rounds"]):
        explain = [
            {"role": "system", "content": "Explain the neuron from captions and activations."},
            *shots,
            {
                "role": "user",
                "content": "Neuron\n<start>\n"
                + listing(top, quantised[: len(top)][::-1])
                + "\n<end>\nthe main thing this neuron does is find",
            },
        ]
        requests.append(ChatRequest("fake-model", tuple(explain), temperature=1.0, max_tokens=64))
        drawn = rng.choice(len(ids), REFERENCE["simulate"], replace=False)
        items = [captions[ids[i]] for i in drawn]
        simulate = [{"role": "system", "content": "Predict each caption's activation."}]
        for _ in range(REFERENCE["few_shot"]):
            simulate += [
                {"role": "user", "content": "<start>\n" + listing(items, ["unk"] * len(items))},
                {"role": "assistant", "content": listing(items, [0] * len(items))},
            ]
        simulate.append(
            {
                "role": "user",
                "content": "What the neuron responds to: an explanation\n<start>\n"
                + listing(items, ["unk"] * len(items))
                + "\n<end>",
            }
        )
        requests.append(ChatRequest("fake-model", tuple(simulate), max_tokens=512))
    return requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--neurons", type=int, default=256)
    parser.add_argument("--candidates", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--prompt-mode", default="compact", choices=["compact", "reference"])
    parser.add_argument("--neurons-per-request", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    n = args.neurons

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        annotations = render_world(root / "world", args.images, 64, args.seed)
        annotations["image_id"] = [image_id("world", r) for r in annotations["relpath"]]
        ids = annotations["image_id"].to_numpy()
        paths = dict(zip(ids, annotations["relpath"], strict=True))
        values = activations(annotations, n, args.seed)
        heldout = heldout_mask(ids, 0.2)
        manifest = root / "manifest.parquet"
        pd.DataFrame({"image_id": ids, "path": [paths[i] for i in ids]}).to_parquet(manifest)
        weights = root / "weights.parquet"
        empty = {c: [] for c in ("model", "layer", "neuron", "classes", "weights", "path")}
        pd.DataFrame(empty).astype({"neuron": "int64"}).to_parquet(weights)

        # the captions stage: each chunk's image sets, captioned through one cache for the run
        captioner = AnnotationCaptioner.from_world([("world", root / "world")])
        chunks = []
        listed = 0
        with DiskCache(root / "cache", "captions") as store:
            cached = CachedCaptioner(captioner, store)
            for start in range(0, n, args.chunk_size):
                neurons = list(range(start, min(start + args.chunk_size, n)))
                table = neuron_sets(values[:, neurons], heldout, ids, neurons, SetSizes())
                texts = cached.caption([CaptionRequest(i, paths[i]) for i in table["image_id"]])
                listed += len(table)
                table["caption"], table["captioner"] = texts, cached.id
                table["model"], table["layer"] = "m", "l"
                path = root / f"captions-{start}.parquet"
                table.drop(columns="position").to_parquet(path)
                chunks.append(path)
        captioned = cached.stats.captioned
        all_captions = dict(
            zip(ids, captioner.caption([CaptionRequest(i, paths[i]) for i in ids]), strict=True)
        )

        with fake_openai(default=tellme_responder) as server:
            llm = {
                "backend": "openai",
                "model": "fake-model",
                "base_url": server.base_url,
                "api_key_env": None,
                "seed": 0,
                "max_concurrency": 8,
                "max_attempts": 2,
                "timeout_s": 30,
            }
            explain = {
                "candidates": args.candidates,
                "candidates_via": "n",
                "neurons_per_request": args.neurons_per_request,
                "prompt_mode": args.prompt_mode,
                "prompts": None,
                "temperature": 1.0,
                "max_tokens": 64,
            }
            common = {
                "weights": weights,
                "manifest": manifest,
                "llm": llm,
                "explain": explain,
                "weight_sets": {},
                "simulator": {"backend": "llm", "model": "unused", "logprobs": True},
                "worlds": [],
                "cache": root / "llm-cache",
            }
            for i, path in enumerate(chunks):
                explain_chunk(captions=path, out=root / f"tellme-{i}.parquet", **common)
            ours = list(server.requests)
            for i, path in enumerate(chunks):  # a rerun: everything from the cache
                explain_chunk(captions=path, out=root / f"again-{i}.parquet", **common)
            rerun = len(server.requests) - len(ours)

            before = len(server.requests)
            client = LLMClient(
                OpenAIBackend(server.base_url, "fake-model", api_key_env=None),
                None,
                max_concurrency=8,
            )
            rng = np.random.default_rng(args.seed)
            reference = [
                r
                for j in range(n)
                for r in reference_requests(all_captions, ids, values[:, j], rng)
            ]
            client.chat_many(reference)
            reference_bodies = server.requests[before:]

    def words(bodies: list[dict]) -> int:
        return sum(len(str(m["content"]).split()) for b in bodies for m in b["messages"])

    ours_words, ref_words = words(ours) / n, words(reference_bodies) / n
    print(
        f"neurons {n}, k={args.candidates} candidates, prompt mode {args.prompt_mode}, world {args.images} images"
    )
    print(
        f"{'':<24} {'requests/neuron':>16} {'prompt words/neuron':>20} {'images captioned/neuron':>24}"
    )
    print(f"{'neuroscribe':<24} {len(ours) / n:>16.2f} {ours_words:>20.0f} {captioned / n:>24.2f}")
    print(
        f"{'reference structure':<24} {len(reference_bodies) / n:>16.2f} {ref_words:>20.0f} {args.images / n:>24.2f}"
    )
    print(
        f"  images listed per neuron: {listed / n:.0f} (explain and score sets), {captioned} distinct captioned in all"
    )
    print(f"  a rerun of every chunk: {rerun} requests")
    ok_requests = len(ours) / n <= args.candidates + 1
    ratio = ref_words / ours_words
    print(
        f"  target requests/neuron <= k+1 = {args.candidates + 1}: {'met' if ok_requests else 'NOT met'}"
    )
    print(
        f"  target prompt tokens >= 3x fewer than the reference structure: {'met' if ratio >= 3 else 'NOT met'} ({ratio:.1f}x)"
    )


if __name__ == "__main__":
    main()
