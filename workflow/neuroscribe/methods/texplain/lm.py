"""The frozen causal LM the translator writes into: loading it, tokenising captions, and the
captioning loss of a batch of prefixes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

ROLE = "texplain lm"
IGNORE = -100  # cross_entropy's ignore_index: prefix positions and padding


def load_lm(
    model: str, device: torch.device, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer (hub id or local folder), frozen, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from neuroscribe.hub import ModelNotCached, fetching

    try:
        with fetching(model, ROLE):
            tokenizer = AutoTokenizer.from_pretrained(model)
            lm = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
    except ModelNotCached:
        raise
    except Exception as exc:
        raise RuntimeError(
            f"could not load the TExplain language model {model!r} as a causal LM "
            f"(AutoModelForCausalLM + AutoTokenizer): {exc}"
        ) from exc
    if tokenizer.eos_token_id is None:
        raise RuntimeError(f"the tokenizer of TExplain language model {model!r} has no eos token")
    if tokenizer.pad_token_id is None:
        # GPT-2 style tokenizers have no pad token; padding is masked out, so any id will do
        tokenizer.pad_token = tokenizer.eos_token
    lm.to(device).eval().requires_grad_(False)
    return lm, tokenizer


def caption_batch(
    tokenizer: PreTrainedTokenizerBase, captions: Sequence[str], max_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, T] of each caption followed by eos (cut to `max_tokens` with the eos kept),
    right-padded, and the mask [B, T] of real tokens. T is the longest row, not max_tokens."""
    if max_tokens < 2:
        raise ValueError(f"max_caption_tokens must be >= 2 (a word and eos), got {max_tokens}")
    encoded = tokenizer(list(captions), add_special_tokens=False)["input_ids"]
    rows = [[*ids[: max_tokens - 1], tokenizer.eos_token_id] for ids in encoded]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def prefix_loss(
    lm: PreTrainedModel,
    prefixes: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of the caption tokens (eos included) given the prefixes [B, k, d]: the LM
    reads prefix ++ caption embeddings; each caption token is predicted from the position
    before it (the first from the last prefix position). `reduction` "mean" over real caption
    tokens, or "sum" (validation adds sums over batches, then divides by the token count)."""
    embedding = lm.get_input_embeddings()
    captions = embedding(ids)
    k = prefixes.shape[1]
    inputs = torch.cat([prefixes.to(captions.dtype), captions], dim=1)
    attention = torch.cat([mask.new_ones(mask.shape[0], k), mask], dim=1)
    logits = lm(inputs_embeds=inputs, attention_mask=attention).logits
    # position k-1+t predicts caption token t; float32 so an fp16 LM's loss does not round
    predicted = logits[:, k - 1 : -1].float()
    targets = ids.masked_fill(mask == 0, IGNORE)
    return F.cross_entropy(
        predicted.reshape(-1, predicted.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction=reduction,
    )
