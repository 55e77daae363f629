"""TExplain's jobs.

- `texplain_lm` (demo only): a tiny word-level GPT-2 pre-trained on the demo world's captions;
- `texplain_captions` (once): captions of the explain split, through the run's caption cache;
- `texplain_features` (per target): the input layer's pooled features and the target's class
  scores for every probe image, by the activation stage's own extraction;
- `texplain_train` (per target): the translator (see `train`);
- `texplain_reference` (per target): the sentences of the random reference images, and the
  per-class words;
- `texplain` (per chunk): each neuron's words, from its exemplars and (input layer only) from a
  step along its unit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from neuroscribe import backends
from neuroscribe.config import LayerSpec, TargetSpec
from neuroscribe.evaluation.split import heldout_mask
from neuroscribe.failures import Failure, check_failures
from neuroscribe.methods.texplain.sentences import Features, Sampling, SentenceSource, read_features
from neuroscribe.tables import read_tables, write_table
from neuroscribe.words import WordScore, log_odds, sentence_counts

log = logging.getLogger(__name__)

SCHEMAS = Path(__file__).resolve().parents[3] / "schemas"
EXEMPLARS, DIRECTION = "exemplars", "direction"
SCORE_KIND = "log_odds_z"
EXAMPLES = 5  # sentences kept per neuron and class, for the report and for audit


# -- the demo LM ------------------------------------------------------------------------------
def pretrain_demo_lm(out: str, captions: int = 4000, steps: int = 1000, seed: int = 0) -> None:
    """A tiny word-level GPT-2 pre-trained on captions of demo-world scenes drawn for it (not
    the probe images), saved as a transformers folder at `out` (written whole, then renamed).

    Steps matter more than batch size: at 400 steps of 64 the LM copies a prefix's shape and
    colour words but not the background, the caption's last word (a translator fed the true
    attributes said "noisy" for 43 % of noisy and 39 % of other scenes); at 1,000 steps of 32
    it copies all three (95 % and 3 %), in about as much time."""
    from neuroscribe.demo.lm import (
        build_word_lm,
        pretrain_word_lm,
        world_captions,
        world_vocabulary,
    )

    final = Path(out)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    build_word_lm(world_vocabulary(), tmp, seed=seed)
    metrics = pretrain_word_lm(
        tmp, world_captions(captions, seed), steps=steps, batch_size=32, lr=3e-3, seed=seed
    )
    (tmp / "pretraining.json").write_text(json.dumps(metrics, indent=1) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    log.info("demo LM: %s", metrics)


# -- training data ----------------------------------------------------------------------------
def explain_split(image_ids: Sequence[str], holdout: float) -> np.ndarray:
    """The images no method holds out (all of them with no held-out share)."""
    ids = np.asarray(image_ids, dtype=str)
    return ~heldout_mask(ids, holdout) if holdout else np.ones(len(ids), dtype=bool)


def caption_explain_split(
    manifest: str | Path,
    out: str | Path,
    holdout: float,
    captioner: dict[str, Any],
    worlds: Sequence[tuple[str, str]],
    cache: str | Path,
    device: str = "auto",
    dtype: str = "auto",
) -> None:
    """The caption of every explain-split image (each captioned once per run, ever, through
    the caption cache that DnD and TeLLMe share)."""
    ids = pd.read_parquet(manifest, columns=["image_id"])["image_id"].astype(str).to_numpy()
    keep = ids[explain_split(ids, holdout)]
    captions, cached = backends.caption_images(
        list(keep), manifest, captioner, worlds, cache, device, dtype
    )
    table = pd.DataFrame({"image_id": keep, "caption": captions, "captioner": cached.id})
    write_table(table, out, SCHEMAS / "texplain_captions.schema.yaml")
    log.info("captioned %d explain-split images (%s)", len(keep), cached.id)


def extract_features(
    manifest: str | Path,
    target: TargetSpec,
    layer: dict[str, Any],
    output_layer: str | None,
    out: str | Path,
    batch_size: int = 64,
    workers: int = 2,
    device: str = "auto",
    dtype: str = "auto",
) -> None:
    """The translator's input (the layer's pooled units) and the target's class scores, for
    every probe image: one pass of the activation stage's extraction over the whole probe."""
    from neuroscribe.activations import extract_shard

    layers = [LayerSpec(**layer)]
    if output_layer and output_layer != layer["name"]:
        layers.append(LayerSpec(output_layer, "all", "avg", layer["tokens"]))
    extract_shard(manifest, target, layers, 0, 1, out, batch_size, workers, device, dtype)


def train(
    features: str | Path,
    captions: str | Path,
    layer: str,
    lm: str,
    translator: dict[str, Any],
    settings: dict[str, Any],
    out_dir: str | Path,
    checkpoint_dir: str | Path,
    device: str = "auto",
    dtype: str = "auto",
) -> None:
    """The translator from the layer's features of the explain-split images to their
    captions (resuming from `checkpoint_dir` after a preemption)."""
    from neuroscribe.methods.texplain.train import TrainSettings, train_translator

    pairs = pd.read_parquet(captions, columns=["image_id", "caption"])
    check_vocabulary(lm, pairs["caption"].tolist())
    found = read_features(features, layer, None)
    x = found.values[found.rows(pairs["image_id"].tolist())]
    log.info("training on %d (features, caption) pairs of %d units", len(x), x.shape[1])
    metrics = train_translator(
        x,
        pairs["caption"].tolist(),
        lm,
        settings=TrainSettings(**settings),
        out_dir=Path(out_dir),
        checkpoint_dir=Path(checkpoint_dir),
        kind=translator["kind"],
        prefix_tokens=translator["prefix_tokens"],
        device=device,
        dtype=dtype,
    )
    log.info("translator trained: %s", metrics)


MAX_UNKNOWN = 0.2


def check_vocabulary(lm: str, captions: Sequence[str]) -> None:
    """Fail before training when the LM's tokenizer cannot spell the captions (a word-level
    LM, such as the demo's, meets another captioner's words)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(lm)
    unk = tokenizer.unk_token_id
    if unk is None or not captions:
        return
    ids = [i for row in tokenizer(list(captions[:2000]))["input_ids"] for i in row]
    share = sum(i == unk for i in ids) / max(1, len(ids))
    if share > MAX_UNKNOWN:
        raise ValueError(
            f"the TExplain LM {lm!r} does not know {share:.0%} of the caption tokens (its unknown "
            "token); the demo LM knows only the demo world's words: set texplain.lm.model to a "
            "causal LM that knows the captioner's language (e.g. gpt2-large)"
        )


# -- words ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Words:
    """How sentences become words and labels (config `texplain`)."""

    reference_images: int = 200
    class_images: int = 100
    prior_size: float | None = None
    top_words: int = 10
    label_words: int = 2

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Words:
        return cls(**data)


def hash_order(image_ids: Sequence[str], seed: int) -> list[str]:
    """Image ids in sha256(seed, id) order: a random draw that every job and machine repeats."""
    key = {i: hashlib.sha256(f"{seed}|{i}".encode()).hexdigest() for i in image_ids}
    return sorted(image_ids, key=key.__getitem__)


def overused(focus: Counter[str], reference: Counter[str], words: Words) -> list[WordScore]:
    """The words the focus sentences use more than the reference ones (z > 0), best first,
    from their word counts (`sentence_counts`)."""
    scores = log_odds(focus, reference, prior_size=words.prior_size)
    return [s for s in scores if s.zscore > 0][: words.top_words]


def _flat(groups: Sequence[Sequence[str]]) -> list[str]:
    return [text for group in groups for text in group]


def _class_names(target: TargetSpec, classes_file: str | None, width: int) -> list[str]:
    from neuroscribe.evaluation.classes import class_names

    names = class_names(target, classes_file, width)
    return [n[0] for n in names] if names else [f"class {i}" for i in range(width)]


def _class_rows(
    model: str,
    by: str,
    groups: dict[str, list[str]],
    sentences: dict[str, list[str]],
    words: Words,
) -> list[dict[str, Any]]:
    """Per class, its words against the other classes' images."""
    rows = []
    texts = {name: _flat([sentences[i] for i in images]) for name, images in groups.items()}
    counts = {name: sentence_counts(focus) for name, focus in texts.items()}
    total = sum(counts.values(), Counter())
    for name, images in groups.items():
        focus = texts[name]
        rest = sum(len(t) for other, t in texts.items() if other != name)
        if not focus or not rest:
            continue
        # the groups are disjoint (one class per image): the rest's counts are the total's less
        # this class's
        for rank, s in enumerate(overused(counts[name], total - counts[name], words)):
            rows.append(
                {
                    "model": model,
                    "by": by,
                    "class": name,
                    "rank": rank,
                    "word": s.word,
                    "zscore": s.zscore,
                    "delta": s.delta,
                    "count": s.count,
                    "reference_count": s.reference_count,
                    "images": len(images),
                    "sentences": len(focus),
                    "reference_sentences": rest,
                    "examples": focus[:EXAMPLES],
                }
            )
    return rows


def _groups(
    image_ids: np.ndarray, keys: Sequence[str], per_class: int, seed: int
) -> dict[str, list[str]]:
    """Up to `per_class` images per key value (a drawn sample, the same on every rerun)."""
    table = pd.DataFrame({"image_id": np.asarray(image_ids, dtype=str), "key": list(keys)})
    return {
        str(key): hash_order(group["image_id"].tolist(), seed)[:per_class]
        for key, group in table.groupby("key", sort=True)
    }


def reference_and_classes(
    features: str | Path,
    manifest: str | Path,
    layer: str,
    output_layer: str | None,
    target: TargetSpec,
    classes_file: str | None,
    lm: str,
    translator: str | Path,
    holdout: float,
    sampling: Sampling,
    words: Words,
    cache: str | Path,
    out_reference: str | Path,
    out_classes: str | Path,
    device: str = "auto",
    dtype: str = "auto",
) -> None:
    """The sentences of `reference_images` random explain-split images (what every neuron's
    exemplars are compared with), and per class the words overrepresented in the sentences of
    the images the target predicts as that class (and of those labelled with it, where the probe
    set has labels), against the other classes' images."""
    found = read_features(features, layer, output_layer)
    split = explain_split(found.image_ids, holdout)
    ids = found.image_ids[split]
    reference = hash_order([str(i) for i in ids], sampling.seed)[: words.reference_images]
    groups: dict[str, dict[str, list[str]]] = {}
    if found.scores is not None:
        names = _class_names(target, classes_file, found.scores.shape[1])
        predicted = [names[k] for k in found.scores[split].argmax(axis=1)]
        groups["predicted"] = _groups(ids, predicted, words.class_images, sampling.seed)
    labels = pd.read_parquet(manifest, columns=["image_id", "label"]).set_index("image_id")["label"]
    truth = labels.reindex(ids)
    if truth.notna().any():
        known = truth.notna().to_numpy()
        groups["label"] = _groups(
            ids[known], truth[known].astype(str).tolist(), words.class_images, sampling.seed
        )
    wanted = list(
        dict.fromkeys([*reference, *(i for g in groups.values() for m in g.values() for i in m)])
    )
    source = SentenceSource(lm, translator, sampling, cache, device, dtype)
    sentences = source.sentences(wanted, found.values[found.rows(wanted)])
    source.close()
    log.info("%d images' sentences (%d sampled now)", len(wanted), source.generated)
    write_table(
        pd.DataFrame({"image_id": reference, "sentences": [sentences[i] for i in reference]}),
        out_reference,
        SCHEMAS / "texplain_reference.schema.yaml",
    )
    rows = [
        row
        for by, group in groups.items()
        for row in _class_rows(target.name, by, group, sentences, words)
    ]
    write_table(
        pd.DataFrame(rows, columns=CLASS_COLUMNS),
        out_classes,
        SCHEMAS / "texplain_classes.schema.yaml",
    )


CLASS_COLUMNS = [
    "model",
    "by",
    "class",
    "rank",
    "word",
    "zscore",
    "delta",
    "count",
    "reference_count",
    "images",
    "sentences",
    "reference_sentences",
    "examples",
]


def classes_table(inputs: list[str], out: str | Path) -> None:
    """Every target's per-class words in one table."""
    table = read_tables(inputs) if inputs else pd.DataFrame(columns=CLASS_COLUMNS)
    write_table(table, out, SCHEMAS / "texplain_classes.schema.yaml")


# -- per neuron -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Labeller:
    """The label from a neuron's top words: the first `label_words` in order, or with an LLM,
    one request (cached) that phrases them."""

    label_words: int
    client: Any = None

    def label(self, top: Sequence[str]) -> str:
        if self.client is None:
            return " ".join(top[: self.label_words])
        from neuroscribe.methods.texplain.phrasing import phrase

        return phrase(self.client, top)

    def redact(self, text: str) -> str:
        """An error's text without the API key (the client knows it)."""
        return self.client.redact(text) if self.client is not None else text


def _labeller(
    words: Words, llm: dict[str, Any] | None, cache: str | Path, device: str, dtype: str
) -> Labeller:
    if llm is None or llm["backend"] == "none":
        return Labeller(words.label_words)
    from neuroscribe.cache import DiskCache

    client = backends.llm_client(llm, DiskCache(cache, "llm"), device, dtype)
    return Labeller(words.label_words, client)


def _neuron_row(
    models: dict[str, str],
    model: str,
    layer: str,
    neuron: int,
    mode: str,
    scores: list[WordScore],
    focus: list[str],
    images: int,
    labeller: Labeller,
) -> dict[str, Any]:
    top = [s.word for s in scores]
    row: dict[str, Any] = {
        "model": model,
        "layer": layer,
        "neuron": neuron,
        "mode": mode,
        "words": top,
        "zscores": [s.zscore for s in scores],
        "counts": [s.count for s in scores],
        "reference_counts": [s.reference_count for s in scores],
        "images": images,
        "sentences": len(focus),
        "examples": focus[:EXAMPLES],
        "status": "ok",
        "error": None,
        "label": None,
        "labels": [],
        "score": None,
        "score_kind": SCORE_KIND,
        "models": json.dumps(models, sort_keys=True),
    }
    if not top:
        row |= {
            "status": "failed",
            "error": (
                f"no word is overrepresented in the {len(focus)} sentences of this neuron's "
                f"{mode} against the reference sentences"
            ),
        }
        return row
    try:
        label = labeller.label(top)
    except Exception as err:  # one neuron's failed request fails that neuron, not the chunk
        error = labeller.redact(f"phrasing the label failed: {err}")
        return row | {"status": "failed", "error": error}
    row |= {"label": label, "labels": [label, *[w for w in top if w != label][:2]]}
    row["score"] = float(scores[0].zscore)
    return row


def explain_chunk(
    exemplars: str | Path,
    reference: str | Path,
    features: str | Path,
    translator: str | Path,
    input_layer: str,
    layer: str,
    model: str,
    neurons: list[int],
    direction: bool,
    direction_scale: float,
    holdout: float,
    lm: str,
    captions: str | Path,
    sampling: Sampling,
    words: Words,
    llm: dict[str, Any] | None,
    cache: str | Path,
    out: str | Path,
    max_failed_fraction: float,
    device: str = "auto",
    dtype: str = "auto",
) -> None:
    """Each neuron's overrepresented words: for its top exemplars against the reference images
    (`exemplars` mode), and, when the layer is the translator's input, for the mean feature
    plus `direction_scale` standard deviations along its unit against the mean feature alone
    (`direction` mode)."""
    tops = pd.read_parquet(exemplars, columns=["neuron", "rank", "image_id"])
    tops = tops.sort_values(["neuron", "rank"]).drop_duplicates(["neuron", "image_id"])
    per_neuron = {int(n): g["image_id"].astype(str).tolist() for n, g in tops.groupby("neuron")}
    found = read_features(features, input_layer, None)
    ref_counts = sentence_counts(
        _flat(pd.read_parquet(reference, columns=["sentences"])["sentences"].tolist())
    )
    source = SentenceSource(lm, translator, sampling, cache, device, dtype)
    labeller = _labeller(words, llm, cache, device, dtype)
    captioner = str(pd.read_parquet(captions, columns=["captioner"])["captioner"].iloc[0])
    models = {"captioner": captioner, "lm": lm} | ({"llm": llm["model"]} if labeller.client else {})
    wanted = list(dict.fromkeys(i for n in neurons for i in per_neuron.get(n, [])))
    sentences = source.sentences(wanted, found.values[found.rows(wanted)])
    rows = []
    for n in neurons:
        images = per_neuron.get(n, [])
        focus = _flat([sentences[i] for i in images])
        rows.append(
            _neuron_row(
                models,
                model,
                layer,
                n,
                EXEMPLARS,
                overused(sentence_counts(focus), ref_counts, words),
                focus,
                len(images),
                labeller,
            )
        )
    if direction:
        rows += _direction_rows(
            source, found, holdout, models, model, layer, neurons, direction_scale, words, labeller
        )
    log.info("%d sentences sampled by this job", source.generated)
    source.close()
    failures = [
        Failure(r["neuron"], f"{r['mode']}: {r['error']}") for r in rows if r["status"] != "ok"
    ]
    write_table(pd.DataFrame(rows), out, SCHEMAS / "texplain.schema.yaml")
    check_failures(
        f"texplain {model} {layer}",
        failures,
        len(rows),
        max_failed_fraction,
        "The table records each failed neuron; a rerun samples nothing again (cached).",
    )


def _direction_rows(
    source: SentenceSource,
    found: Features,
    holdout: float,
    models: dict[str, str],
    model: str,
    layer: str,
    neurons: list[int],
    scale: float,
    words: Words,
    labeller: Labeller,
) -> list[dict[str, Any]]:
    """The words a step along each neuron's unit adds to the mean explain-split feature."""
    x = found.values[explain_split(found.image_ids, holdout)]
    mean, std = x.mean(axis=0), x.std(axis=0)
    base_name = f"direction|{model}|{layer}|mean"
    names = [base_name] + [f"direction|{model}|{layer}|{n}|{scale:g}" for n in neurons]
    steps = np.repeat(mean[None, :], len(names), axis=0)
    for row, n in enumerate(neurons, start=1):
        steps[row, n] += scale * max(float(std[n]), 1e-6)
    drawn = source.sentences(names, steps.astype(np.float32))
    baseline = sentence_counts(drawn[base_name])
    return [
        _neuron_row(
            models,
            model,
            layer,
            n,
            DIRECTION,
            overused(sentence_counts(drawn[name]), baseline, words),
            drawn[name],
            0,
            labeller,
        )
        for n, name in zip(neurons, names[1:], strict=True)
    ]
