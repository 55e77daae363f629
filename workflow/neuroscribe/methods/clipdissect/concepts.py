"""Concept sets of CLIP-Dissect: the words a neuron's label is chosen from.

`clipdissect.concepts` is one of
- `wordfreq`: the default English list, the `clipdissect.wordfreq_words` (default 20000) most
  frequent English words of the `wordfreq` package, keeping alphabetic words of 3+ letters that
  are not in the project's stop-word list (neuroscribe.words.STOPWORDS);
- `demo`: the demo world's vocabulary (its shapes, colours, textures and sizes, as the words its
  annotations use);
- a file path: one concept per line (a word or a phrase); blank lines and repeats are dropped.
"""

from __future__ import annotations

from pathlib import Path

WORDFREQ = "wordfreq"
DEMO = "demo"
MIN_LETTERS = 3


class ConceptSetError(ValueError):
    """A concept set cannot be loaded (a missing or empty file)."""


def read_concept_file(path: str | Path) -> list[str]:
    """One concept per line, stripped; blank lines and repeats dropped, first order kept."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ConceptSetError(f"concept file {str(path)!r} does not exist") from None
    concepts = list(dict.fromkeys(line.strip() for line in lines if line.strip()))
    if not concepts:
        raise ConceptSetError(f"concept file {str(path)!r} has no concepts (one per line)")
    return concepts


def wordfreq_concepts(n: int) -> list[str]:
    """The top `n` English words of `wordfreq`, alphabetic, 3+ letters, stop words dropped
    (fewer than `n` remain)."""
    from wordfreq import top_n_list

    from neuroscribe.words import STOPWORDS

    return [
        w
        for w in top_n_list("en", n)
        if w.isalpha() and len(w) >= MIN_LETTERS and w not in STOPWORDS
    ]


def demo_concepts() -> list[str]:
    """The demo world's words: shapes, colours, textures (as captions word them), sizes."""
    from neuroscribe.demo.world import COLOURS, SHAPES, SIZES, TEXTURE_WORDS

    textures = [w for w in TEXTURE_WORDS.values() if w]
    return list(dict.fromkeys([*SHAPES, *COLOURS, *textures, *SIZES]))


def load_concepts(source: str, wordfreq_words: int = 20000) -> list[str]:
    """The concept set `source` names (`wordfreq`, `demo` or a file)."""
    if source == WORDFREQ:
        return wordfreq_concepts(wordfreq_words)
    if source == DEMO:
        return demo_concepts()
    return read_concept_file(source)
