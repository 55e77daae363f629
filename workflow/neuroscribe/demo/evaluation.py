"""The demo world's ground truth, for the evaluation harness (`neuroscribe.evaluation`).

Output neurons of the demo CNN each stand for a shape class. A hidden neuron's truth is the
annotated attribute (shape, colour, texture, size or background) that best predicts its
activation over the probe set, by ROC AUC. The harness then checks each method against it:
does the label name it, how close is it in words, and how many top exemplars carry it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from neuroscribe.demo.annotations import load_annotations
from neuroscribe.demo.world import TEXTURE_WORDS
from neuroscribe.words import singular, words


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


def names_truth(label: object, truth: str) -> float | None:
    """1.0 when the label names the truth in one of its words ("striped" for texture:stripes,
    plurals folded), else 0.0; None without a label."""
    if not isinstance(label, str) or not label.strip():
        return None
    wanted = {singular(w) for w in tag_words(truth)}
    return float(bool(wanted & {singular(w) for w in words(label)}))


@dataclass
class WorldTruth:
    """The demo worlds' attribute tags per image, and each neuron's truth on one layer."""

    tags: dict[str, set[str]]  # image id -> tags of its annotation
    truth: dict[int, str]  # neuron -> kind:value

    def precision(self, neuron: int, image_ids: Sequence[str]) -> float | None:
        """The share of the images that carry the neuron's truth (None without images)."""
        if not len(image_ids):
            return None
        return float(np.mean([self.truth[neuron] in self.tags.get(i, ()) for i in image_ids]))


def layer_truth(
    worlds: Sequence[tuple[str, str | Path]],
    image_ids: Sequence[str],
    activations: np.ndarray,
    neurons: Sequence[int],
    classes: Sequence[str] | None,
) -> WorldTruth:
    """Each neuron's truth: `shape:{class}` for an output layer (`classes` by neuron), else the
    tag whose presence its activation ([images, neurons], rows as `image_ids`) predicts best."""
    notes = load_annotations(worlds).set_index("image_id")
    tags = dict(zip(notes.index, attribute_tags(notes), strict=True))
    if classes is not None:
        return WorldTruth(tags, {n: f"shape:{classes[n]}" for n in neurons})
    annotated = np.array([i in tags for i in image_ids])
    vocabulary = sorted(set().union(*tags.values()))
    positives = np.array(
        [[t in tags[i] for t in vocabulary] for i in np.asarray(image_ids)[annotated]]
    )
    scores = np.nan_to_num(auc(activations[annotated], positives), nan=0.0)
    best = scores.argmax(axis=1)
    return WorldTruth(tags, {n: vocabulary[int(best[j])] for j, n in enumerate(neurons)})
