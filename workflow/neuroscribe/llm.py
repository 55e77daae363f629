"""LLM role: candidate concepts that summarise a neuron's captions.

Backend `none` is a frequency summariser: no model, no network. It proposes the word and phrase
n-grams that the most captions share (the summary TExplain reports as word clouds). The
`openai` and `local` chat backends come with the Describe-and-Dissect concept stage.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

STOPWORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "of",
        "on",
        "in",
        "at",
        "with",
        "and",
        "or",
        "to",
        "is",
        "are",
        "this",
        "that",
        "there",
        "it",
        "its",
        "one",
        "image",
        "photo",
        "picture",
        "background",
        "shown",
        "showing",
    ]
)
_WORD = re.compile(r"[a-z]+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


@dataclass(frozen=True)
class FrequencySummariser:
    """Concepts of 1 to `max_words` words, ranked by how many captions contain them."""

    max_words: int = 5
    # a longer phrase wins over a shorter one only when it is nearly as common
    length_bonus: float = 0.2

    @property
    def id(self) -> str:
        return f"none:frequency-{self.max_words}"

    def phrase_counts(self, captions: Sequence[str]) -> Counter[str]:
        """Number of captions containing each phrase (no stop word inside a phrase)."""
        counts: Counter[str] = Counter()
        for caption in captions:
            tokens = words(caption)
            found = set()
            for start in range(len(tokens)):
                for length in range(1, self.max_words + 1):
                    gram = tokens[start : start + length]
                    if len(gram) < length or any(w in STOPWORDS for w in gram):
                        break
                    found.add(" ".join(gram))
            counts.update(found)
        return counts

    def word_counts(self, texts: Sequence[str]) -> Counter[str]:
        """Content-word frequencies over all texts (for word clouds)."""
        return Counter(w for text in texts for w in words(text) if w not in STOPWORDS)

    def propose(self, captions: Sequence[str], n: int) -> list[str]:
        """Up to `n` distinct lower-case concepts, best first; ties broken by length, then text."""
        counts = self.phrase_counts(captions)

        def score(phrase: str) -> float:
            return counts[phrase] * (1 + self.length_bonus * (phrase.count(" ")))

        ranked = sorted(counts, key=lambda p: (-score(p), -p.count(" "), p))
        return ranked[:n]
