"""LLM role: the chat client (backend `none`, the frequency summariser, lives in `words`).

One chat client serves the whole project: `LLMClient` wraps a backend (`OpenAIBackend` for the
OpenAI API or any compatible server, `LocalBackend` for a transformers chat model in process)
with a persistent response cache, retries with backoff, bounded concurrency, strict JSON replies
with one repair round, and usage counters.
"""

from __future__ import annotations

import email.utils
import json
import logging
import math
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from neuroscribe.cache import DiskCache, cache_key
from neuroscribe.redaction import redact, secret_values

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)
T = TypeVar("T")

ROLES = frozenset(["system", "user", "assistant"])
MAX_TOP_LOGPROBS = 20  # the OpenAI API's limit on `top_logprobs`


@dataclass(frozen=True)
class ChatRequest:
    """Everything that determines a reply; its JSON form (plus the backend id) is the cache key."""

    model: str
    messages: tuple[dict[str, str], ...]
    temperature: float = 0.0
    max_tokens: int = 256
    seed: int = 0
    response_format: str | None = None  # "json": ask the backend for a JSON object
    n: int = 1  # choices wanted (n > 1 needs temperature > 0 to be worth asking)
    # None: no token log-probabilities; K: those of the first choice's tokens, each with its K
    # most likely alternatives (the API's `top_logprobs`, 0-20)
    logprobs: int | None = None

    def __post_init__(self) -> None:
        # copy into plain dicts in a tuple, so a caller mutating its list cannot change the key
        messages = tuple({"role": m["role"], "content": m["content"]} for m in self.messages)
        for m in messages:
            if m["role"] not in ROLES or not isinstance(m["content"], str):
                raise ValueError(f"bad chat message {m!r}: role must be one of {sorted(ROLES)}")
        if not messages:
            raise ValueError("a chat request needs at least one message")
        if self.response_format not in (None, "json"):
            raise ValueError(
                f"response_format must be None or 'json', not {self.response_format!r}"
            )
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n (choices) must be an integer of at least 1, not {self.n!r}")
        if self.logprobs is not None and (
            isinstance(self.logprobs, bool)
            or not isinstance(self.logprobs, int)
            or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS
        ):
            raise ValueError(
                f"logprobs must be None or an integer from 0 to {MAX_TOP_LOGPROBS} (the top "
                f"alternatives per token), not {self.logprobs!r}"
            )
        object.__setattr__(self, "messages", messages)

    def key_fields(self) -> dict[str, Any]:
        """The request as the plain dict its cache key hashes. `n` and `logprobs` appear only
        when they differ from their defaults, so requests made before they existed keep their
        keys (and their cached replies)."""
        fields = asdict(self)
        if self.n == 1:
            del fields["n"]
        if self.logprobs is None:
            del fields["logprobs"]
        return fields

    @classmethod
    def of(cls, model: str, prompt: str, system: str | None = None, **kwargs: Any) -> ChatRequest:
        """A request of one user prompt, after an optional system message."""
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt})
        return cls(model=model, messages=tuple(messages), **kwargs)


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its text, its log-probability and its most likely alternatives
    (token, log-probability), most likely first, as the backend reported them."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()

    def as_json(self) -> dict[str, Any]:
        return {"token": self.token, "logprob": self.logprob, "top": [list(t) for t in self.top]}

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> TokenLogprob:
        top = tuple((str(t), float(lp)) for t, lp in value.get("top", ()))
        return cls(str(value["token"]), float(value["logprob"]), top)


@dataclass
class ChatReply:
    """A reply: `text` is the first choice's text, `texts` every choice's (`texts[0] == text`);
    `logprobs`, when asked for and given, are those of the first choice's tokens."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    cached: bool
    texts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None

    def __post_init__(self) -> None:
        if not self.texts:
            self.texts = [self.text]

    def as_json(self) -> dict[str, Any]:
        """The cached form, plain JSON: `texts` and `logprobs` only when they say more than
        `text` (so a default request's entry is what it was before they existed)."""
        value: dict[str, Any] = {
            "text": self.text,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
        }
        if self.texts != [self.text]:
            value["texts"] = list(self.texts)
        if self.logprobs is not None:
            value["logprobs"] = [t.as_json() for t in self.logprobs]
        return value

    @classmethod
    def from_json(cls, value: Mapping[str, Any], cached: bool = True) -> ChatReply:
        """A reply from its cached form, old entries (without `texts`, `logprobs`) included."""
        logprobs = value.get("logprobs")
        return cls(
            text=value["text"],
            prompt_tokens=value["prompt_tokens"],
            completion_tokens=value["completion_tokens"],
            cached=cached,
            texts=list(value.get("texts") or [value["text"]]),
            logprobs=None if logprobs is None else [TokenLogprob.from_json(t) for t in logprobs],
        )


@dataclass
class JsonReply(Generic[T]):
    """A validated JSON reply, with every chat reply it took (the first, and a repair if any)."""

    value: T
    replies: list[ChatReply]


class ChatBackend(Protocol):
    """`complete` makes one uncached call and may raise transient errors; the client retries."""

    @property
    def id(self) -> str: ...

    def complete(self, request: ChatRequest) -> ChatReply: ...


class LLMError(RuntimeError):
    """A chat request failed for good (non-retryable error, or out of attempts)."""

    def __init__(
        self, message: str, *, attempts: int = 0, status: int | None = None, last_error: Any = None
    ) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.status = status
        self.last_error = last_error


class MalformedReply(LLMError):
    """The reply (and its one repair) did not parse or validate; `replies` holds the raw texts."""

    def __init__(
        self,
        message: str,
        *,
        replies: list[str],
        problems: list[str],
        chats: list[ChatReply] | None = None,
    ) -> None:
        super().__init__(message, attempts=len(replies))
        self.replies = replies
        self.problems = problems
        self.chats = chats or []  # the replies with their usage, for accounting


class TransientLLMError(RuntimeError):
    """Raised by a backend for a failure worth retrying (the client also knows openai's errors)."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def _api_key(api_key_env: str | None) -> str:
    if api_key_env is None:
        return "unused"  # a local OpenAI-compatible server needs no key, the client needs a string
    key = os.environ.get(api_key_env, "")
    if not key:
        raise LLMError(
            f"environment variable {api_key_env} is not set: it must hold the API key for the "
            "openai llm backend. Export it where snakemake runs (`export "
            f"{api_key_env}=...`; never in the config), or set llm.api_key_env to null for a "
            "server that needs no key"
        )
    return key


class OpenAIBackend:
    """The OpenAI chat completions API, or any compatible server (vLLM, llama.cpp) at `base_url`."""

    def __init__(
        self,
        base_url: str | None,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout_s: float = 60,
    ) -> None:
        import openai

        self.base_url = base_url
        self.model = model
        self.api_key_env = api_key_env
        self.timeout_s = timeout_s
        # max_retries=0: LLMClient does the retries (and counts them); the key is not kept here
        self._client = openai.OpenAI(
            api_key=_api_key(api_key_env), base_url=base_url, timeout=timeout_s, max_retries=0
        )
        # values to blank out of any error text (a server may echo the Authorization header)
        self.secrets = secret_values([api_key_env])

    @property
    def id(self) -> str:
        return f"openai:{self.base_url or 'api.openai.com'}"

    def __repr__(self) -> str:
        return (
            f"OpenAIBackend(base_url={self.base_url!r}, model={self.model!r}, "
            f"api_key_env={self.api_key_env!r}, timeout_s={self.timeout_s})"
        )

    def complete(self, request: ChatRequest) -> ChatReply:
        import openai

        kwargs: dict[str, Any] = {}
        if request.response_format == "json":
            kwargs["response_format"] = {"type": "json_object"}
        if request.n > 1:
            kwargs["n"] = request.n
        if request.logprobs is not None:
            kwargs["logprobs"] = True
            kwargs["top_logprobs"] = request.logprobs
        try:
            completion = self._client.chat.completions.create(
                model=request.model,
                messages=[dict(m) for m in request.messages],  # type: ignore[misc]
                temperature=request.temperature,
                max_tokens=request.max_tokens,
                seed=request.seed,
                **kwargs,
            )
        except (json.JSONDecodeError, openai.APIResponseValidationError) as err:
            # a body that is not the API's JSON (a proxy's error page): worth another try
            raise TransientLLMError(f"unreadable response body: {err}") from err
        choices = getattr(completion, "choices", None)
        if not choices:
            # e.g. a proxy's HTML page with status 200: not the API talking, worth another try
            raise TransientLLMError(f"response without choices: {str(completion)[:200]!r}")
        usage = completion.usage
        choices = sorted(choices, key=lambda c: getattr(c, "index", 0) or 0)
        texts = [c.message.content or "" for c in choices]
        if len(texts) != request.n:
            log.warning("%s: asked for %d choices, got %d", self.id, request.n, len(texts))
        logprobs = None
        if request.logprobs is not None:
            content = getattr(getattr(choices[0], "logprobs", None), "content", None)
            if content is not None:  # a compatible server may not give them: None, not []
                logprobs = [
                    TokenLogprob(
                        t.token,
                        float(t.logprob),
                        tuple((a.token, float(a.logprob)) for a in t.top_logprobs or ()),
                    )
                    for t in content
                ]
        return ChatReply(
            text=texts[0],
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            cached=False,
            texts=texts,
            logprobs=logprobs,
        )


class LocalBackend:
    """A chat model run in process with transformers (hub id or local folder).

    Greedy decoding at temperature 0, else sampling seeded by `request.seed` (`n` > 1 choices
    only when sampling). `response_format` is not enforced here (no constrained decoding):
    `LLMClient.chat_json` validates instead. Generation gives no token log-probabilities;
    `value_distributions` scores values in a given reply exactly instead.
    """

    def __init__(self, model: str, device: str = "cpu", dtype: str = "auto") -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from neuroscribe.device import resolve_device, resolve_dtype
        from neuroscribe.hub import fetching

        self.model = model
        self.device = resolve_device(device)
        # float16 on CUDA by default: a 3B model then fits a 16 GB V100 next to nothing else
        self.dtype = resolve_dtype(dtype, self.device)
        with fetching(model, "llm"):
            self.tokenizer = AutoTokenizer.from_pretrained(model)
            self._model = AutoModelForCausalLM.from_pretrained(model, dtype=self.dtype)
        self._model.to(self.device).eval()
        # torch.manual_seed is process-global: one generation at a time keeps seeds meaningful
        self._lock = threading.Lock()

    @property
    def id(self) -> str:
        # the dtype changes the replies, so it is part of every cache key
        return f"local:{self.model}:{str(self.dtype).removeprefix('torch.')}"

    def __repr__(self) -> str:
        return f"LocalBackend(model={self.model!r}, device={str(self.device)!r})"

    def complete(self, request: ChatRequest) -> ChatReply:
        import torch

        if request.model != self.model:
            raise ValueError(f"request for model {request.model!r} sent to {self!r}")
        if request.logprobs is not None:
            raise ValueError(
                f"{self!r} gives no token log-probabilities from generation; ask without "
                "logprobs, or score given values exactly with LocalBackend.value_distributions"
            )
        if request.n > 1 and request.temperature <= 0:
            raise ValueError(
                f"n={request.n} choices at temperature 0 would be {request.n} identical greedy "
                "replies; ask with temperature > 0 for several choices"
            )
        inputs = self.tokenizer.apply_chat_template(
            [dict(m) for m in request.messages],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        ).to(self.device)
        prompt_len = int(inputs["input_ids"].shape[1])
        sampling: dict[str, Any] = {"do_sample": False}
        if request.temperature > 0:
            sampling = {"do_sample": True, "temperature": request.temperature, "top_k": 0}
        pad = self.tokenizer.pad_token_id
        with self._lock, torch.no_grad():
            if request.temperature > 0:
                torch.manual_seed(request.seed)
            out = self._model.generate(
                **inputs,
                max_new_tokens=request.max_tokens,
                pad_token_id=pad if pad is not None else self.tokenizer.eos_token_id,
                num_return_sequences=request.n,
                **sampling,
            )
        new = out[:, prompt_len:]
        texts = [self.tokenizer.decode(row, skip_special_tokens=True) for row in new]
        return ChatReply(
            text=texts[0],
            prompt_tokens=prompt_len,
            completion_tokens=sum(self._generated_length(row) for row in new),
            cached=False,
            texts=texts,
        )

    def _generated_length(self, row: Any) -> int:
        """Tokens generated in one returned sequence: up to its first end token (included); the
        rest is padding where several sequences of different lengths were returned."""
        eos = self.tokenizer.eos_token_id
        ends = (row == eos).nonzero() if eos is not None else []
        return int(ends[0, 0]) + 1 if len(ends) else int(row.shape[0])

    def value_distributions(
        self,
        messages: Sequence[Mapping[str, str]],
        reply: str,
        slots: Sequence[int],
        values: Sequence[str],
    ) -> np.ndarray:
        """The model's distribution over `values` at each slot of a given assistant reply.

        The chat template of `messages` (with the generation prompt) followed by `reply` (no end
        token) is run in one forward pass; at each character offset in `slots` (where a value
        would be written in `reply`) the next-token logits of the tokens of `values` are
        softmaxed among themselves: an array [len(slots), len(values)], rows summing to 1.
        What follows a slot in `reply` (a placeholder, say) is seen only by later slots.

        Each slot must start a token of `reply` as tokenized in context (write a tab or newline
        before it, not a space: byte-level BPE merges a space into the digit after it), and
        each value must be one token there; ValueError otherwise, so a caller can fall back to
        generating and parsing.
        """
        import numpy as np
        import torch

        if not values:
            raise ValueError("value_distributions needs at least one value")
        if not self.tokenizer.is_fast:
            raise ValueError(f"{self!r}: reading values needs a fast tokenizer (offset mapping)")
        prompt = self.tokenizer.apply_chat_template(
            [dict(m) for m in messages], add_generation_prompt=True, tokenize=False
        )
        encoded = self.tokenizer(
            prompt + reply, add_special_tokens=False, return_offsets_mapping=True
        )
        ids: list[int] = list(encoded["input_ids"])
        # the first token starting at each character offset
        starts: dict[int, int] = {}
        for t, (start, end) in enumerate(encoded["offset_mapping"]):
            if end > start:
                starts.setdefault(start, t)
        if len(prompt) not in starts:
            raise ValueError(
                f"the reply's first characters merge into the chat template's last token under "
                f"{self.model}'s tokenizer; the reply would not be read as the model writes it"
            )
        positions: list[int] = []
        value_ids: list[list[int]] = []
        by_context: dict[str, list[int]] = {}
        for slot in slots:
            if not 0 <= slot < len(reply):
                raise ValueError(f"slot {slot} is outside the reply ({len(reply)} characters)")
            t = starts.get(len(prompt) + slot)
            if not t or not self.tokenizer.decode([ids[t]]).startswith(reply[slot]):
                raise ValueError(
                    f"slot {slot} of the reply ({reply[max(0, slot - 8) : slot + 8]!r}) does not "
                    f"start a token of {self.model}'s tokenizer; put a tab or newline before it"
                )
            positions.append(t - 1)  # the logits there predict the token at the slot
            context = reply[reply.rfind("\n", 0, slot) + 1 : slot]  # the line so far
            if context not in by_context:
                by_context[context] = self._value_ids(context, values)
            value_ids.append(by_context[context])
        if not positions:
            return np.zeros((0, len(values)))
        with self._lock, torch.no_grad():
            logits = self._model(torch.tensor([ids], device=self.device)).logits[0]
            rows = torch.stack([logits[p, v] for p, v in zip(positions, value_ids, strict=True)])
            return torch.softmax(rows.double(), dim=-1).cpu().numpy()

    def _value_ids(self, context: str, values: Sequence[str]) -> list[int]:
        """The token id of each value written right after `context` (e.g. "3\t"), where it
        must be one token of its own (not merged with what precedes it)."""
        ids = []
        for value in values:
            text = context + value
            encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            inside = [
                (tid, start, end)
                for tid, (start, end) in zip(
                    encoded["input_ids"], encoded["offset_mapping"], strict=True
                )
                if end > len(context)
            ]
            one = len(inside) == 1 and inside[0][1:] == (len(context), len(text))
            if not one or self.tokenizer.decode([inside[0][0]]) != value:
                pieces = self.tokenizer.convert_ids_to_tokens([tid for tid, _, _ in inside])
                raise ValueError(
                    f"value {value!r} is not a single token of {self.model}'s tokenizer after "
                    f"{context!r} (it is {pieces}); its probability cannot be read from one "
                    "forward pass: generate the reply and parse it instead"
                )
            ids.append(int(inside[0][0]))
        return ids


@dataclass
class LLMStats:
    """`requests` counts backend calls including retries; tokens count only what was paid for."""

    requests: int = 0
    retries: int = 0
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    failures: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def retry_after_s(headers: Mapping[str, str] | None) -> float | None:
    """Seconds a server asked us to wait: `retry-after-ms`, `retry-after` seconds or HTTP date."""
    if headers is None:
        return None
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / divisor
        except ValueError:
            date = email.utils.parsedate_tz(value)
            if date is None:
                continue
            seconds = email.utils.mktime_tz(date) - time.time()
        if math.isfinite(seconds):
            return max(seconds, 0.0)
    return None


def _classify(err: BaseException) -> tuple[bool, float | None, int | None]:
    """(retryable, server-requested delay, HTTP status) of a backend error."""
    if isinstance(err, TransientLLMError):
        return True, err.retry_after_s, None
    import openai

    if isinstance(err, openai.APIConnectionError):  # dropped connections and timeouts
        return True, None, None
    if isinstance(err, openai.APIStatusError):
        status = err.status_code
        retryable = status == 429 or status >= 500
        return retryable, retry_after_s(err.response.headers) if retryable else None, status
    return False, None, None


def _describe(err: BaseException) -> str:
    status = getattr(err, "status_code", None)
    message = getattr(err, "message", None) or str(err)
    # openai's messages start "Error code: 404 - ": the status is said once, in front
    message = re.sub(r"^Error code: \d+ - ", "", message)
    return f"HTTP {status}: {message}" if status else f"{type(err).__name__}: {message}"


def _rejection_key(base: str, generation: int) -> str:
    return f"rejected:{base}:{generation}"


_FENCE = re.compile(r"```[ \t]*(?:json)?[ \t]*\n?(.*?)```", re.DOTALL | re.IGNORECASE)


def parse_json_reply(text: str) -> Any:
    """The reply as JSON: the whole text, or the content of its first ``` fenced block."""
    body = text.strip()
    if not body:
        raise ValueError("the reply was empty")
    fenced = _FENCE.search(body)
    if fenced:
        body = fenced.group(1).strip()
    try:
        return json.loads(body)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"the reply is not valid JSON ({err.msg} at line {err.lineno} column {err.colno})"
        ) from err


class LLMClient:
    """Cached, retrying, concurrency-bounded chat over one backend.

    Replies are cached in `cache` (a DiskCache, namespace "llm" by convention) under
    `cache_key({"backend": backend.id, **request.key_fields()})`, and stored as soon as they
    arrive.
    """

    def __init__(
        self,
        backend: ChatBackend,
        cache: DiskCache | None,
        max_concurrency: int = 4,
        max_attempts: int = 6,
        base_delay_s: float = 1.0,
        max_delay_s: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if max_concurrency < 1 or max_attempts < 1:
            raise ValueError("max_concurrency and max_attempts must be at least 1")
        self.backend = backend
        self.cache = cache
        self.max_concurrency = max_concurrency
        self.max_attempts = max_attempts
        self.base_delay_s = base_delay_s
        self.max_delay_s = max_delay_s
        self._sleep = sleep
        self._rng = random.Random()
        self._secrets: list[str] = list(getattr(backend, "secrets", []))
        self._stats = LLMStats()
        self._lock = threading.Lock()
        # bounds calls in flight across all threads using this client, not only chat_many's pool
        self._slots = threading.BoundedSemaphore(max_concurrency)
        self._pending: dict[str, Future[ChatReply]] = {}  # requests in flight, by cache key

    def __repr__(self) -> str:
        cache = None if self.cache is None else str(self.cache.path)
        return (
            f"LLMClient(backend={self.backend!r}, cache={cache!r}, "
            f"max_concurrency={self.max_concurrency}, max_attempts={self.max_attempts})"
        )

    @property
    def stats(self) -> LLMStats:
        with self._lock:
            return replace(self._stats)

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self._stats, name, getattr(self._stats, name) + delta)

    def key(self, request: ChatRequest) -> str:
        """Where the request's live reply is cached: its first key, or, once replies to it were
        rejected as unusable, a fresh key per rejection (every key is written once, so jobs
        reading the cache's segments in any order agree on the answer)."""
        base = cache_key({"backend": self.backend.id, **request.key_fields()})
        generation = 0
        if self.cache is not None:
            while self.cache.get(_rejection_key(base, generation)) is not None:
                generation += 1
        return base if generation == 0 else f"{base}:{generation}"

    def chat(self, request: ChatRequest) -> ChatReply:
        key = self.key(request)
        cache = self.cache
        if cache is not None:
            hit = cache.get(key)
            if hit is not None:
                self._count(cache_hits=1)
                return ChatReply.from_json(hit)
        # the same request asked by another thread while it is in flight waits for that reply
        # instead of paying for it twice
        with self._lock:
            pending = self._pending.get(key)
            owner = pending is None
            if pending is None:
                pending = self._pending[key] = Future()
        if not owner:
            reply = pending.result()  # the asking thread's error, if it failed
            self._count(cache_hits=1)
            return replace(reply, cached=True)
        try:
            reply = self._complete(request)
            if cache is not None:
                # stored at once: a job killed after this point never pays for this reply again
                cache.put(key, reply.as_json())
        except BaseException as err:
            pending.set_exception(err)
            raise
        finally:
            with self._lock:
                del self._pending[key]
        pending.set_result(reply)
        return reply

    def value_distributions(
        self, request: ChatRequest, reply: str, slots: Sequence[int], values: Sequence[str]
    ) -> np.ndarray:
        """`LocalBackend.value_distributions` of the request's messages, through the cache (a
        rerun computes nothing) and counted as one request. The backend must be in process
        (TypeError otherwise); ValueError where the values cannot be read in one pass."""
        import numpy as np

        score = getattr(self.backend, "value_distributions", None)
        if score is None:
            raise TypeError(f"{self.backend.id} cannot score given values (no forward pass here)")
        fields = {"backend": self.backend.id, **request.key_fields()}
        key = "values:" + cache_key(
            {**fields, "reply": reply, "slots": list(slots), "values": list(values)}
        )
        hit = None if self.cache is None else self.cache.get(key)
        if hit is not None:
            self._count(cache_hits=1)
            return np.asarray(hit, dtype=np.float64).reshape(len(slots), len(values))
        self._count(requests=1)
        try:
            with self._slots:
                result = score(request.messages, reply, slots, values)
        except Exception:
            self._count(failures=1)
            raise
        if self.cache is not None:
            self.cache.put(key, result.tolist())
        return result

    def reject(self, request: ChatRequest, reason: str) -> None:
        """Mark the cached reply to `request` as unusable: the next `chat` of the same request
        asks the backend again instead of serving it. The reply stays in the cache for audit,
        next to the reason."""
        if self.cache is None:
            return
        key = self.key(request)
        base, _, generation = key.partition(":")
        self.cache.put(_rejection_key(base, int(generation or 0)), {"key": key, "reason": reason})

    def _delay(self, attempt: int, server_delay: float | None) -> float:
        if server_delay is not None:
            return min(server_delay, self.max_delay_s)
        cap = min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1))
        # jitter: workers that failed together should not all come back at the same moment
        return cap * (0.5 + 0.5 * self._rng.random())

    def _complete(self, request: ChatRequest) -> ChatReply:
        last: BaseException | None = None
        for attempt in range(1, self.max_attempts + 1):
            self._count(requests=1, retries=int(attempt > 1))
            try:
                with self._slots:
                    reply = self.backend.complete(request)
            except Exception as err:
                retryable, server_delay, status = _classify(err)
                if not retryable:
                    self._count(failures=1)
                    if status is None:
                        raise  # not an API answer (e.g. a bug): keep the original error
                    raise LLMError(
                        f"{self.backend.id}: request failed, not retryable: {self._describe(err)}",
                        attempts=attempt,
                        status=status,
                        last_error=err,
                    ) from err
                last = err
                if attempt == self.max_attempts:
                    break
                delay = self._delay(attempt, server_delay)
                log.warning(
                    "%s: attempt %d/%d failed (%s); retrying in %.2f s",
                    self.backend.id,
                    attempt,
                    self.max_attempts,
                    self._describe(err),
                    delay,
                )
                self._sleep(delay)
                continue
            self._count(
                prompt_tokens=reply.prompt_tokens, completion_tokens=reply.completion_tokens
            )
            return reply
        assert last is not None
        self._count(failures=1)
        raise LLMError(
            f"{self.backend.id}: gave up after {self.max_attempts} attempts; "
            f"last error: {self._describe(last)}",
            attempts=self.max_attempts,
            status=getattr(last, "status_code", None),
            last_error=last,
        ) from last

    def chat_many(self, requests: Iterable[ChatRequest]) -> list[ChatReply]:
        """Replies in request order; at most `max_concurrency` backend calls at once."""
        requests = list(requests)
        if not requests:
            return []
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(requests))) as pool:
            return list(pool.map(self.chat, requests))

    def chat_json(self, request: ChatRequest, validate: Callable[[Any], T]) -> JsonReply[T]:
        """The reply parsed as JSON and checked by `validate` (which raises ValueError on a wrong
        shape); one repair request on failure, then `MalformedReply`. Never a silently wrong value.
        """
        replies: list[str] = []
        problems: list[str] = []
        chats: list[ChatReply] = []
        current = request
        for round_ in range(2):
            chats.append(self.chat(current))
            text = chats[-1].text
            replies.append(text)
            try:
                return JsonReply(validate(parse_json_reply(text)), chats)
            # TypeError/KeyError too: validators that index into the value fail that way
            except (ValueError, TypeError, KeyError) as err:
                problems.append(f"{type(err).__name__}: {err}" if not str(err) else str(err))
            if round_ == 0:
                # the repair is a different request (longer history), so it has its own cache key
                current = replace(
                    request,
                    messages=(
                        *request.messages,
                        {"role": "assistant", "content": text},
                        {
                            "role": "user",
                            "content": f"Your reply could not be used: {problems[-1]}. "
                            "Reply again with valid JSON only, no other text.",
                        },
                    ),
                )
        self._count(failures=1)
        # neither reply is an answer: a later run asks again rather than failing the same way
        self.reject(request, problems[0])
        self.reject(current, problems[-1])
        raise MalformedReply(
            f"{self.backend.id}: malformed reply after one repair: {self.redact(problems[-1])}",
            replies=[self.redact(r) for r in replies],
            problems=[self.redact(p) for p in problems],
            chats=chats,
        )

    def redact(self, text: str) -> str:
        """`text` without the backend's secrets, for anything logged or stored."""
        return redact(text, self._secrets)

    def _describe(self, err: BaseException) -> str:
        return self.redact(_describe(err))
