"""Word statistics of captions and labels: the one tokenizer, the one stop-word list, word and
phrase counts, and the frequency summariser (llm backend `none`).

The summariser proposes the word and phrase n-grams that the most captions share (the summary
TExplain reports as word clouds); no model, no network.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# words that name no concept of an image: never a concept, nor part of a concept phrase
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
    """Lower-cased words of a text; punctuation and digits separate words."""
    return _WORD.findall(text.lower())


def singular(word: str) -> str:
    """A plural folded to its singular by the common English endings ("stripes" -> "stripe",
    "daisies" -> "daisy", "crosses" -> "cross"); other words as they are."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith(("ches", "shes", "sses", "xes", "zes")):
        return word[:-2]  # "crosses" -> "cross", "boxes" -> "box"
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def word_counts(texts: Sequence[str]) -> Counter[str]:
    """Content-word frequencies over all texts (for word clouds)."""
    return Counter(w for text in texts for w in words(text) if w not in STOPWORDS)


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
        return word_counts(texts)

    def propose(
        self,
        captions: Sequence[str],
        n: int,
        document_frequency: Mapping[str, int] | None = None,
        documents: int = 0,
    ) -> list[str]:
        """Up to `n` distinct lower-case concepts, best first; ties broken by length, then text.

        With `document_frequency` (in how many of `documents` other caption sets each phrase
        occurs, e.g. the other neurons of a layer), phrases common to every set ("large",
        "background") are down-weighted as in tf-idf, so what sets this neuron apart wins.
        """
        counts = self.phrase_counts(captions)
        df = document_frequency or {}

        def score(phrase: str) -> float:
            idf = 1.0 + math.log((1 + documents) / (1 + df.get(phrase, 0))) if df else 1.0
            return counts[phrase] * idf * (1 + self.length_bonus * (phrase.count(" ")))

        ranked = sorted(counts, key=lambda p: (-score(p), -p.count(" "), p))
        return ranked[:n]
