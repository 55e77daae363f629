"""Sentences from prefixes: many per image, batched across images and samples, with the KV cache.

Sampling is nucleus sampling (temperature, then top-p) done here rather than by `generate`, so
that each row draws its uniforms from its own generator seeded by (image seed, sample index):
an image's sentences then do not depend on which images share its batch, and can be cached per
image. `generate_one_at_a_time` is the reference structure (ClipCap's generate2: one sentence at
a time, the whole sequence recomputed each step, no KV cache) with the same sampling rule; the
benchmark times it, and the tests check that both give the same sentences.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (ints, strings): stable across processes and platforms,
    unlike hash(), and unrelated for neighbouring inputs, unlike seed + i."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def row_uniforms(image_seed: int, sample: int, steps: int) -> torch.Tensor:
    """The uniforms [steps] one sampled sentence uses, step t the t-th draw of its generator."""
    generator = torch.Generator().manual_seed(derived_seed(image_seed, sample))
    return torch.rand(steps, generator=generator, dtype=torch.float64)


def pick_tokens(
    logits: torch.Tensor,
    uniforms: torch.Tensor | None,
    temperature: float,
    top_p: float,
    greedy: bool,
) -> torch.Tensor:
    """Next tokens [R] from last-position logits [R, V]: argmax, or nucleus sampling by inverse
    CDF at each row's uniform (so a row's draw depends on its own uniform alone)."""
    if greedy:
        return logits.argmax(-1)
    assert uniforms is not None
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
    # keep the most likely tokens until their mass reaches top_p (the first always)
    kept = sorted_p * ((sorted_p.cumsum(-1) - sorted_p) < top_p)
    cumulative = kept.cumsum(-1)
    target = uniforms.to(cumulative.device, cumulative.dtype) * cumulative[:, -1]
    index = torch.searchsorted(cumulative, target[:, None], right=True)
    index = index.clamp_max(probs.shape[-1] - 1)
    return order.gather(1, index).squeeze(1)


def _check(temperature: float, top_p: float, greedy: bool, seeds: int, images: int) -> None:
    if seeds != images:
        raise ValueError(f"one seed per image: {seeds} seeds for {images} prefixes")
    if not greedy and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def _decode(tokenizer: PreTrainedTokenizerBase, rows: list[list[int]]) -> list[str]:
    return [t.strip() for t in tokenizer.batch_decode(rows, skip_special_tokens=True)]


def _lm_place(lm: PreTrainedModel) -> tuple[torch.device, torch.dtype]:
    weight = lm.get_input_embeddings().weight
    return weight.device, weight.dtype


def _cache_name(lm: PreTrainedModel) -> str:
    """The KV cache's keyword: `cache` in recent transformers 5.x, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"


def _cache_of(out: Any) -> Any:
    return out["cache"] if "cache" in out else out["past_key_values"]


@torch.inference_mode()
def _generate_rows(
    lm: PreTrainedModel,
    prefixes: torch.Tensor,
    uniforms: torch.Tensor | None,
    eos: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    greedy: bool,
) -> list[list[int]]:
    """Token ids of each row's sentence (eos excluded) for prefix rows [R, k, d], all at once:
    one forward over the prefixes, then one token per step through the KV cache."""
    out = lm(inputs_embeds=prefixes, use_cache=True, logits_to_keep=1)
    cache_name, cache, logits = _cache_name(lm), _cache_of(out), out.logits[:, -1]
    tokens = torch.empty((len(prefixes), 0), dtype=torch.long, device=prefixes.device)
    done = torch.zeros(len(prefixes), dtype=torch.bool, device=prefixes.device)
    for step in range(max_new_tokens):
        drawn = None if uniforms is None else uniforms[:, step]
        chosen = pick_tokens(logits, drawn, temperature, top_p, greedy)
        # finished rows keep running (their cache rows cost little) but only emit eos
        chosen = chosen.masked_fill(done, eos)
        tokens = torch.cat([tokens, chosen[:, None]], dim=1)
        done |= chosen == eos
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        out = lm(input_ids=chosen[:, None], use_cache=True, **{cache_name: cache})
        cache, logits = _cache_of(out), out.logits[:, -1]
    rows = []
    for row in tokens.tolist():
        rows.append(row[: row.index(eos)] if eos in row else row)
    return rows


def generate_sentences(
    lm: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prefixes: torch.Tensor,
    seeds: Sequence[int],
    sentences: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    batch_rows: int = 256,
    greedy: bool = False,
) -> list[list[str]]:
    """`sentences` sentences for each image's prefix [B, k, d]: rows are (image, sample) pairs,
    image-major, run `batch_rows` at a time. Sample j of an image with seed s is the same
    sentence whatever else is in its batch."""
    _check(temperature, top_p, greedy, len(seeds), len(prefixes))
    device, dtype = _lm_place(lm)
    eos = tokenizer.eos_token_id
    pairs = [(i, j) for i in range(len(prefixes)) for j in range(sentences)]
    texts: list[str] = []
    for start in range(0, len(pairs), batch_rows):
        batch = pairs[start : start + batch_rows]
        images = torch.tensor([i for i, _ in batch], device=prefixes.device)
        rows = prefixes.index_select(0, images).to(device, dtype)
        uniforms = None
        if not greedy:
            uniforms = torch.stack([row_uniforms(seeds[i], j, max_new_tokens) for i, j in batch])
        ids = _generate_rows(lm, rows, uniforms, eos, max_new_tokens, temperature, top_p, greedy)
        texts += _decode(tokenizer, ids)
    return [texts[i * sentences : (i + 1) * sentences] for i in range(len(prefixes))]


@torch.inference_mode()
def _generate_one(
    lm: PreTrainedModel,
    prefix: torch.Tensor,
    uniforms: torch.Tensor | None,
    eos: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    greedy: bool,
) -> list[int]:
    """One sentence from one prefix [k, d], the whole sequence recomputed at every step."""
    embedding = lm.get_input_embeddings()
    sequence = prefix[None]
    row: list[int] = []
    for step in range(max_new_tokens):
        logits = lm(inputs_embeds=sequence).logits[:, -1]
        drawn = None if uniforms is None else uniforms[step : step + 1]
        token = pick_tokens(logits, drawn, temperature, top_p, greedy)
        if int(token) == eos:
            break
        row.append(int(token))
        sequence = torch.cat([sequence, embedding(token[None])], dim=1)
    return row


def generate_one_at_a_time(
    lm: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prefixes: torch.Tensor,
    seeds: Sequence[int],
    sentences: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    greedy: bool = False,
) -> list[list[str]]:
    """The reference structure: for each image, one sentence at a time, no batching and no KV
    cache (ClipCap's generate2), with `generate_sentences`' sampling rule and seeds."""
    _check(temperature, top_p, greedy, len(seeds), len(prefixes))
    device, dtype = _lm_place(lm)
    eos = tokenizer.eos_token_id
    found = []
    for i, prefix in enumerate(prefixes.to(device, dtype)):
        rows = []
        for j in range(sentences):
            uniforms = None if greedy else row_uniforms(seeds[i], j, max_new_tokens)
            rows.append(
                _generate_one(lm, prefix, uniforms, eos, max_new_tokens, temperature, top_p, greedy)
            )
        found.append(_decode(tokenizer, rows))
    return found
