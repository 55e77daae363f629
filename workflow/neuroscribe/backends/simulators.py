"""Simulator role: how strongly should each image activate a neuron, given only its label?

Backends share one interface, `predict(labels, images) -> Simulation` (and
`predict_classes(labels, classes)`, where the items are class names: TeLLMe's weight-based
variant), and an `id` recorded with every score. `clip` scores an image by its image-text cosine
with the label under any CLIP-like model (SigLIP included); `annotations` is the demo world's
exact simulator (`neuroscribe.demo.annotations`); `LlmSimulator` asks a chat model for a 0-10
value per item (image captions or class names), one request per label. A label a simulator
cannot use gets NaN predictions and the reason, never a silent drop.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from neuroscribe.backends.llm import ChatReply, ChatRequest, LLMClient
    from neuroscribe.cache import DiskCache

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeImage:
    """An evaluation image; `caption` is what a text-only simulator (`LlmSimulator`) reads."""

    image_id: str
    path: str
    caption: str | None = None


# how a simulated value was read, per label (`Simulation.readings`)
EXPECTED_VALUE = "expected-value"  # Σ p·v over the reply token's alternatives (API logprobs)
EXACT = "exact"  # Σ p·v over the in-process model's distribution, teacher-forced
PARSED = "parsed"  # the integer written in the reply, for at least one of the label's items


@dataclass
class Simulation:
    """Predictions [labels, items] (NaN rows for labels that could not be simulated) and, per
    label, None or the reason it could not be.

    Per label too, from simulators that read a reply (empty lists given are filled with the
    defaults, so simulators without replies need not set them): `missing`, the items the reply
    gave no usable value for (NaN there); `extra`, reply lines dropped (an item number not asked,
    a repeated one, a value that is not a whole number from 0 to 10); `replies`, the raw reply
    text (audit); `readings`, how values were read (`expected-value`, `exact`, `parsed`), None
    where nothing was read (not simulated, or a simulator that reads no reply)."""

    predictions: np.ndarray
    reasons: list[str | None]
    missing: list[int] = field(default_factory=list)
    extra: list[int] = field(default_factory=list)
    replies: list[str | None] = field(default_factory=list)
    readings: list[str | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.reasons)
        self.missing = self.missing or [0] * n
        self.extra = self.extra or [0] * n
        self.replies = self.replies or [None] * n
        self.readings = self.readings or [None] * n
        for name in ("missing", "extra", "replies", "readings"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"Simulation.{name} has {len(getattr(self, name))} entries, not {n}"
                )
        if self.predictions.shape[0] != n:
            raise ValueError(f"Simulation has {self.predictions.shape[0]} rows for {n} labels")


class Simulator(Protocol):
    @property
    def id(self) -> str: ...

    def predict(self, labels: Sequence[str], images: Sequence[ProbeImage]) -> Simulation: ...

    def predict_classes(self, labels: Sequence[str], classes: Sequence[str]) -> Simulation: ...


def unusable(label: Any) -> str | None:
    """Why a label cannot be simulated by any backend (no label, an empty one), or None."""
    if not isinstance(label, str):
        return "no label"
    if not label.strip():
        return "empty label"
    return None


CLASS_PROMPT = "a photo of a {}"  # how ClipSimulator.predict_classes writes a class name


class ClipSimulator:
    """Image-text cosine of each image with each label, under a CLIP-like model (transformers
    `AutoModel` with `get_image_features` and `get_text_features`: CLIP, SigLIP). Images are
    embedded once per simulator, whatever the number of labels."""

    def __init__(
        self, model: str, device: str = "auto", dtype: str = "auto", batch_size: int = 64
    ) -> None:
        from transformers import AutoModel, AutoProcessor

        from neuroscribe.device import resolve_device, resolve_dtype
        from neuroscribe.hub import fetching

        self.model_name = model
        self.batch_size = batch_size
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        with fetching(model, "simulator"):
            self.processor = AutoProcessor.from_pretrained(model)
            self.model = AutoModel.from_pretrained(model, dtype=self.dtype)
        self.model = self.model.to(self.device).eval()
        self._images: dict[str, np.ndarray] = {}

    @property
    def id(self) -> str:
        return f"clip:{self.model_name}:{str(self.dtype).removeprefix('torch.')}"

    @staticmethod
    def _features(out: Any) -> Any:
        # transformers 5 may return a model output whose pooler_output is the projection
        return out if hasattr(out, "float") else out.pooler_output

    def _embed(self, kind: str, items: Sequence[Any]) -> np.ndarray:
        import torch

        parts = []
        with torch.inference_mode():
            for start in range(0, len(items), self.batch_size):
                chunk = list(items[start : start + self.batch_size])
                if kind == "image":
                    pixels = self.processor(images=chunk, return_tensors="pt")["pixel_values"]
                    out = self.model.get_image_features(
                        pixel_values=pixels.to(self.device, self.dtype)
                    )
                else:
                    # SigLIP was trained on max-length padding; CLIP accepts it too
                    tokens = self.processor(
                        text=chunk, return_tensors="pt", padding="max_length", truncation=True
                    )
                    out = self.model.get_text_features(
                        **{k: v.to(self.device) for k, v in tokens.items()}
                    )
                features = self._features(out).float()
                parts.append(torch.nn.functional.normalize(features, dim=1).cpu().numpy())
        return np.concatenate(parts)

    def text_cosine(self, a: Sequence[str], b: Sequence[str]) -> list[float]:
        """Cosine of each pair (a[i], b[i]) in the model's text space."""
        return (self._embed("text", a) * self._embed("text", b)).sum(axis=1).tolist()

    def predict_classes(self, labels: Sequence[str], classes: Sequence[str]) -> Simulation:
        """Text-text cosine of each label with "a photo of a {class}" for each class."""
        reasons = [unusable(label) for label in labels]
        predictions = np.full((len(labels), len(classes)), np.nan, dtype=np.float32)
        usable = [j for j, why in enumerate(reasons) if why is None]
        if usable and classes:
            text = self._embed("text", [labels[j] for j in usable])
            names = self._embed("text", [CLASS_PROMPT.format(c) for c in classes])
            predictions[usable] = text @ names.T
        return Simulation(predictions, reasons)

    def predict(self, labels: Sequence[str], images: Sequence[ProbeImage]) -> Simulation:
        from neuroscribe.probe import load_rgb

        new = [i for i in dict.fromkeys(images) if i.image_id not in self._images]
        if new:
            vectors = self._embed("image", [load_rgb(i.path) for i in new])
            self._images.update(zip((i.image_id for i in new), vectors, strict=True))
        reasons = [unusable(label) for label in labels]
        predictions = np.full((len(labels), len(images)), np.nan, dtype=np.float32)
        usable = [j for j, why in enumerate(reasons) if why is None]
        if usable and images:
            text = self._embed("text", [labels[j] for j in usable])
            image = np.stack([self._images[i.image_id] for i in images])
            predictions[usable] = text @ image.T
        return Simulation(predictions, reasons)


def simulator(cfg: dict[str, Any], worlds: Sequence[tuple[str, str]], device: str, dtype: str):
    """The configured simulator (`evaluation.simulator`)."""
    if cfg["backend"] == "annotations":
        from neuroscribe.demo.annotations import AnnotationSimulator

        return AnnotationSimulator(worlds)
    return ClipSimulator(cfg["model"], device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# LLM simulator

PROMPTS = Path(__file__).with_name("prompts") / "simulator.yaml"
ITEM_KINDS = ("images", "classes")
PLACEHOLDERS = ("{explanation}", "{items}")
VALUES = tuple(str(v) for v in range(11))  # the scale, 0-10; "10" is one token in most LLMs
# what stands in for every value in the reply the in-process model is teacher-forced with: each
# slot is predicted from the prompt and the listing so far, never from values it did not write
# (a punctuation mark keeps the tab before it a token of its own under byte-level BPE)
VALUE_PLACEHOLDER = "?"
REPLY_SLACK_TOKENS = 16  # room for a line of preamble a model may write anyway
# a reply line: item number, a separator (tab, spaces, or one of ":.)=," with spaces), the value
_LINE = re.compile(r"^[ \t]*(\d+)(?:[ \t]*[:.)=,][ \t]*|[ \t]+)(\S+)[ \t\r]*$", re.MULTILINE)


class PromptFileError(ValueError):
    """A simulator prompt file is missing, unreadable or misshapen; the message says how."""


@dataclass(frozen=True)
class SimulatorPrompts:
    """The LLM simulator's texts, per item kind (`images`: captions, `classes`: class names): a
    system text and a user template holding `{explanation}` and `{items}` once each."""

    system: dict[str, str]
    user: dict[str, str]
    source: str = "neuroscribe"

    @classmethod
    def load(cls, path: str | Path | None = None) -> SimulatorPrompts:
        """The prompt file at `path` (None: neuroscribe's own, `backends/prompts/simulator.yaml`),
        checked."""
        import yaml

        path = Path(path) if path is not None else PROMPTS
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            raise PromptFileError(f"simulator prompt file {path} cannot be read: {err}") from err
        if not isinstance(data, dict):
            raise PromptFileError(f"simulator prompt file {path} must be a mapping")
        unknown = sorted(set(data) - {"source", *ITEM_KINDS})
        if unknown:
            raise PromptFileError(
                f"simulator prompt file {path}: unknown key {unknown[0]!r}; it takes source, "
                + ", ".join(ITEM_KINDS)
            )
        system, user = {}, {}
        for kind in ITEM_KINDS:
            entry = data.get(kind)
            if not (
                isinstance(entry, dict)
                and set(entry) == {"system", "user"}
                and all(isinstance(v, str) for v in entry.values())
            ):
                raise PromptFileError(
                    f"simulator prompt file {path}: `{kind}` must be a mapping of two texts, "
                    "`system` and `user`"
                )
            for placeholder in PLACEHOLDERS:
                if entry["user"].count(placeholder) != 1:
                    raise PromptFileError(
                        f"simulator prompt file {path}: `{kind}.user` must hold {placeholder} "
                        f"exactly once; it holds it {entry['user'].count(placeholder)} times"
                    )
            system[kind], user[kind] = entry["system"], entry["user"]
        return cls(system, user, str(data.get("source", path.name)))

    @property
    def digest(self) -> str:
        """A short hash of the texts: part of the simulator's id, so an edit shows."""
        texts = [t for kind in ITEM_KINDS for t in (self.system[kind], self.user[kind])]
        return hashlib.sha256("\0".join(texts).encode()).hexdigest()[:12]

    def messages(self, kind: str, explanation: str, items: Sequence[str]) -> list[dict[str, str]]:
        """System and user message asking for one value per item, items numbered from 1."""
        # the listing is one line per item: a caption's own line breaks and tabs become spaces
        listing = "\n".join(f"{k}\t{' '.join(str(t).split())}" for k, t in enumerate(items, 1))
        # one pass over the template: an explanation holding "{items}" stays as written
        user = re.sub(
            r"\{explanation\}|\{items\}",
            lambda m: explanation if m.group(0) == "{explanation}" else listing,
            self.user[kind],
        )
        return [{"role": "system", "content": self.system[kind]}, {"role": "user", "content": user}]


@dataclass
class _Read:
    """One label's values as read from a reply."""

    values: np.ndarray
    missing: int
    extra: int
    reply: str | None
    reading: str


def parse_values(text: str, n: int) -> tuple[dict[int, tuple[int, int, int]], int]:
    """The values of a reply listing items 1..n, one line `number<TAB>value` each: {item index
    (from 0): (value, start, end of the value in `text`)}, and the number of lines dropped (an
    item number outside 1..n or already given, or a value that is not a whole number from 0 to
    10). Lines that are not `number value` at all (prose) are ignored."""
    found: dict[int, tuple[int, int, int]] = {}
    dropped = 0
    for match in _LINE.finditer(text):
        item, value = int(match.group(1)), match.group(2)
        if not 1 <= item <= n or item - 1 in found or not value.isdecimal():
            dropped += 1
            continue
        if not 0 <= int(value) <= 10:
            dropped += 1
            continue
        found[item - 1] = (int(value), match.start(2), match.end(2))
    return found, dropped


def _spans(logprobs: Sequence[Any], text: str) -> list[tuple[int, int]] | None:
    """Each token's (start, end) in `text`, or None when the tokens do not spell the text."""
    spans, at = [], 0
    for token in logprobs:
        spans.append((at, at + len(token.token)))
        at += len(token.token)
    return spans if "".join(t.token for t in logprobs) == text else None


def expected_value(token: Any) -> float | None:
    """Σ p·v over a token's alternatives that are numbers 0-10 (surrounding whitespace aside),
    their probabilities renormalised among themselves; None when there are none. Alternatives
    that are other numbers ("100", "7.5") or words are left out."""
    alternatives = dict(token.top)
    alternatives.setdefault(token.token, token.logprob)
    weights: dict[int, float] = {}
    for text, logprob in alternatives.items():
        value = text.strip()
        if value in VALUES and math.isfinite(logprob):
            weights[int(value)] = weights.get(int(value), 0.0) + math.exp(logprob)
    total = sum(weights.values())
    if total <= 0:
        return None
    return sum(v * w for v, w in weights.items()) / total


class LlmSimulator:
    """A chat model predicts each item's value, 0-10, from the label alone: one request per
    label, listing every item once (numbered from 1), at temperature 0.

    How values are read, best first:
    - in-process model (`LocalBackend`): teacher-forced, the expected value Σ p·v of the model's
      distribution over "0".."10" where each value would be written (`exact`); where the
      tokenizer cannot do that in one pass (a value of two tokens), as below, by parsing;
    - OpenAI API (or compatible): the reply is asked with the top 20 token log-probabilities
      (unless `logprobs=False`); each value whose token has alternatives that are numbers 0-10 is
      their expected value, renormalised among them (`expected-value`), any other is the integer
      written (`parsed`; a label's reading is `parsed` if any of its values was).

    Reply lines with an item number not asked, repeated, or a value that is not a whole number
    from 0 to 10 are dropped (counted in `extra`); items with no line are NaN (counted in
    `missing`). Nothing is guessed. Requests go through the client: cached, retried, counted.
    """

    def __init__(
        self,
        client: LLMClient,
        model: str,
        prompts: SimulatorPrompts | None = None,
        seed: int = 0,
        max_tokens_per_item: int = 6,
        logprobs: bool = True,
    ) -> None:
        if max_tokens_per_item < 1:
            raise ValueError("max_tokens_per_item must be at least 1")
        self.client = client
        self.model = model
        self.prompts = prompts if prompts is not None else SimulatorPrompts.load()
        self.seed = seed
        self.max_tokens_per_item = max_tokens_per_item
        self.logprobs = logprobs
        self._exact_failed: str | None = None  # why teacher-forced reading is not possible

    @property
    def id(self) -> str:
        return f"llm:{self.client.backend.id}:{self.model}:prompts-{self.prompts.digest}"

    def __repr__(self) -> str:
        return f"LlmSimulator(client={self.client!r}, model={self.model!r}, id={self.id!r})"

    def predict(self, labels: Sequence[str], images: Sequence[ProbeImage]) -> Simulation:
        """Items are the images' captions (every image must carry one)."""
        uncaptioned = [i.image_id for i in images if not isinstance(i.caption, str)]
        if uncaptioned:
            raise ValueError(
                f"{len(uncaptioned)} images have no caption (first: {uncaptioned[0]}); the LLM "
                "simulator reads captions, not pixels: caption the evaluation images first"
            )
        return self._simulate("images", labels, [str(i.caption) for i in images])

    def predict_classes(self, labels: Sequence[str], classes: Sequence[str]) -> Simulation:
        """Items are class names."""
        return self._simulate("classes", labels, [str(c) for c in classes])

    def request(self, kind: str, label: str, items: Sequence[str]) -> ChatRequest:
        """The chat request of one label (no logprobs asked: see `_ask`)."""
        from neuroscribe.backends.llm import ChatRequest

        return ChatRequest(
            model=self.model,
            messages=tuple(self.prompts.messages(kind, label, items)),
            temperature=0.0,
            max_tokens=self.max_tokens_per_item * len(items) + REPLY_SLACK_TOKENS,
            seed=self.seed,
        )

    def _simulate(self, kind: str, labels: Sequence[str], items: Sequence[str]) -> Simulation:
        from neuroscribe.backends.llm import LocalBackend

        reasons = [unusable(label) for label in labels]
        n_labels = len(labels)
        predictions = np.full((n_labels, len(items)), np.nan, dtype=np.float32)
        missing, extra = [0] * n_labels, [0] * n_labels
        replies: list[str | None] = [None] * n_labels
        readings: list[str | None] = [None] * n_labels
        usable = [j for j, why in enumerate(reasons) if why is None]
        if items and usable:
            requests = [self.request(kind, labels[j], items) for j in usable]
            if isinstance(self.client.backend, LocalBackend):
                reads = [self._exact_or_parsed(r, len(items)) for r in requests]
            else:
                reads = self._parsed(requests, len(items))
            for j, read in zip(usable, reads, strict=True):
                predictions[j] = read.values
                missing[j], extra[j] = read.missing, read.extra
                replies[j], readings[j] = read.reply, read.reading
        return Simulation(predictions, reasons, missing, extra, replies, readings)

    def _exact_or_parsed(self, request: ChatRequest, n: int) -> _Read:
        if self._exact_failed is None:
            lines = [f"{k}\t" for k in range(1, n + 1)]
            slots, at = [], 0
            for line in lines:
                slots.append(at + len(line))
                at += len(line) + len(VALUE_PLACEHOLDER) + 1
            reply = "".join(f"{line}{VALUE_PLACEHOLDER}\n" for line in lines)
            try:
                dist = self.client.value_distributions(request, reply, slots, VALUES)
            except ValueError as err:
                self._exact_failed = str(err)
                log.warning(
                    "%s: values cannot be read exactly (%s); generating and parsing replies",
                    self.client.backend.id,
                    err,
                )
            else:
                values = dist @ np.arange(len(VALUES), dtype=np.float64)
                return _Read(values.astype(np.float32), 0, 0, None, EXACT)
        return self._parsed([request], n)[0]

    def _parsed(self, requests: Sequence[ChatRequest], n: int) -> list[_Read]:
        from dataclasses import replace

        from neuroscribe.backends.llm import MAX_TOP_LOGPROBS, OpenAIBackend

        if self.logprobs and isinstance(self.client.backend, OpenAIBackend):
            requests = [replace(r, logprobs=MAX_TOP_LOGPROBS) for r in requests]
        return [self._read(reply, n) for reply in self.client.chat_many(requests)]

    @staticmethod
    def _read(reply: ChatReply, n: int) -> _Read:
        found, dropped = parse_values(reply.text, n)
        values = np.full(n, np.nan, dtype=np.float32)
        spans = _spans(reply.logprobs, reply.text) if reply.logprobs else None
        all_expected = bool(found) and spans is not None
        for item, (value, start, end) in found.items():
            ev = None
            if spans is not None:
                assert reply.logprobs is not None
                # the token carrying the value: it holds the value's first character, and the
                # value and nothing else but whitespace
                t = next((i for i, (a, b) in enumerate(spans) if a <= start < b), None)
                if t is not None:
                    token = reply.logprobs[t]
                    if spans[t][1] >= end and token.token.strip() == reply.text[start:end]:
                        ev = expected_value(token)
            all_expected = all_expected and ev is not None
            values[item] = value if ev is None else ev
        reading = EXPECTED_VALUE if all_expected else PARSED
        return _Read(values, n - len(found), dropped, reply.text, reading)


def llm_simulator(
    llm_cfg: dict[str, Any],
    cache: DiskCache | None,
    device: str,
    dtype: str,
    prompts: str | Path | SimulatorPrompts | None = None,
    logprobs: bool = True,
    seed: int = 0,
) -> LlmSimulator:
    """The LLM simulator over the configured llm backend (`llm` config section: `openai` or
    `local`), its replies cached in `cache`; `prompts` a prompt file or loaded texts (None:
    neuroscribe's own)."""
    from neuroscribe.backends import llm_client

    if not isinstance(prompts, SimulatorPrompts):
        prompts = SimulatorPrompts.load(prompts)
    client = llm_client(llm_cfg, cache, device, dtype)
    return LlmSimulator(client, llm_cfg["model"], prompts, seed=seed, logprobs=logprobs)
