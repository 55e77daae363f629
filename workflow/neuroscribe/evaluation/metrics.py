"""Per-neuron scores of labels, and their summaries over a layer.

Every function here is plain numpy: the stage gathers predictions and activations, these turn
them into numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from neuroscribe.words import singular, words


def pearson_rows(predicted: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of `predicted` with the same row of `actual`
    ([neurons, images] both); NaN where either row is constant."""
    p = predicted.astype(np.float64) - predicted.mean(axis=1, keepdims=True)
    a = actual.astype(np.float64) - actual.mean(axis=1, keepdims=True)
    denominator = np.sqrt((p * p).sum(axis=1) * (a * a).sum(axis=1))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (p * a).sum(axis=1) / denominator
    r[denominator == 0] = np.nan
    return r


def bootstrap_interval(
    values: Sequence[float] | np.ndarray, resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (NaN ignored); (nan, nan) if empty."""
    data = np.asarray(values, dtype=np.float64)
    data = data[~np.isnan(data)]
    if len(data) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(resamples, len(data)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def shuffled(labels: Sequence[str | None], seed: int = 0) -> list[str | None]:
    """The labels permuted among their neurons (a fixed seed), for the shuffled control. With
    two or more labels, no label stays on its own neuron unless every label is the same."""
    items = list(labels)
    if len(items) < 2:
        return items
    rng = np.random.default_rng(seed)
    # a random rotation of a random order: a permutation without fixed points
    order = rng.permutation(len(items))
    shift = int(rng.integers(1, len(items)))
    out: list[str | None] = [None] * len(items)
    for k, i in enumerate(order):
        out[i] = items[order[(k + shift) % len(items)]]
    return out


def names_class(label: str | None, names: Sequence[str]) -> float | None:
    """1.0 when the label contains a class name (or a synonym) as whole words, else 0.0; None
    without a label."""
    if not label:
        return None
    text = " ".join(singular(w) for w in words(label))
    for name in names:
        want = [singular(w) for w in words(name)]
        if want and f" {' '.join(want)} " in f" {text} ":
            return 1.0
    return 0.0
