"""TExplain sentence sampling: batched with the KV cache against the reference structure, and
translator training speed.

Builds the demo's tiny word-level GPT-2 (neuroscribe.demo.lm), pre-trains it briefly on demo
world captions, and puts a random translator (seeded, MLP to k prefix tokens) in front of it on
random features. Then, on the same prefixes and seeds:

- batched: `generate_sentences`: every (image, sample) row of all images at once, `--batch-rows`
  rows a batch, one forward over the prefixes and then one token per step through the KV cache;
- reference: `generate_one_at_a_time`: ClipCap's generate2 structure as TExplain runs it, one
  image and one sentence at a time, the whole sequence recomputed at every step;

both with the same nucleus sampling rule and per-(image, sample) generators, so they should give
the same sentences (printed). Then `train_translator` on world captions with random features,
for its steps per second (two validation passes and the final outputs included). Peak memory:
the process's RSS high-water mark (ru_maxrss), and on CUDA torch's peak allocation per phase.

    .venv/bin/python benchmarks/texplain.py                  # 32 images x 16 sentences, CPU
    .venv/bin/python benchmarks/texplain.py --device cuda    # on a GPU node
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neuroscribe.demo.lm import build_word_lm, pretrain_word_lm, world_captions, world_vocabulary
from neuroscribe.device import resolve_device, resolve_dtype
from neuroscribe.methods.texplain.lm import load_lm
from neuroscribe.methods.texplain.sampling import generate_one_at_a_time, generate_sentences
from neuroscribe.methods.texplain.train import TrainSettings, train_translator
from neuroscribe.methods.texplain.translator import TranslatorSpec, build_translator


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def timed(device: torch.device, fn: Any) -> tuple[Any, float]:
    sync(device)
    started = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - started


def prefixes_of(lm: Any, args: argparse.Namespace, device: torch.device) -> torch.Tensor:
    """A random seeded MLP translator on random features: prefixes [images, k, d]."""
    embed_dim = lm.get_input_embeddings().embedding_dim
    spec = TranslatorSpec("mlp", args.features, embed_dim, args.prefix_tokens)
    torch.manual_seed(args.seed)
    translator = build_translator(spec).to(device).eval()
    features = torch.randn(args.images, args.features, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        return translator(features.to(device))


def sampling_rates(lm: Any, tokenizer: Any, args: argparse.Namespace, device: torch.device) -> dict:
    prefixes = prefixes_of(lm, args, device)
    seeds = list(range(args.images))
    common = {
        "sentences": args.sentences,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
    }
    # warm-up: first-call costs (kernel choice, allocator, lazy imports) fall on neither mode
    generate_sentences(lm, tokenizer, prefixes[:2], seeds[:2], **{**common, "sentences": 2})
    generate_one_at_a_time(lm, tokenizer, prefixes[:1], seeds[:1], **{**common, "sentences": 1})

    reset_peak(device)
    batched, batched_s = timed(
        device,
        lambda: generate_sentences(
            lm, tokenizer, prefixes, seeds, batch_rows=args.batch_rows, **common
        ),
    )
    batched_peak = peak_mib(device)
    reset_peak(device)
    reference, reference_s = timed(
        device, lambda: generate_one_at_a_time(lm, tokenizer, prefixes, seeds, **common)
    )
    reference_peak = peak_mib(device)
    n = args.images * args.sentences
    flat_b = [s for image in batched for s in image]
    flat_r = [s for image in reference for s in image]
    words = sum(len(s.split()) for s in flat_b)
    return {
        "sentences": n,
        "words_per_sentence": words / n,
        "batched_s": batched_s,
        "reference_s": reference_s,
        "batched_sentences_per_s": n / batched_s,
        "reference_sentences_per_s": n / reference_s,
        "speedup": reference_s / batched_s,
        "identical_sentences": sum(a == b for a, b in zip(flat_b, flat_r, strict=True)) / n,
        "batched_cuda_peak_mib": batched_peak,
        "reference_cuda_peak_mib": reference_peak,
        "example": flat_b[0],
    }


def training_rate(lm_folder: Path, root: Path, args: argparse.Namespace) -> dict:
    captions = world_captions(args.train_images, seed=args.seed + 1)
    rng = np.random.default_rng(args.seed)
    features = rng.normal(size=(len(captions), args.features)).astype(np.float32)
    settings = TrainSettings(
        lr=1e-3,
        warmup_steps=10,
        batch_size=args.train_batch,
        max_epochs=args.train_epochs,
        val_fraction=0.05,
        eval_every=10**9,
        patience=10**9,
        checkpoint_every=10**9,
        seed=args.seed,
    )
    device = resolve_device(args.device)
    reset_peak(device)
    metrics = train_translator(
        features,
        captions,
        str(lm_folder),
        settings=settings,
        out_dir=root / "train",
        checkpoint_dir=root / "train-checkpoint",
        kind="mlp",
        prefix_tokens=args.prefix_tokens,
        device=args.device,
        dtype=args.dtype,
    )
    return {
        "train_steps": metrics["steps"],
        "train_steps_per_s": metrics["steps_per_s"],
        "train_batch": args.train_batch,
        "train_cuda_peak_mib": peak_mib(device),
        "train_amp": metrics["amp"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--sentences", type=int, default=16, help="sentences per image")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--batch-rows", type=int, default=256)
    parser.add_argument("--prefix-tokens", type=int, default=10)
    parser.add_argument("--features", type=int, default=512, help="translator input units")
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--train-images", type=int, default=1024)
    parser.add_argument("--train-batch", type=int, default=64)
    parser.add_argument("--train-epochs", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA), float32, float16")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = build_word_lm(world_vocabulary(), root / "lm", seed=args.seed)
        pretrained = pretrain_word_lm(
            folder, world_captions(2000, args.seed), args.pretrain_steps, 32, 3e-3, args.seed
        )
        lm, tokenizer = load_lm(str(folder), device, dtype)
        found = sampling_rates(lm, tokenizer, args, device)
        found |= training_rate(folder, root, args)
    found |= {
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "images": args.images,
        "sentences_per_image": args.sentences,
        "batch_rows": args.batch_rows,
        "prefix_tokens": args.prefix_tokens,
        "max_new_tokens": args.max_new_tokens,
        "lm_pretrain_final_loss": pretrained["final_loss"],
        "peak_rss_mib": rss_mib(),
    }

    n = found["sentences"]
    print(
        f"demo LM (word-level GPT-2, 2 layers, width 64) on {found['device']} "
        f"({found['dtype']}, {found['threads']} threads); {args.images} images x "
        f"{args.sentences} sentences = {n}, k={args.prefix_tokens} prefix tokens, "
        f"<= {args.max_new_tokens} new tokens, top-p {args.top_p}"
    )
    print(f"{'':<22} {'seconds':>9} {'sentences/s':>12}")
    print(
        f"{'batched (KV cache)':<22} {found['batched_s']:>9.2f} {found['batched_sentences_per_s']:>12.1f}"
    )
    print(
        f"{'reference structure':<22} {found['reference_s']:>9.2f} {found['reference_sentences_per_s']:>12.1f}"
    )
    print(
        f"  speed-up {found['speedup']:.1f}x (target >= 5x: {'met' if found['speedup'] >= 5 else 'NOT met'}); "
        f"identical sentences {found['identical_sentences']:.1%}; "
        f"{found['words_per_sentence']:.1f} words per sentence, e.g. {found['example']!r}"
    )
    print(
        f"translator training: {found['train_steps']} steps of batch {found['train_batch']}, "
        f"{found['train_steps_per_s']:.1f} steps/s (amp {found['train_amp']})"
    )
    cuda = ""
    if found["batched_cuda_peak_mib"] is not None:
        cuda = (
            f"; CUDA peak batched {found['batched_cuda_peak_mib']:.0f} MiB, reference "
            f"{found['reference_cuda_peak_mib']:.0f} MiB, training {found['train_cuda_peak_mib']:.0f} MiB"
        )
    print(f"peak RSS {found['peak_rss_mib']:.0f} MiB{cuda}")
    print(json.dumps(found))


if __name__ == "__main__":
    main()
