"""Which probe images (and which classes) TeLLMe shows the explainer and scores on.

- explain set: each neuron's top `explain_top` images of the explain split (the images no
  held-out split keeps from it), plus `explain_random` images of that split, the same for every
  neuron, so the explainer sees what the neuron does not respond to as well;
- scoring sample: each neuron's top held-out images plus random held-out images
  (`score_top_fraction` of `score_items` are top ones; 0 draws them all at random), cut into a
  validation part (the best candidate explanation is chosen on it) and a test part (its reported
  score), interleaved by rank so both parts hold top and random items alike.

Random images are picked in the order of sha256(seed, image id), not by position, so every layer
and every model of a run draws the same ones and each is captioned once per run.
Activations are shown to the explainer quantised per neuron to the integers 0-10 over the
explain split, as the reference does: round((a - min) / (max - min) * 10).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

EXPLAIN, VALIDATION, TEST = "explain", "validation", "test"
TOP, RANDOM = "top", "random"


@dataclass(frozen=True)
class SetSizes:
    explain_top: int = 75
    explain_random: int = 25
    score_items: int = 50
    score_top_fraction: float = 0.5
    validation_fraction: float = 0.5
    seed: int = 0

    @classmethod
    def from_config(cls, section: dict[str, Any]) -> SetSizes:
        return cls(**{k: section[k] for k in cls.__dataclass_fields__})


def hash_order(ids: Sequence[str], seed: int) -> np.ndarray:
    """Positions of `ids` in a fixed pseudo-random order that depends only on each id."""
    keys = [hashlib.sha256(f"{seed}:{i}".encode()).digest()[:8] for i in ids]
    return np.array(sorted(range(len(ids)), key=keys.__getitem__), dtype=np.int64)


def quantise(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Activations as integers 0-10 over [low, high] (clipped; all 0 when high == low)."""
    if not np.isfinite(high - low) or high <= low:
        return np.zeros(len(values), dtype=np.int64)
    scaled = np.round((np.asarray(values, dtype=np.float64) - low) / (high - low) * 10)
    return np.clip(scaled, 0, 10).astype(np.int64)


def validation_parts(n: int, fraction: float) -> np.ndarray:
    """True for the items of a ranked list that go to validation: spread evenly over the ranks
    (every second one at 0.5), the first one always."""
    i = np.arange(n)
    return np.ceil((i + 1) * fraction) > np.ceil(i * fraction)


def _top(values: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    """The `k` candidates with the highest values, highest first (ties by position)."""
    if k <= 0 or len(candidates) == 0:
        return candidates[:0]
    order = np.lexsort((candidates, -values[candidates]))
    return candidates[order[:k]]


def _random(order: np.ndarray, allowed: np.ndarray, taken: np.ndarray, k: int) -> np.ndarray:
    """The first `k` positions of `order` that are `allowed` and not `taken`."""
    if k <= 0:
        return order[:0]
    mask = allowed.copy()
    mask[taken] = False
    return order[mask[order]][:k]


def neuron_sets(
    activations: np.ndarray,
    heldout: np.ndarray,
    image_ids: Sequence[str],
    neurons: Sequence[int],
    sizes: SetSizes,
) -> pd.DataFrame:
    """The explain set and the scoring sample of each neuron (`activations` [images, neurons],
    columns in the order of `neurons`): one row per (neuron, image) with its part (explain,
    validation, test), source (top, random), activation and quantised activation."""
    order = hash_order(list(image_ids), sizes.seed)
    explain_split = ~heldout
    explain_pos = np.flatnonzero(explain_split)
    held_pos = np.flatnonzero(heldout)
    shared_random = _random(order, explain_split, explain_pos[:0], sizes.explain_random)
    n_top = round(sizes.score_items * sizes.score_top_fraction)
    frames = []
    for column, neuron in enumerate(neurons):
        values = activations[:, column].astype(np.float64)
        seen = values[explain_pos]
        low, high = (float(seen.min()), float(seen.max())) if len(seen) else (0.0, 0.0)
        top = _top(values, explain_pos, sizes.explain_top)
        extra = shared_random[~np.isin(shared_random, top)]
        score_top = _top(values, held_pos, n_top)
        score_random = _random(order, heldout, score_top, sizes.score_items - len(score_top))
        parts = []
        for positions, source in ((score_top, TOP), (score_random, RANDOM)):
            validation = validation_parts(len(positions), sizes.validation_fraction)
            parts.append((positions, source, np.where(validation, VALIDATION, TEST)))
        parts = [
            (top, TOP, np.full(len(top), EXPLAIN)),
            (extra, RANDOM, np.full(len(extra), EXPLAIN)),
            *parts,
        ]
        for positions, source, part in parts:
            frames.append(
                pd.DataFrame(
                    {
                        "neuron": int(neuron),
                        "part": part,
                        "source": source,
                        "position": positions,
                        "activation": values[positions],
                        "quantised": quantise(values[positions], low, high),
                    }
                )
            )
    table = pd.concat(frames, ignore_index=True)
    table["image_id"] = [str(image_ids[p]) for p in table["position"]]
    return table


def class_sets(
    weights: np.ndarray,
    classes: Sequence[str],
    explain_top: int,
    score_items: int,
    score_top_fraction: float,
    validation_fraction: float,
    seed: int = 0,
) -> pd.DataFrame:
    """The weight-based variant's items for one neuron (`weights` [classes]): its top
    `explain_top` classes, shown to the explainer, and a scoring sample of the other classes
    (never one it was shown): the best of them by weight plus random ones, as for images.
    Values are the weights scaled as the reference scales them: negatives to 0, the rest divided
    by the largest, times 10, rounded."""
    weights = np.asarray(weights, dtype=np.float64)
    scaled = scale_weights(weights)
    everything = np.arange(len(weights))
    explain = _top(weights, everything, explain_top)
    rest = np.ones(len(weights), dtype=bool)
    rest[explain] = False
    n_top = round(score_items * score_top_fraction)
    score_top = _top(weights, np.flatnonzero(rest), n_top)
    order = hash_order(list(classes), seed)
    score_random = _random(order, rest, score_top, score_items - len(score_top))
    parts = [(explain, TOP, np.full(len(explain), EXPLAIN))]
    for positions, source in ((score_top, TOP), (score_random, RANDOM)):
        validation = validation_parts(len(positions), validation_fraction)
        parts.append((positions, source, np.where(validation, VALIDATION, TEST)))
    frame = pd.concat(
        [
            pd.DataFrame(
                {
                    "part": part,
                    "source": source,
                    "position": positions,
                    "activation": weights[positions],
                    "quantised": scaled[positions],
                }
            )
            for positions, source, part in parts
        ],
        ignore_index=True,
    )
    frame["item"] = [str(classes[p]) for p in frame["position"]]
    return frame


def scale_weights(weights: np.ndarray) -> np.ndarray:
    """Weights as integers 0-10: negatives to 0, the rest over the largest (the reference's)."""
    positive = np.clip(np.asarray(weights, dtype=np.float64), 0, None)
    top = positive.max() if len(positive) else 0.0
    if top <= 0:
        return np.zeros(len(positive), dtype=np.int64)
    return np.round(positive / top * 10).astype(np.int64)
