"""Ground-truth evaluation on the demo world: are the descriptions right?

Output neurons of the demo CNN each stand for a shape class. A hidden neuron's truth is the
annotated attribute (shape, colour, texture, size or background) that best predicts its
activation over the probe set, by ROC AUC. Each description row is checked against that truth:
does its label name it, and how many of its top exemplars carry it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from scipy.stats import rankdata

from neuroscribe.demo.annotations import load_annotations
from neuroscribe.demo.world import SHAPES, TEXTURE_WORDS
from neuroscribe.merge import stored_neurons
from neuroscribe.tables import write_table
from neuroscribe.words import words

log = logging.getLogger(__name__)


def attribute_tags(annotations: pd.DataFrame) -> list[set[str]]:
    """Per image, its attributes as `kind:value` tags (any object counts)."""
    tags = []
    for objects, background in zip(annotations["objects"], annotations["background"], strict=True):
        found = {f"background:{background}"}
        for obj in objects:
            found |= {
                f"shape:{obj['shape']}",
                f"colour:{obj['colour']}",
                f"texture:{obj['texture']}",
                f"size:{obj['size']}",
            }
        tags.append(found)
    return tags


def tag_words(tag: str) -> set[str]:
    """Words a label may use to name a tag ("texture:stripes" → stripes, striped)."""
    kind, value = tag.split(":", 1)
    names = {value}
    if kind == "texture" and TEXTURE_WORDS.get(value):
        names.add(TEXTURE_WORDS[value])
    if kind == "background" and value == "noise":
        names.add("noisy")
    return names


def truth_phrase(tag: str) -> str:
    """The truth in words, for text similarity ("texture:stripes" → "striped")."""
    kind, value = tag.split(":", 1)
    if kind == "texture" and TEXTURE_WORDS.get(value):
        return TEXTURE_WORDS[value]
    if kind == "background":
        return f"{'noisy' if value == 'noise' else value} background"
    return value


def auc(activations: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """ROC AUC of every neuron (column of [images, neurons]) for every tag ([images, tags])."""
    ranks = rankdata(activations, axis=0)
    n_pos = positives.sum(0).astype(np.float64)
    n_neg = positives.shape[0] - n_pos
    rank_sums = ranks.T @ positives.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (rank_sums - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _names(label: object, truth_words: set[str]) -> bool | None:
    if not isinstance(label, str) or not label:
        return None
    return bool(truth_words & set(words(label)))


def evaluate(
    descriptions: str | Path,
    manifest: str | Path,
    worlds: Sequence[tuple[str, str | Path]],
    layer_files: dict[str, str | Path],
    output_layer: str | None,
    model: str,
    classes: Sequence[str] = SHAPES,
) -> pd.DataFrame:
    """One evaluation row per description row of `model`; logs the headline numbers."""
    table = pd.read_parquet(descriptions)
    table = table[table["model"] == model]
    probe = pd.read_parquet(manifest)
    notes = load_annotations(worlds).set_index("image_id")
    annotated = probe["image_id"].isin(notes.index).to_numpy()
    per_image = dict(zip(probe["image_id"], [None] * len(probe), strict=True))
    per_image.update(zip(notes.index, attribute_tags(notes), strict=True))
    vocabulary = sorted(set().union(*[t for t in per_image.values() if t]))
    positives = np.array(
        [[tag in (per_image[i] or ()) for tag in vocabulary] for i in probe["image_id"]]
    )
    best: dict[tuple[str, int], tuple[str, float]] = {}
    for layer, path in layer_files.items():
        if layer == output_layer:
            continue
        with h5py.File(path, "r", locking=False) as h5:
            activations = h5["activations"][:].astype(np.float32)
            neurons = stored_neurons(h5)
        scores = auc(activations[annotated], positives[annotated])
        for j, neuron in enumerate(neurons.tolist()):
            column = np.nan_to_num(scores[j], nan=0.0)
            best[(layer, neuron)] = (vocabulary[int(column.argmax())], float(column.max()))
    rows = []
    for row in table.itertuples(index=False):
        if row.layer == output_layer:
            truth, truth_auc, kind = f"shape:{classes[row.neuron]}", None, "output"
        else:
            (truth, truth_auc), kind = best[(row.layer, row.neuron)], "hidden"
        hits = [truth in (per_image.get(i) or ()) for i in row.exemplar_ids]
        rows.append(
            {
                "model": row.model,
                "layer": row.layer,
                "neuron": int(row.neuron),
                "method": row.method,
                "kind": kind,
                "truth": truth,
                "truth_auc": truth_auc,
                "label": row.label if isinstance(row.label, str) else None,
                "label_names_truth": _names(row.label, tag_words(truth)),
                "exemplar_precision": float(np.mean(hits)) if hits else 0.0,
            }
        )
    result = pd.DataFrame(rows)
    result["text_similarity"] = _text_similarity(result)
    for (method, kind), group in result.groupby(["method", "kind"]):
        judged = group["label_names_truth"].dropna()
        label_part = (
            f"labels name the truth for {int(judged.sum())}/{len(judged)} ({judged.mean():.0%}), "
            f"mean text similarity {group['text_similarity'].mean():.2f}"
            if len(judged)
            else f"no labels (method {method} does not label)"
        )
        log.info(
            "%s, %s neurons: %s; mean top-exemplar precision %.2f",
            method,
            kind,
            label_part,
            group["exemplar_precision"].mean(),
        )
    return result


def _text_similarity(result: pd.DataFrame) -> list[float | None]:
    """Sentence-embedding cosine of each label and its truth (None without a label)."""
    labelled = result["label"].notna().to_numpy()
    out: list[float | None] = [None] * len(result)
    if labelled.any():
        from neuroscribe.backends.textsim import SentenceSimilarity

        labels = list(result.loc[labelled, "label"])
        truths = [truth_phrase(t) for t in result.loc[labelled, "truth"]]
        for i, value in zip(
            np.flatnonzero(labelled), SentenceSimilarity().pairwise(labels, truths), strict=True
        ):
            out[i] = float(value)
    return out


def write_evaluation(
    descriptions: str | Path,
    manifest: str | Path,
    worlds: Sequence[tuple[str, str | Path]],
    targets: dict[str, dict],
    out: str | Path,
) -> None:
    """Evaluate every target trained on the demo world ({model: {layers, output_layer}})."""
    frames = [
        evaluate(descriptions, manifest, worlds, spec["layers"], spec["output_layer"], model)
        for model, spec in targets.items()
    ]
    write_table(pd.concat(frames, ignore_index=True), out, "evaluation")
