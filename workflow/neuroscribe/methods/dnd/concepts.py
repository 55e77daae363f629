"""Concept proposal (Describe-and-Dissect): N candidate concepts per neuron from its captions.

Three proposers share one interface, `propose(neurons) -> [NeuronConcepts]`:

- `ReferenceProposer` makes the paper's calls, with the texts of a prompt file (`prompts`): one
  request per caption to simplify it, then N requests that each summarise the simplified
  captions (in order, then shuffled) into a concept, plus a bare re-ask when a reply lists
  several concepts. At least K + N requests per neuron. Its replies are post-processed as the
  authors' code does (see `ReferenceProposer._label` and `reference_join`).
- `BatchedProposer` (default) asks once per neuron, or once per group of neurons, for all N
  candidates as strict JSON.
- `FrequencyProposer` (llm backend `none`) takes the most shared caption phrases; no model.

Candidates are lower-cased and de-duplicated; `max_words` drops longer ones (None keeps them, as
the authors' code does) and `background_variants` adds "X background" for a candidate whose last
word is design(s) or graphic(s) (the authors' rule, to help the image model draw vague labels).
A neuron whose reply stays malformed after one repair is recorded as failed with its raw
replies, never given a made-up label.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from neuroscribe.backends import llm_client
from neuroscribe.backends.llm import ChatReply, ChatRequest, LLMClient, LLMError, MalformedReply
from neuroscribe.cache import DiskCache
from neuroscribe.methods.dnd.prompts import PromptSet, load_prompts
from neuroscribe.words import FrequencySummariser

log = logging.getLogger(__name__)

MAX_WORDS = 5

BATCHED_SYSTEM = (
    "You describe what individual neurons of a vision model detect, from captions of the images "
    "and image regions that activate each neuron most. You reply with JSON only."
)


@dataclass(frozen=True)
class ConceptSettings:
    """What the proposers ask for; every field that changes a request is part of its cache key."""

    model: str
    n: int = 5
    temperature: float = 0.3
    max_tokens: int = 256
    seed: int = 0
    neurons_per_request: int = 1
    max_words: int | None = MAX_WORDS  # None: keep candidates of any length
    background_variants: bool = False


@dataclass
class NeuronConcepts:
    """One neuron's candidates, the raw replies behind them, and what they cost."""

    neuron: int
    candidates: list[str] = field(default_factory=list)
    raw_replies: list[str] = field(default_factory=list)
    error: str | None = None
    llm_requests: int = 0  # requests sent to the backend (not answered by the cache)
    llm_cache_hits: int = 0
    prompt_tokens: int = 0  # tokens paid for (cached replies cost nothing)
    completion_tokens: int = 0

    @property
    def status(self) -> str:
        return "failed" if self.error is not None else "ok"

    def count(self, replies: Sequence[ChatReply]) -> None:
        for reply in replies:
            if reply.cached:
                self.llm_cache_hits += 1
            else:
                self.llm_requests += 1
                self.prompt_tokens += reply.prompt_tokens
                self.completion_tokens += reply.completion_tokens


class Proposer(Protocol):
    @property
    def id(self) -> str: ...

    def propose(self, neurons: Sequence[tuple[int, list[str]]]) -> list[NeuronConcepts]: ...


_NUMBERING = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s*")
_QUOTES = "\"'`“”‘’"


def normalise(concept: str) -> str:
    """Lower case, single spaces, no list marker, quotes or final period."""
    text = _NUMBERING.sub("", concept.strip())
    text = text.strip().strip(_QUOTES).strip().rstrip(".").strip().strip(_QUOTES)
    return " ".join(text.lower().split())


def unique(concepts: Sequence[str]) -> list[str]:
    """Normalised, empty ones dropped, first occurrence kept."""
    seen: dict[str, None] = {}
    for c in concepts:
        text = normalise(c)
        if text:
            seen.setdefault(text, None)
    return list(seen)


def check_concept(concept: Any, max_words: int | None = MAX_WORDS) -> str:
    """A candidate from a JSON reply: a string of 1 to `max_words` words (else ValueError)."""
    if not isinstance(concept, str):
        raise ValueError(f"concept {concept!r} is not a string")
    text = normalise(concept)
    n_words = len(text.split())
    if n_words < 1 or (max_words is not None and n_words > max_words):
        raise ValueError(
            f"concept {concept!r} has {n_words} words; each must have 1-{max_words or 'any'}"
        )
    return text


# the authors' rule: a label ending in one of these words also gets "... background"
VAGUE_LAST_WORDS = frozenset({"design", "designs", "graphic", "graphics"})


def background_variants(replies: Sequence[str]) -> list[str]:
    """The candidates of some replies, each followed by its "X background" variant when its last
    word is vague (design(s), graphic(s)). As in the authors' code, the word is checked before a
    final full stop is removed, so "abstract designs." gets no variant."""
    out: list[str] = []
    for reply in replies:
        lower = reply.lower()
        out.append(lower)
        words = lower.split()
        if words and words[-1] in VAGUE_LAST_WORDS:
            out.append(f"{lower} background")
    return out


def reference_join(items: Sequence[str]) -> str:
    """Items joined as the authors' code joins them: ", " after each item that differs from the
    last one. So an item equal to the last is glued to the next ("a, bb" for [a, b, b])."""
    text = ""
    for item in items:
        text += item
        if item != items[-1]:
            text += ", "
    return text


def _caption_list(captions: Sequence[str]) -> str:
    return "\n".join(f"{i}. {c}" for i, c in enumerate(captions, 1))


class BatchedProposer:
    """One request per group of `neurons_per_request` neurons; all N candidates as JSON."""

    def __init__(self, client: LLMClient, settings: ConceptSettings) -> None:
        self.client = client
        self.settings = settings

    @property
    def id(self) -> str:
        return f"batched:{self.client.backend.id}:{self.settings.model}"

    def request(self, neurons: Sequence[tuple[int, list[str]]]) -> ChatRequest:
        s = self.settings
        blocks = [
            f"Neuron {neuron}, captions of its top images:\n{_caption_list(captions)}"
            for neuron, captions in neurons
        ]
        example = json.dumps({"neurons": [{"neuron": neurons[0][0], "concepts": ["...", "..."]}]})
        prompt = (
            "\n\n".join(blocks)
            + f"\n\nFor each neuron above, give {s.n} different candidate concept labels, each "
            "1-5 words long, that name what most of its captions (not always every one) show. "
            "Put the best candidate first and do not simply repeat a caption.\n"
            f"Reply with a JSON object shaped like {example}, with one entry per neuron and "
            f"exactly {s.n} concepts each."
        )
        # room for N short labels per neuron plus the JSON around them
        max_tokens = max(s.max_tokens, 64 + 16 * s.n * len(neurons))
        return ChatRequest.of(
            s.model,
            prompt,
            system=BATCHED_SYSTEM,
            temperature=s.temperature,
            max_tokens=max_tokens,
            seed=s.seed,
            response_format="json",
        )

    def validator(self, ids: Sequence[int]):
        n, max_words = self.settings.n, self.settings.max_words

        def validate(value: Any) -> dict[int, list[str]]:
            if not isinstance(value, dict) or not isinstance(value.get("neurons"), list):
                raise ValueError('expected an object {"neurons": [...]}')
            found: dict[int, list[str]] = {}
            for entry in value["neurons"]:
                if not isinstance(entry, dict) or not isinstance(entry.get("concepts"), list):
                    raise ValueError(f'entry {entry!r} is not {{"neuron": id, "concepts": [...]}}')
                neuron = entry.get("neuron")
                if neuron not in ids or neuron in found:
                    raise ValueError(
                        f"unexpected or repeated neuron {neuron!r}; expected {list(ids)}"
                    )
                if len(entry["concepts"]) < n:
                    raise ValueError(
                        f"neuron {neuron}: {len(entry['concepts'])} concepts, expected {n}"
                    )
                found[neuron] = unique([check_concept(c, max_words) for c in entry["concepts"][:n]])
            missing = [i for i in ids if i not in found]
            if missing:
                raise ValueError(f"no concepts for neuron(s) {missing}")
            return found

        return validate

    def _group(self, neurons: Sequence[tuple[int, list[str]]]) -> list[NeuronConcepts]:
        ids = [neuron for neuron, _ in neurons]
        records = [NeuronConcepts(neuron) for neuron in ids]
        # a group's cost is counted once, on its first neuron, so column sums stay right
        first = records[0]
        try:
            reply = self.client.chat_json(self.request(neurons), self.validator(ids))
        except MalformedReply as err:
            first.count(err.chats)
            for r in records:
                r.raw_replies = list(err.replies)
                r.error = str(err)
            return records
        first.count(reply.replies)
        for r in records:
            r.candidates = _finish(reply.value[r.neuron], self.settings)
            r.raw_replies = [c.text for c in reply.replies]
        return records

    def propose(self, neurons: Sequence[tuple[int, list[str]]]) -> list[NeuronConcepts]:
        size = self.settings.neurons_per_request
        groups = [neurons[i : i + size] for i in range(0, len(neurons), size)]
        return _concurrently(self._group, groups, self.client.max_concurrency)


class ReferenceProposer:
    """The paper's request structure, with the texts of a prompt file: simplify every caption,
    then N summaries of the simplified captions (in order first, then shuffled), each re-asked
    once, bare, when its reply lists several concepts."""

    def __init__(
        self, client: LLMClient, settings: ConceptSettings, prompts: PromptSet | None = None
    ) -> None:
        self.client = client
        self.settings = settings
        self.prompts = prompts or load_prompts(None)

    @property
    def id(self) -> str:
        return (
            f"reference:{self.client.backend.id}:{self.settings.model}:prompts={self.prompts.name}"
        )

    def _ask(self, messages: list[tuple[str, str]], seed: int) -> ChatRequest:
        s = self.settings
        return ChatRequest(
            model=s.model,
            messages=tuple({"role": role, "content": text} for role, text in messages),
            temperature=s.temperature,
            max_tokens=s.max_tokens,
            seed=seed,
        )

    def simplify_request(self, caption: str) -> ChatRequest:
        return self._ask(self.prompts.simplify.messages(caption), self.settings.seed)

    def summary_request(self, descriptions: Sequence[str], seed: int) -> ChatRequest:
        return self._ask(self.prompts.summarise.messages(reference_join(descriptions)), seed)

    def reask_request(self, parts: Sequence[str], seed: int) -> ChatRequest:
        return self._ask(self.prompts.reask.messages(reference_join(parts)), seed)

    @staticmethod
    def _label(text: str) -> str:
        # as the authors' code: a reply with a colon keeps what lies between the first two
        return text.split(":")[1] if ":" in text else text

    def _neuron(self, neuron: int, captions: list[str]) -> NeuronConcepts:
        s = self.settings
        record = NeuronConcepts(neuron)
        simple = self.client.chat_many([self.simplify_request(c) for c in captions])
        record.count(simple)
        # the replies are used as they are (an empty one falls back to its caption)
        simplified = [
            r.text if r.text.strip() else c for r, c in zip(simple, captions, strict=True)
        ]
        raw: list[str] = []
        asked: list[ChatRequest] = []
        labels: list[str] = []
        for i in range(s.n):
            order = list(simplified)
            if i:  # the first summary sees the captions in rank order, the others shuffled
                random.Random(f"{s.seed}:{neuron}:{i}").shuffle(order)
            asked.append(self.summary_request(order, seed=s.seed + i))
            reply = self.client.chat(asked[-1])
            record.count([reply])
            raw.append(reply.text)
            text = self._label(reply.text)
            if "," in text:
                # several labels in one reply: asked once more, bare, to merge them
                asked.append(self.reask_request(text.split(","), seed=s.seed + i))
                again = self.client.chat(asked[-1])
                record.count([again])
                raw.append(again.text)
                text = self._label(again.text)
            labels.append(text)
        record.raw_replies = raw
        record.candidates = _finish(labels, s)
        if not record.candidates:
            words = f"1-{s.max_words} word" if s.max_words is not None else "non-empty"
            record.error = f"no usable {words} concept in the replies {raw!r}"
            for request in asked:  # none was an answer: a later run asks again
                self.client.reject(request, record.error)
        return record

    def propose(self, neurons: Sequence[tuple[int, list[str]]]) -> list[NeuronConcepts]:
        return _concurrently(
            lambda item: [self._neuron(*item)], list(neurons), self.client.max_concurrency
        )


def _finish(labels: Sequence[str], settings: ConceptSettings) -> list[str]:
    """A neuron's candidates from its labels: background variants when asked for, normalised,
    de-duplicated, and at most `max_words` long."""
    if settings.background_variants:
        labels = background_variants(labels)
    found = unique(labels)
    if settings.max_words is None:
        return found
    return [c for c in found if len(c.split()) <= settings.max_words]


class FrequencyProposer:
    """Backend `none`: the caption phrases most shared by a neuron's exemplars and least by the
    other neurons of the same call (one chunk), ranked tf-idf style; no model, no requests.
    """

    def __init__(
        self,
        n: int = 5,
        summariser: FrequencySummariser | None = None,
        background: bool = False,
    ) -> None:
        self.n = n
        self.summariser = summariser or FrequencySummariser(max_words=MAX_WORDS)
        self.background = background  # `background_variants`, as for the LLM proposers

    @property
    def id(self) -> str:
        return self.summariser.id

    def propose(self, neurons: Sequence[tuple[int, list[str]]]) -> list[NeuronConcepts]:
        counts = [self.summariser.phrase_counts(captions) for _, captions in neurons]
        df: Counter[str] = Counter(p for c in counts for p in c)
        records = []
        for neuron, captions in neurons:
            candidates = self.summariser.propose(captions, self.n, df, len(neurons))
            if self.background:
                candidates = unique(background_variants(candidates))
            record = NeuronConcepts(neuron, candidates=candidates)
            if not record.candidates:
                record.error = "the captions hold no content words to summarise"
            records.append(record)
        return records


def build_proposer(
    cfg: dict[str, Any], cache: DiskCache | None, device: str, dtype: str
) -> Proposer:
    """The concept proposer of the configured llm backend and prompt mode."""
    if cfg["backend"] == "none":
        # phrases of up to max_words words (null: the summariser's 5; captions are short)
        return FrequencyProposer(
            n=cfg["candidates"],
            summariser=FrequencySummariser(max_words=cfg.get("max_words") or MAX_WORDS),
            background=cfg.get("background_variants", False),
        )
    settings = ConceptSettings(
        model=cfg["model"],
        n=cfg["candidates"],
        temperature=cfg["temperature"],
        max_tokens=cfg["max_tokens"],
        seed=cfg["seed"],
        neurons_per_request=cfg["neurons_per_request"],
        max_words=cfg.get("max_words", MAX_WORDS),
        background_variants=cfg.get("background_variants", False),
    )
    client = llm_client(cfg, cache, device, dtype)
    if cfg["prompt_mode"] == "reference":
        return ReferenceProposer(client, settings, load_prompts(cfg.get("prompts")))
    return BatchedProposer(client, settings)


def _concurrently(work, items: list, workers: int) -> list[NeuronConcepts]:
    """`work(item) -> [NeuronConcepts]` over items, at most `workers` at once, in item order.

    A request that failed for good (out of retries, or refused) stops the job after the other
    items finish: their replies are cached, so the retried job pays only for what failed.
    """
    if not items:
        return []
    out: list[NeuronConcepts] = []
    failures: list[LLMError] = []

    def guarded(item):
        try:
            return work(item)
        except LLMError as err:
            failures.append(err)
            return []

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(items)))) as pool:
        for records in pool.map(guarded, items):
            out.extend(records)
    if failures:
        raise LLMError(
            f"{len(failures)} of {len(items)} concept requests failed for good; the others are "
            f"cached and a rerun pays only for these. First error: {failures[0]}"
        ) from failures[0]
    return out
