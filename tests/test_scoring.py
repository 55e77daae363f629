"""Best-concept scoring (Describe-and-Dissect) on hand-built activations and similarities."""

from __future__ import annotations

import numpy as np
import pytest

from neuroscribe.methods.dnd.scoring import (
    best_score,
    image_ranks,
    ranked,
    score_candidates,
    topk_sq_mean,
)

CONCEPTS = ["a", "b", "c"]
OWNER = np.array([0, 0, 1, 1, 2, 2])
ACTIVATIONS = np.array([5.0, 1.0, 4.0, 3.0, 0.0, 2.0])
SIMILARITY = np.array([0.9, 0.1, 0.5, 0.5, 0.8, 0.8])


def test_ranks_are_positions_by_activation_ties_to_the_lower_index() -> None:
    assert list(image_ranks(ACTIVATIONS)) == [0, 4, 1, 2, 5, 3]
    assert list(image_ranks(np.array([1.0, 2.0, 1.0, 1.0]))) == [1, 0, 2, 3]


def test_topk_sq_mean() -> None:
    assert topk_sq_mean(np.array([4, 0]), beta=1) == 0.0
    assert topk_sq_mean(np.array([4, 0, 1]), beta=2) == 0.5
    assert topk_sq_mean(np.array([3]), beta=5) == 9.0  # fewer images than beta
    assert topk_sq_mean(np.array([], dtype=int), beta=5) is None


def test_scores_follow_the_paper() -> None:
    scores = score_candidates(CONCEPTS, OWNER, ACTIVATIONS, SIMILARITY, beta=2, top_k=3)
    # ranks [0, 4, 1, 2, 5, 3]: a {0, 4}, b {1, 2}, c {5, 3}
    assert [s.rank_score for s in scores] == [8.0, 2.5, 17.0]
    # only images ranked in the overall top 3 count for similarity; c has none: -1
    assert [s.similarity for s in scores] == [0.9, 0.5, -1.0]
    # rank-score order b, a, c gives positions worth 3, 2, 1
    assert [s.combined for s in scores] == pytest.approx([1.8, 1.5, -1.0])
    assert [s.n_images for s in scores] == [2, 2, 2]
    assert [s.concept for s in ranked(scores, "combined")] == ["a", "b", "c"]
    assert [s.concept for s in ranked(scores, "rank")] == ["b", "a", "c"]
    assert [s.concept for s in ranked(scores, "similarity")] == ["a", "b", "c"]
    best = ranked(scores, "rank")[0]
    assert best_score(best, "rank") == 2.5
    with pytest.raises(ValueError, match="unknown scoring"):
        ranked(scores, "median")


def test_a_candidate_without_images_ranks_last() -> None:
    owner = np.array([0, 0, 2, 2])
    scores = score_candidates(CONCEPTS, owner, np.array([1.0, 2.0, 3.0, 4.0]), np.ones(4), 5, 10)
    assert scores[1].rank_score is None and scores[1].n_images == 0
    assert scores[1].similarity is None and scores[1].combined is None
    assert [s.concept for s in ranked(scores, "rank")] == ["c", "a", "b"]
    assert [s.concept for s in ranked(scores, "combined")] == ["c", "a", "b"]
    assert ranked(scores, "similarity")[-1].concept == "b"


def test_a_candidate_without_images_never_beats_one_with_negative_similarity() -> None:
    # b has no images; no image of a ranks in the top 1, so a weighs -1 (the paper's rule)
    owner = np.array([0, 0, 2, 2])
    concepts = ["a", "b", "d"]
    scores = score_candidates(concepts, owner, np.array([1.0, 2.0, 3.0, 4.0]), np.ones(4), 1, 1)
    assert scores[0].similarity == -1.0 and scores[0].combined == -2.0
    assert [s.concept for s in ranked(scores, "combined")] == ["d", "a", "b"]
