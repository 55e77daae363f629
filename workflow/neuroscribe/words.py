"""Word statistics of captions and labels: the one tokenizer, the one stop-word list, word and
phrase counts, the frequency summariser (llm backend `none`), and the weighted log-odds ratio that
finds the words one set of texts uses more than another.

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


def content_words(text: str) -> list[str]:
    """The words of a text that can name a concept: stop words dropped, plurals folded to their
    singular ("two red stars" -> ["two", "red", "star"]).

    A word is dropped when it or its singular is a stop word ("images" as well as "image").
    """
    folded = (singular(w) for w in words(text) if w not in STOPWORDS)
    return [w for w in folded if w not in STOPWORDS]


def sentence_counts(texts: Sequence[str]) -> Counter[str]:
    """Content-word token counts over all texts (a word twice in one text counts twice).

    Each distinct text is split once: sampled sentences repeat a lot."""
    found: Counter[str] = Counter()
    for text, times in Counter(texts).items():
        for word in content_words(text):
            found[word] += times
    return found


# the prior pseudo-count of a word that a given prior never saw: small enough not to move the
# others, but above zero, where the log-odds of a word absent from one corpus would be infinite
PRIOR_FLOOR = 0.01


@dataclass(frozen=True)
class WordScore:
    """How much more a focus corpus uses a word than a reference corpus."""

    word: str
    zscore: float  # delta over its standard error: large when the difference is also certain
    delta: float  # log-odds ratio, focus over reference (0: the same share in both)
    count: int  # occurrences in the focus corpus
    reference_count: int  # occurrences in the reference corpus


def _prior_counts(
    vocabulary: set[str], prior: Counter[str], prior_size: float | None
) -> dict[str, float]:
    """alpha_w = alpha0 * (the prior's share of w), PRIOR_FLOOR for a word the prior lacks."""
    total = sum(prior.values())
    alpha0 = float(total if prior_size is None else prior_size)
    alphas = {w: alpha0 * c / total for w, c in prior.items() if c > 0} if total else {}
    return {w: alphas.get(w, PRIOR_FLOOR) for w in vocabulary | set(alphas)}


def log_odds(
    focus: Counter[str],
    reference: Counter[str],
    prior: Counter[str] | None = None,
    prior_size: float | None = None,
) -> list[WordScore]:
    """The words of focus and reference by how much more focus uses them, best first (z
    descending, ties by word): the weighted log-odds ratio with an informative Dirichlet prior
    of Monroe, Colaresi & Quinn (2008, "Fightin' Words", eq. 16 and 19-22).

    With alpha_w = alpha0 * (prior share of w), alpha0 = `prior_size` (default: the size of the
    prior corpus), `prior` defaulting to focus + reference, and n_i, n_j the corpus sizes:

        delta_w = log((y_wi + a_w) / (n_i + a0 - y_wi - a_w))
                  - log((y_wj + a_w) / (n_j + a0 - y_wj - a_w))
        var_w ~ 1 / (y_wi + a_w) + 1 / (y_wj + a_w),   z_w = delta_w / sqrt(var_w)

    The prior shrinks rare words towards 0, so a word seen twice in focus and never in
    reference does not outrank one seen hundreds of times more often; a frequent word with the
    same share in both corpora scores 0. A word absent from a given `prior` gets the pseudo-count
    PRIOR_FLOOR, and a0 in the formula is the sum of all pseudo-counts (floors included), so
    every odds stays finite. With fewer than two words there is nothing to contrast: z = 0.
    """
    prior = focus + reference if prior is None else prior
    vocabulary = {w for w, c in (focus + reference).items() if c > 0}
    alphas = _prior_counts(vocabulary, prior, prior_size)
    alpha0 = sum(alphas.values())
    n_i, n_j = sum(focus.values()), sum(reference.values())

    def score(word: str) -> WordScore:
        y_i, y_j, a = focus[word], reference[word], alphas[word]
        rest_i, rest_j = n_i + alpha0 - y_i - a, n_j + alpha0 - y_j - a
        if rest_i <= 0 or rest_j <= 0:  # a one-word vocabulary: no odds to compare
            return WordScore(word, 0.0, 0.0, y_i, y_j)
        delta = math.log((y_i + a) / rest_i) - math.log((y_j + a) / rest_j)
        sigma = math.sqrt(1 / (y_i + a) + 1 / (y_j + a))
        return WordScore(word, delta / sigma, delta, y_i, y_j)

    return sorted((score(w) for w in vocabulary), key=lambda s: (-s.zscore, s.word))


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
