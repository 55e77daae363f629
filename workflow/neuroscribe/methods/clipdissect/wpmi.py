"""Soft-WPMI: how well each concept explains a neuron's most activating images (CLIP-Dissect).

Follows the reference code of Oikarinen & Weng, "CLIP-Dissect" (ICLR 2023): similarity.py,
`soft_wpmi` (with utils.py `get_similarity_from_activations` building its image-text matrix).
Own code; the computation, term by term:

- P = softmax(a * sim) over concepts, per image, where sim[image, concept] is the cosine
  similarity of L2-normalised image and text embeddings (a = 10);
- each neuron's top_k images by activation (top_k = 100), the i-th weighted with
  p_i = p_start - i / top_k * (p_start - p_end) (0.998 down to 0.97);
- log p(d|e) = sum_i log(1 + p_i * (P[i, d] - 1) + min_prob), min_prob = 1e-7;
- log p(d) = logsumexp over the layer's neurons of log p(d|e), minus log(n_neurons);
- score = log p(d|e) - lam * log p(d) (lam = 1); a neuron's label is its best concept.

Two departures, neither changing what is computed: log p(d|e) is summed and the scores kept in
float64 (in float32, on a small layer such as a 7-neuron output, the best concepts' scores all sit
at log(n_neurons) within rounding error and the label is a coin toss; the reference runs in
float32), and a probe set smaller than top_k uses all its images (k = n_images in p_i).

Memory: the reference gathers one neuron's [top_k, concepts] rows at a time; here a block of
neurons at once, sized so the block's [block, top_k, concepts] floats fit a budget. What stays is
the image-concept matrix [images, concepts] and the scores [neurons, concepts], never a product
of all three.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

FLOAT_BYTES = 4
# the gathered block and the temporary of its log: two [block, top_k, concepts] float32 arrays
GATHER_COPIES = 2


@dataclass(frozen=True)
class WpmiSettings:
    top_k: int = 100
    a: float = 10.0
    lam: float = 1.0
    p_start: float = 0.998
    p_end: float = 0.97
    min_prob: float = 1e-7

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WpmiSettings:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def concept_probabilities(sim: torch.Tensor, a: float) -> torch.Tensor:
    """softmax(a * sim) over concepts, per image (float32), written into a new tensor."""
    return torch.softmax(a * sim.float(), dim=1)


def example_weights(k: int, p_start: float, p_end: float) -> torch.Tensor:
    """p_i for the ranks 0..k-1: p_start - i/k * (p_start - p_end)."""
    return p_start - torch.arange(k, dtype=torch.float32) / k * (p_start - p_end)


def neuron_block(top_k: int, n_concepts: int, memory_mb: float) -> int:
    """Neurons per block so the block's gathered rows fit `memory_mb` (at least one)."""
    per_neuron = GATHER_COPIES * top_k * n_concepts * FLOAT_BYTES
    return max(1, int(memory_mb * 2**20 // per_neuron))


def top_images(values: np.ndarray, k: int) -> np.ndarray:
    """Row indices [neurons, k] of each column's k largest values, highest first; ties go to
    the lower row, NaN counts as lowest (as the merge's own top-K)."""
    block = np.asarray(values, dtype=np.float32).copy()
    block[np.isnan(block)] = -np.inf
    return np.argsort(-block, axis=0, kind="stable")[:k].T


def log_p_given_e(
    probs: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, min_prob: float
) -> torch.Tensor:
    """log p(d|e) [neurons, concepts] of a block: `rows` [neurons, k] index `probs`."""
    gathered = probs[rows]  # [neurons, k, concepts]
    gathered -= 1
    gathered *= weights[None, :, None]
    gathered += 1 + min_prob
    # summed in float64: a layer's scores are differences of sums in the hundreds
    return torch.log_(gathered).sum(dim=1, dtype=torch.float64)


def column_blocks(n_neurons: int, block: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n_neurons, block):
        yield start, min(start + block, n_neurons)


def soft_wpmi(
    activations: Any,
    sim: torch.Tensor,
    settings: WpmiSettings = WpmiSettings(),
    images: np.ndarray | None = None,
    memory_mb: float = 256,
    block: int | None = None,
) -> torch.Tensor:
    """Soft-WPMI scores [neurons, concepts] (float64) of a layer.

    `activations` is [all images, neurons], anything sliced by column block (a NumPy array, an
    HDF5 dataset): it is read `block` neurons at a time; `images` (row indices) keeps only those
    rows, and `sim` [images, concepts] is aligned with the kept rows. The block size comes from
    `memory_mb` unless given.
    """
    n_neurons = activations.shape[1]
    n_images, n_concepts = sim.shape
    k = min(settings.top_k, n_images)
    if k < 1:
        raise ValueError("soft-WPMI needs at least one probe image")
    probs = concept_probabilities(sim, settings.a)
    weights = example_weights(k, settings.p_start, settings.p_end)
    block = block or neuron_block(k, n_concepts, memory_mb)
    scores = torch.empty((n_neurons, n_concepts), dtype=torch.float64)
    for start, stop in column_blocks(n_neurons, block):
        values = np.asarray(activations[:, start:stop])
        if images is not None:
            values = values[images]
        if len(values) != n_images:
            raise ValueError(
                f"activations have {len(values)} images, the image-concept matrix {n_images}"
            )
        rows = torch.from_numpy(top_images(values, k))
        scores[start:stop] = log_p_given_e(probs, rows, weights, settings.min_prob)
    # log p(d): over the layer's neurons, as the reference does
    log_p_d = torch.logsumexp(scores, dim=0) - math.log(n_neurons)
    scores -= settings.lam * log_p_d
    return scores


def best_concepts(scores: torch.Tensor, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Each neuron's n best concepts [neurons, n] (indices) and their scores, best first."""
    n = min(n, scores.shape[1])
    values, index = torch.topk(scores, n, dim=1)
    return index.numpy(), values.numpy()
