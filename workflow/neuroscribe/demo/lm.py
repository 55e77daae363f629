"""The demo's tiny causal LM: a word-level GPT-2 over the demo world's caption words.

TExplain needs a frozen language model that already speaks the captions' language; no hub is
reachable here, so the demo builds one (a word-level tokenizer and a random GPT-2), pre-trains
it briefly on the world's captions, and saves both with save_pretrained, so that production
code loads it with AutoModelForCausalLM/AutoTokenizer.from_pretrained(folder) like any LM.
Half of its pre-training texts come after their own words in a random order, so that, like a
large LM and unlike a model of the captions alone, it reads what precedes a caption: a prefix
can then steer it (see `pretrain_word_lm`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from neuroscribe.demo.world import BACKGROUND_WORDS, COLOURS, SHAPES, SIZES, TEXTURE_WORDS, scenes

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"  # bos, eos and pad, as GPT-2
UNK = "[UNK]"


def world_vocabulary() -> list[str]:
    """Every word a demo world caption can contain, sorted."""
    words = {"a", "and", "on", "background", *SHAPES, *COLOURS, *SIZES}
    words |= {w for w in TEXTURE_WORDS.values() if w}
    words |= {w for phrase in BACKGROUND_WORDS.values() for w in phrase.split()}
    return sorted(words)


def world_captions(n: int, seed: int) -> list[str]:
    """Captions of the first `n` demo world scenes for `seed` (no rendering needed)."""
    return [scene.caption for scene in scenes(n, size=64, seed=seed)]


def _word_tokenizer(vocabulary: Iterable[str]) -> Any:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w.lower() for w in vocabulary} - {EOS.lower(), UNK.lower()})
    vocab = {EOS: 0, UNK: 1} | {w: i + 2 for i, w in enumerate(words)}
    word_level = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    word_level.normalizer = normalizers.Lowercase()
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    # no decoder: tokenizers then joins the decoded tokens with single spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=word_level,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=UNK,
    )


def build_word_lm(
    vocabulary: Iterable[str],
    folder: str | Path,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_positions: int = 48,
    seed: int = 0,
) -> Path:
    """A word-level tokenizer over `vocabulary` and a random GPT-2, saved in `folder`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _word_tokenizer(vocabulary)
    tokenizer.model_max_length = n_positions
    tokenizer.save_pretrained(folder)
    eos = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        # no dropout: the caption language is tiny and regular, and it would slow learning it
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def _example(
    words: list[int], eos: int, context: bool, generator: torch.Generator, positions: int
) -> tuple[list[int], list[int]]:
    """One training sequence and its labels: bos + words + eos, or (context) the text's distinct
    words in a random order, with no bos, then the words + eos, the context not predicted. A
    context that would not fit the model's positions is left out."""
    distinct = sorted(set(words))
    if not context or len(distinct) + len(words) + 1 > positions:
        return [eos, *words, eos], [eos, *words, eos]
    shuffled = [distinct[i] for i in torch.randperm(len(distinct), generator=generator)]
    return [*shuffled, *words, eos], [-100] * len(shuffled) + [*words, eos]


def _batch(
    encoded: list[list[int]],
    eos: int,
    batch_size: int,
    context_rate: float,
    generator: torch.Generator,
    positions: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids, attention mask and labels [B, T] of a random batch, right-padded."""
    rows = torch.randint(len(encoded), (batch_size,), generator=generator).tolist()
    contexts = (torch.rand(batch_size, generator=generator) < context_rate).tolist()
    examples = [
        _example(encoded[r], eos, c, generator, positions)
        for r, c in zip(rows, contexts, strict=True)
    ]
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((batch_size, width), eos, dtype=torch.long)
    mask = torch.zeros((batch_size, width), dtype=torch.long)
    labels = torch.full((batch_size, width), -100, dtype=torch.long)
    for i, (row, target) in enumerate(examples):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        labels[i, : len(row)] = torch.tensor(target)
    return ids, mask, labels


def pretrain_word_lm(
    folder: str | Path,
    texts: list[str],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    context_rate: float = 0.5,
) -> dict[str, Any]:
    """Causal-LM training of the LM in `folder` on `texts`, saved back into `folder`.
    Deterministic for a seed on the CPU.

    Each text is seen as bos + text + eos, or, at `context_rate`, after its own distinct
    words in a random order (and no bos). The second form is why a prefix can steer this LM: a
    model trained on the captions alone has no use for anything before them, so a translator
    into it cannot lower the captions' loss at all (measured: none, after 1,000 steps), whereas
    large LMs read their context. Generating from bos alone still gives plain captions.

    Returns first/final loss (final: the mean over the last tenth of the steps, both forms
    mixed), steps, seconds.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.train()
    eos = tokenizer.eos_token_id
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    positions = model.config.n_positions
    longest = max(len(ids) for ids in encoded) + 2
    if longest > positions:
        raise ValueError(
            f"a text of {longest - 2} words does not fit the LM's {positions} positions with "
            "bos and eos; build it with a larger n_positions"
        )
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses: list[float] = []
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # dropout, if a config has any
        for _ in range(steps):
            ids, mask, labels = _batch(encoded, eos, batch_size, context_rate, generator, positions)
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
            optimiser.zero_grad(set_to_none=True)
            out.loss.backward()
            optimiser.step()
            losses.append(float(out.loss.detach()))
    seconds = time.perf_counter() - started
    model.eval().save_pretrained(folder)
    tail = losses[-max(1, steps // 10) :]
    found = {
        "steps": steps,
        "first_loss": losses[0] if losses else None,
        "final_loss": sum(tail) / len(tail) if losses else None,
        "seconds": seconds,
    }
    log.info("pre-trained the demo LM in %s: %s", folder, found)
    return found
