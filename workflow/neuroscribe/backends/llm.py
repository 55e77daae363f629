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
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Any, Generic, Protocol, TypeVar

from neuroscribe.cache import DiskCache, cache_key
from neuroscribe.redaction import redact, secret_values

log = logging.getLogger(__name__)
T = TypeVar("T")

ROLES = frozenset(["system", "user", "assistant"])


@dataclass(frozen=True)
class ChatRequest:
    """Everything that determines a reply; its JSON form (plus the backend id) is the cache key."""

    model: str
    messages: tuple[dict[str, str], ...]
    temperature: float = 0.0
    max_tokens: int = 256
    seed: int = 0
    response_format: str | None = None  # "json": ask the backend for a JSON object

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
        object.__setattr__(self, "messages", messages)

    @classmethod
    def of(cls, model: str, prompt: str, system: str | None = None, **kwargs: Any) -> ChatRequest:
        """A request of one user prompt, after an optional system message."""
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt})
        return cls(model=model, messages=tuple(messages), **kwargs)


@dataclass
class ChatReply:
    text: str
    prompt_tokens: int
    completion_tokens: int
    cached: bool


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
        return ChatReply(
            text=choices[0].message.content or "",
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            cached=False,
        )


class LocalBackend:
    """A chat model run in process with transformers (hub id or local folder).

    Greedy decoding at temperature 0, else sampling seeded by `request.seed`. `response_format`
    is not enforced here (no constrained decoding): `LLMClient.chat_json` validates instead.
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
                **sampling,
            )
        new = out[0, prompt_len:]
        return ChatReply(
            text=self.tokenizer.decode(new, skip_special_tokens=True),
            prompt_tokens=prompt_len,
            completion_tokens=int(new.shape[0]),
            cached=False,
        )


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
    `cache_key({"backend": backend.id, **asdict(request)})`, and stored as soon as they arrive.
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
        base = cache_key({"backend": self.backend.id, **asdict(request)})
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
                return ChatReply(**hit, cached=True)
        reply = self._complete(request)
        if cache is not None:
            # stored at once: a job killed after this point never pays for this reply again
            cache.put(key, {k: v for k, v in asdict(reply).items() if k != "cached"})
        return reply

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
