"""TeLLMe's explainers: from a neuron's listing (captions or class names, each with a 0-10 value)
to k candidate explanations.

- `LlmExplainer`: one chat request per neuron through the project's client (cache, retries,
  concurrency, token accounting), the k candidates as the request's `n` choices or as a JSON
  list in one reply;
- `FrequencyExplainer` (llm backend `none`): no model; for captions, the phrases most particular
  to the high-activation images (their activation-weighted share of the listing, less their
  plain share); for classes, the words the top classes share, weighted by the class weights.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from neuroscribe.backends.llm import ChatReply, ChatRequest, LLMClient, LLMError
from neuroscribe.methods.tellme.prompts import PromptSet
from neuroscribe.words import STOPWORDS, FrequencySummariser, singular, words

# the reference's prompts end in this phrase; a reply that repeats it is cut after it
LEAD = re.compile(r"^\s*(?:the\s+)?main\s+thing\s+this\s+neuron\s+does\s+is\s+(?:to\s+)?find\s*")


@dataclass(frozen=True)
class Item:
    """One listed item: a caption (or class name) and its value 0-10."""

    text: str
    value: int


@dataclass
class Explained:
    candidates: list[str]
    raw_replies: list[str] = field(default_factory=list)
    error: str | None = None
    requests: int = 0
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def count(self, reply: ChatReply) -> None:
        self.requests += int(not reply.cached)
        self.cache_hits += int(reply.cached)
        if not reply.cached:
            self.prompt_tokens += reply.prompt_tokens
            self.completion_tokens += reply.completion_tokens


def clean_explanation(text: str) -> str:
    """An explanation as a label: its first line, without the prompt's lead-in, quotes or a
    final full stop."""
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    first = LEAD.sub("", lines[0] if lines else "").strip().strip("\"'` ")
    return " ".join(first.rstrip(".").split())


def distinct(candidates: Sequence[str], k: int) -> list[str]:
    """Up to k non-empty candidates, the first of each (case-insensitive) duplicate kept."""
    seen: dict[str, str] = {}
    for c in candidates:
        if c and c.lower() not in seen:
            seen[c.lower()] = c
    return list(seen.values())[:k]


def _explanations(value: Any) -> list[str]:
    found = value.get("explanations") if isinstance(value, dict) else None
    if not isinstance(found, list) or not found or not all(isinstance(x, str) for x in found):
        raise ValueError('expected {"explanations": [one or more strings]}')
    return found


@dataclass(frozen=True)
class LlmExplainer:
    client: LLMClient
    model: str
    prompts: PromptSet
    mode: str = "compact"  # or reference
    k: int = 3
    via: str = "n"  # n: the request's choices; json: a JSON list in one reply
    temperature: float = 1.0
    max_tokens: int = 64
    seed: int = 0

    @property
    def id(self) -> str:
        return f"{self.client.backend.id}:{self.model}"

    def request(self, source: str, neuron: int, items: Sequence[Item]) -> ChatRequest:
        prompt = self.prompts.get(source, self.mode)
        listing = [(i.text, i.value) for i in items]
        json_suffix = self.prompts.json_suffix(self.k) if self.via == "json" else None
        return ChatRequest(
            model=self.model,
            messages=tuple(prompt.messages(neuron, listing, json_suffix)),
            temperature=self.temperature,
            max_tokens=self.max_tokens * (self.k if self.via == "json" else 1),
            seed=self.seed,
            response_format="json" if self.via == "json" else None,
            n=self.k if self.via == "n" else 1,
        )

    def explain(self, source: str, neuron: int, items: Sequence[Item]) -> Explained:
        request = self.request(source, neuron, items)
        out = Explained([])
        try:
            if self.via == "json":
                answer = self.client.chat_json(request, _explanations)
                for reply in answer.replies:
                    out.count(reply)
                out.raw_replies = [r.text for r in answer.replies]
                texts = answer.value
            else:
                reply = self.client.chat(request)
                out.count(reply)
                texts = list(reply.texts)
                out.raw_replies = texts
        except LLMError as err:
            for reply in getattr(err, "chats", []):
                out.count(reply)
            out.raw_replies = list(getattr(err, "replies", []))
            out.error = self.client.redact(str(err))
            return out
        out.candidates = distinct([clean_explanation(t) for t in texts], self.k)
        if not out.candidates:
            out.error = "the explainer's replies held no explanation"
            # kept for audit, but a later run asks again instead of reading it back
            self.client.reject(request, out.error)
        return out

    def explain_group(
        self, source: str, neurons: Sequence[tuple[int, Sequence[Item]]]
    ) -> list[Explained]:
        """Each neuron's candidates: one request per neuron, or for several neurons one request
        asking for a JSON object with every neuron's k explanations (the prompt file's
        `batched` texts); the request's usage is counted on its first neuron."""
        if len(neurons) == 1:
            return [self.explain(source, *neurons[0])]
        prompt = self.prompts.batched.get(source)
        if prompt is None:
            raise ValueError(
                f"prompt file {self.prompts.path} has no `batched` texts, which "
                "tellme.neurons_per_request > 1 needs"
            )
        wanted = [n for n, _ in neurons]
        listings = [(n, [(i.text, i.value) for i in items]) for n, items in neurons]
        request = ChatRequest(
            model=self.model,
            messages=tuple(prompt.messages(listings, self.k)),
            temperature=self.temperature,
            max_tokens=self.max_tokens * self.k * len(neurons),
            seed=self.seed,
            response_format="json",
        )
        outs = [Explained([]) for _ in neurons]
        try:
            answer = self.client.chat_json(request, lambda value: _per_neuron(value, wanted))
        except LLMError as err:
            for reply in getattr(err, "chats", []):
                outs[0].count(reply)
            for out in outs:
                out.raw_replies = list(getattr(err, "replies", []))
                out.error = self.client.redact(str(err))
            return outs
        for reply in answer.replies:
            outs[0].count(reply)
        for out, n in zip(outs, wanted, strict=True):
            out.raw_replies = [r.text for r in answer.replies]
            out.candidates = distinct([clean_explanation(t) for t in answer.value[n]], self.k)
            if not out.candidates:
                out.error = "the explainer's reply held no explanation for this neuron"
        return outs


def _per_neuron(value: Any, wanted: Sequence[int]) -> dict[int, list[str]]:
    """A batched reply's explanations by neuron; every asked neuron must be there."""
    entries = value.get("neurons") if isinstance(value, dict) else None
    if not isinstance(entries, list):
        raise ValueError('expected {"neurons": [{"neuron": N, "explanations": [...]}, ...]}')
    found: dict[int, list[str]] = {}
    for entry in entries:
        explanations = entry.get("explanations") if isinstance(entry, dict) else None
        if not isinstance(explanations, list) or not all(isinstance(x, str) for x in explanations):
            raise ValueError("each neuron needs an `explanations` list of strings")
        found.setdefault(int(entry["neuron"]), explanations)
    missing = [n for n in wanted if n not in found]
    if missing:
        raise ValueError(f"the reply has no explanations for neurons {missing}")
    return found


@dataclass(frozen=True)
class FrequencyExplainer:
    """Explanations without a model (llm backend `none`)."""

    k: int = 3
    max_words: int = 3

    @property
    def id(self) -> str:
        return f"none:tellme-frequency-{self.max_words}"

    def explain_group(
        self, source: str, neurons: Sequence[tuple[int, Sequence[Item]]]
    ) -> list[Explained]:
        return [self.explain(source, n, items) for n, items in neurons]

    def explain(self, source: str, neuron: int, items: Sequence[Item]) -> Explained:
        ranked = self.phrases(items) if source == "activations" else self.shared_words(items)
        out = Explained(ranked[: self.k])
        if not out.candidates:
            out.error = "no phrase stands out in the listed items"
        return out

    def phrases(self, items: Sequence[Item]) -> list[str]:
        """Phrases by their activation-weighted share of the listed captions less their plain
        share: what the high-activation images have and the rest of the listing (the lower
        top images and the random ones) lacks. A phrase in every caption scores 0."""
        grams = FrequencySummariser(max_words=self.max_words)
        present = [set(grams.phrase_counts([i.text])) for i in items]
        weight = sum(i.value for i in items)
        if weight == 0 or not items:
            return []
        scores: Counter[str] = Counter()
        for phrases, item in zip(present, items, strict=True):
            for p in phrases:
                scores[p] += item.value / weight - 1 / len(items)
        # a longer phrase wins over its parts only when nearly as particular
        return sorted(
            (p for p in scores if scores[p] > 0),
            key=lambda p: (-(scores[p] * (1 + 0.1 * p.count(" "))), -p.count(" "), p),
        )

    def shared_words(self, items: Sequence[Item]) -> list[str]:
        """Content words of the class names, weighted by the classes' values (plurals folded);
        a single class name wins when no word is shared."""
        scores: Counter[str] = Counter()
        for item in items:
            for w in dict.fromkeys(singular(w) for w in words(item.text) if w not in STOPWORDS):
                scores[w] += item.value
        return sorted((w for w in scores if scores[w] > 0), key=lambda w: (-scores[w], w))
