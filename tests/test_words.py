"""Word statistics: content words and the weighted log-odds ratio of Monroe et al. (2008)."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from neuroscribe.words import (
    PRIOR_FLOOR,
    WordScore,
    content_words,
    log_odds,
    sentence_counts,
)


def test_content_words_drop_stop_words_and_fold_plurals() -> None:
    assert content_words("Two red STARS on a gradient background.") == [
        "two",
        "red",
        "star",
        "gradient",
    ]
    # a plural of a stop word is a stop word too
    assert content_words("images of crosses, daisies and boxes") == ["cross", "daisy", "box"]
    assert content_words("") == []


def test_sentence_counts_count_tokens_over_texts() -> None:
    counts = sentence_counts(["a star and a star", "the red stars", "a red circle"])
    assert counts == Counter({"star": 3, "red": 2, "circle": 1})


def test_log_odds_matches_the_formula_by_hand() -> None:
    focus = Counter({"star": 8, "red": 2})
    reference = Counter({"star": 1, "red": 4, "blue": 5})
    # prior = focus + reference = {star: 9, red: 6, blue: 5}: a0 = 20, alpha_w = its count;
    # n_i = n_j = 10, so each odds' denominator is 10 + 20 - y - alpha
    expected = {
        "star": (math.log(17 / 13) - math.log(10 / 20), 1 / 17 + 1 / 10),
        "red": (math.log(8 / 22) - math.log(10 / 20), 1 / 8 + 1 / 10),
        "blue": (math.log(5 / 25) - math.log(10 / 20), 1 / 5 + 1 / 10),
    }
    scores = log_odds(focus, reference)
    assert [s.word for s in scores] == ["star", "red", "blue"]
    for s in scores:
        delta, variance = expected[s.word]
        assert s.delta == pytest.approx(delta)
        assert s.zscore == pytest.approx(delta / math.sqrt(variance))
        assert (s.count, s.reference_count) == (focus[s.word], reference[s.word])
    assert isinstance(scores[0], WordScore)


def test_log_odds_with_a_given_prior_and_size() -> None:
    focus, reference = Counter({"star": 8, "red": 2}), Counter({"star": 1, "red": 4})
    # prior shares 3/4 and 1/4 scaled to a0 = 4: alpha = 3 and 1; n_i = 10, n_j = 5
    prior = Counter({"star": 30, "red": 10})
    (star, red) = log_odds(focus, reference, prior=prior, prior_size=4)
    assert star.delta == pytest.approx(math.log(11 / (14 - 11)) - math.log(4 / (9 - 4)))
    assert red.delta == pytest.approx(math.log(3 / (14 - 3)) - math.log(5 / (9 - 5)))
    # a word the prior never saw gets the floor pseudo-count and stays finite
    scores = {
        s.word: s
        for s in log_odds(focus + Counter({"blue": 3}), reference, prior=prior, prior_size=4)
    }
    a0 = 4 + PRIOR_FLOOR
    blue = math.log((3 + PRIOR_FLOOR) / (13 + a0 - 3 - PRIOR_FLOOR)) - math.log(
        PRIOR_FLOOR / (5 + a0 - PRIOR_FLOOR)
    )
    assert scores["blue"].delta == pytest.approx(blue)
    assert math.isfinite(scores["blue"].zscore)


def test_generic_shared_words_do_not_win() -> None:
    # "large" and "red" fill both corpora in the same share; only "star" sets focus apart
    focus = Counter({"large": 300, "red": 200, "star": 30, "circle": 2})
    reference = Counter({"large": 600, "red": 400, "star": 6, "circle": 56})
    scores = {s.word: s for s in log_odds(focus, reference)}
    assert log_odds(focus, reference)[0].word == "star"
    assert scores["star"].zscore > 3 and scores["circle"].zscore < -2
    # the shares differ only by what "star" and "circle" take: z stays near 0
    assert abs(scores["large"].zscore) < 0.5 and abs(scores["red"].zscore) < 0.5
    # exactly the same share in both corpora: exactly 0
    same = log_odds(Counter({"large": 10, "star": 10}), Counter({"large": 30, "star": 30}))
    assert all(s.zscore == pytest.approx(0.0) for s in same)


def test_log_odds_of_degenerate_corpora() -> None:
    assert log_odds(Counter(), Counter()) == []
    (only,) = log_odds(Counter({"star": 3}), Counter({"star": 2}))
    assert (only.zscore, only.delta) == (0.0, 0.0)
    # an empty focus is no evidence: its odds are the prior's, which here are the reference's
    assert all(
        s.zscore == pytest.approx(0) for s in log_odds(Counter(), Counter({"star": 2, "red": 1}))
    )
