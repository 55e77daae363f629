"""Text similarity with the real all-MiniLM-L6-v2 weights that ship inside a pip package."""

from __future__ import annotations

import pytest

from neuroscribe.backends.textsim import SentenceSimilarity
from neuroscribe.demo.evaluation import truth_phrase


@pytest.fixture(scope="module")
def sim() -> SentenceSimilarity:
    return SentenceSimilarity()


def test_same_text_is_one_and_related_beats_unrelated(sim: SentenceSimilarity) -> None:
    same, related, unrelated = sim.pairwise(
        ["circle", "a round disc", "a dog on a sofa"], ["circle", "circle", "circle"]
    )
    assert same == pytest.approx(1.0, abs=1e-5)
    assert related > unrelated + 0.1
    assert sim.id == "sentence:all-MiniLM-L6-v2"


def test_label_with_the_class_word_is_close_to_the_class(sim: SentenceSimilarity) -> None:
    good, wrong = sim.pairwise(["large red square", "large red square"], ["square", "star"])
    assert good > wrong


def test_pairwise_checks_lengths(sim: SentenceSimilarity) -> None:
    assert sim.pairwise([], []) == []
    with pytest.raises(ValueError, match="2 texts against 1"):
        sim.pairwise(["a", "b"], ["a"])


def test_truth_phrases() -> None:
    assert truth_phrase("shape:circle") == "circle"
    assert truth_phrase("texture:stripes") == "striped"
    assert truth_phrase("background:noise") == "noisy background"
    assert truth_phrase("colour:red") == "red"
