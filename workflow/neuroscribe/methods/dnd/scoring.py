"""Best-concept selection (Describe-and-Dissect): which candidate makes the neuron fire.

For one neuron with M candidates, each drawn Q times: the neuron's activations on all M*Q images
are ranked (0 = highest); a candidate's rank score is the mean squared rank of its best β images
(`topk-sq-mean`, lower is better); its similarity is the mean image-image cosine between the
neuron's top exemplars and those of its images that rank in the overall top K (-1 when none
does, as in the paper). The combined score is (M - position of the candidate in rank-score
order) * similarity, higher is better. Ties are broken by candidate order (best proposed first).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SCORING = ("combined", "rank", "similarity")
SCORE_KINDS = {
    "combined": "dnd: rank position x image similarity (higher is better)",
    "rank": "dnd: mean squared rank of the best images (lower is better)",
    "similarity": "dnd: mean exemplar-image similarity (higher is better)",
}


@dataclass
class CandidateScore:
    concept: str
    # None without images (a phrase the synthesizer could not draw): such a candidate ranks last
    rank_score: float | None
    similarity: float | None
    combined: float | None
    n_images: int


def image_ranks(activations: np.ndarray) -> np.ndarray:
    """Rank of each image, 0 for the highest activation; ties go to the lower index."""
    order = np.argsort(-activations, kind="stable")
    ranks = np.empty(len(activations), dtype=np.int64)
    ranks[order] = np.arange(len(activations))
    return ranks


def topk_sq_mean(ranks: np.ndarray, beta: int) -> float | None:
    """Mean of the squared best (lowest) `beta` ranks; None without images."""
    if len(ranks) == 0:
        return None
    best = np.sort(ranks)[:beta].astype(np.float64)
    return float(np.mean(best**2))


def score_candidates(
    concepts: list[str],
    owner: np.ndarray,
    activations: np.ndarray,
    similarity: np.ndarray,
    beta: int = 5,
    top_k: int = 10,
) -> list[CandidateScore]:
    """Scores of each candidate of one neuron.

    `owner[i]` is the candidate index of synthesised image i, `activations[i]` the neuron's
    activation on it, `similarity[i]` the mean cosine between the neuron's exemplars and image i.
    """
    ranks = image_ranks(activations)
    m = len(concepts)
    rank_scores = [topk_sq_mean(ranks[owner == c], beta) for c in range(m)]
    # position in rank-score order: best (lowest) first, no-image candidates last
    order = sorted(range(m), key=lambda c: (rank_scores[c] is None, rank_scores[c] or 0.0, c))
    position = {c: p for p, c in enumerate(order)}
    out = []
    for c, concept in enumerate(concepts):
        n_images = int((owner == c).sum())
        if n_images == 0:
            out.append(CandidateScore(concept, None, None, None, 0))
            continue
        top = (owner == c) & (ranks < top_k)
        sim = float(similarity[top].mean()) if top.any() else -1.0
        out.append(
            CandidateScore(
                concept=concept,
                rank_score=rank_scores[c],
                similarity=sim,
                combined=(m - position[c]) * sim,
                n_images=n_images,
            )
        )
    return out


def ranked(scores: list[CandidateScore], scoring: str) -> list[CandidateScore]:
    """Candidates best first under `scoring` (one of SCORING); stable for ties."""
    if scoring not in SCORING:
        raise ValueError(f"unknown scoring {scoring!r}; one of {SCORING}")
    lower_is_better = scoring == "rank"

    def key(s: CandidateScore) -> tuple[bool, float]:
        value = best_score(s, scoring)
        if value is None:
            return (True, 0.0)
        return (False, value if lower_is_better else -value)

    return sorted(scores, key=key)


def best_score(score: CandidateScore, scoring: str) -> float | None:
    """The value `scoring` ranks by (None for a candidate without images)."""
    return {
        "combined": score.combined,
        "rank": score.rank_score,
        "similarity": score.similarity,
    }[scoring]
