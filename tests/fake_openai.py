"""A fake OpenAI-compatible chat server on 127.0.0.1 for tests (stdlib only).

It answers `POST /v1/chat/completions` and `GET /v1/models` with the JSON shapes the real `openai`
client expects, logs every request body (so tests can count requests), measures how many
requests are in flight at once, and plays a script of behaviours, one per chat request: a reply,
an HTTP error (429 with Retry-After, 500, 400), a slow reply, a dropped connection or a garbage
body. When the script runs out, `default` answers (by default: echo the last user message).

A request for `n` choices gets n: a reply's own `texts`, else one scripted reply per choice (the
next ones in the script, then `default`). A request with `logprobs: true` gets the first choice's
token log-probabilities in the API's shape (`choices[0].logprobs.content`), the text split into
tokens simply (runs of digits, runs of letters, single other characters); a reply's `numbers`
scripts the alternatives at its numeric tokens.
"""

from __future__ import annotations

import json
import math
import re
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Reply:
    """A normal completion; `delay_s` holds the reply back (a slow server).

    `texts`: every choice's text, for a request of n choices (the first n are sent; `text` is
    then unused). `numbers`: for the k-th numeric token of the first choice's text (counting
    from 0, every run of digits: item numbers too), the probabilities of its top alternatives,
    e.g. {1: {"7": 0.5, "3": 0.25, "10": 0.25}}; numeric tokens not named get the default: the
    written number at logprob 0 and a few other numbers far less likely.
    """

    text: str | None
    delay_s: float = 0.0
    texts: tuple[str | None, ...] | None = None
    numbers: Mapping[int, Mapping[str, float]] | None = None


@dataclass(frozen=True)
class Status:
    """An HTTP error with an OpenAI-style error body, e.g. 429 with `Retry-After`;
    `echo_headers` puts the request's headers in the message, as some proxies do."""

    code: int
    message: str = "fake error"
    retry_after: str | None = None
    echo_headers: bool = False


@dataclass(frozen=True)
class Drop:
    """Read the request, then close the connection without answering."""


@dataclass(frozen=True)
class Garbage:
    """HTTP 200 whose body is not JSON at all."""

    body: bytes = b"<html>definitely not json"


Behaviour = Reply | Status | Drop | Garbage

# a fake token: a run of digits, a run of letters, or any other single character
_TOKEN = re.compile(r"\d+|[^\W\d_]+|.", re.DOTALL)
_FILLER = -30.0  # log-probability of the padding alternatives


def tokens(text: str) -> list[str]:
    """The fake server's tokens of a text (they join back to the text)."""
    return _TOKEN.findall(text)


def token_logprobs(
    text: str, top: int, numbers: Mapping[int, Mapping[str, float]] | None = None
) -> list[dict[str, Any]]:
    """`choices[0].logprobs.content` of a reply: one entry per token, `top` alternatives each."""
    numbers = numbers or {}
    content = []
    k = 0  # numeric tokens seen
    for token in tokens(text):
        if token.isdigit():
            scripted = numbers.get(k)
            k += 1
            if scripted is not None:
                alternatives = {t: math.log(p) if p > 0 else _FILLER for t, p in scripted.items()}
            else:
                # the written number is certain; a few neighbours are possible but unlikely
                others = [str(v) for v in range(11) if str(v) != token][:3]
                alternatives = {token: 0.0} | {o: -12.0 - i for i, o in enumerate(others)}
        else:
            alternatives = {token: 0.0}
        logprob = alternatives.get(token, _FILLER)
        ranked = sorted(alternatives.items(), key=lambda item: -item[1])[:top]
        # pad with alternatives that are not numbers, so they change no expected value
        ranked += [(f"<alt{i}>", _FILLER - i) for i in range(top - len(ranked))]
        content.append(
            {
                "token": token,
                "logprob": logprob,
                "bytes": list(token.encode()),
                "top_logprobs": [
                    {"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in ranked
                ],
            }
        )
    return content


def echo(body: dict[str, Any]) -> Behaviour:
    users = [m["content"] for m in body.get("messages", []) if m.get("role") == "user"]
    return Reply(f"echo: {users[-1] if users else ''}")


class FakeOpenAI:
    """Start with `with FakeOpenAI(script) as server:`; `server.base_url` ends in `/v1`."""

    def __init__(
        self,
        script: Iterable[Behaviour] = (),
        default: Callable[[dict[str, Any]], Behaviour] = echo,
        model: str = "fake-model",
    ) -> None:
        self.script: deque[Behaviour] = deque(script)
        self.default = default
        self.model = model
        self.requests: list[dict[str, Any]] = []  # every chat request body, in arrival order
        self.headers: list[dict[str, str]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        # bodies of the requests whose reply reached a connected client, and of those whose
        # client was gone (killed) before the reply: a killed job never received those
        self.answered: list[dict[str, Any]] = []
        self.abandoned: list[dict[str, Any]] = []
        # while cleared, replies wait: a test holds requests in flight to kill a client mid-way
        self.gate = threading.Event()
        self.gate.set()
        self._lock = threading.Lock()
        self._closing = threading.Event()  # cuts slow replies short at shutdown
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def add(self, *behaviours: Behaviour) -> None:
        with self._lock:
            self.script.extend(behaviours)

    def _next(self, body: dict[str, Any]) -> Behaviour:
        with self._lock:
            if self.script:
                return self.script.popleft()
        return self.default(body)

    def _texts(self, body: dict[str, Any], reply: Reply) -> list[str | None]:
        """The text of each of the request's n choices."""
        n = int(body.get("n") or 1)
        if reply.texts is not None:
            if len(reply.texts) < n:
                raise AssertionError(f"scripted {len(reply.texts)} texts for n={n} choices")
            return list(reply.texts[:n])
        texts = [reply.text]
        for _ in range(n - 1):
            with self._lock:
                queued = self.script.popleft() if self.script else None
            more = queued if queued is not None else self.default(body)
            if not isinstance(more, Reply):
                raise AssertionError(f"choice {len(texts)} of {n} scripted as {more!r}")
            texts.append(more.text)
        return texts

    def start(self) -> FakeOpenAI:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
                pass

            def _send_json(self, code: int, payload: Any, headers: dict[str, str] | None = None):
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path.rstrip("/") == "/v1/models":
                    model = {"id": fake.model, "object": "model", "created": 0, "owned_by": "fake"}
                    self._send_json(200, {"object": "list", "data": [model]})
                else:
                    self._send_json(404, {"error": {"message": "not found", "type": "invalid"}})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send_json(404, {"error": {"message": "not found", "type": "invalid"}})
                    return
                body = json.loads(raw)
                with fake._lock:
                    fake.requests.append(body)
                    fake.headers.append(dict(self.headers.items()))
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    self._answer(body, fake._next(body))
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout); nothing to answer
                finally:
                    with fake._lock:
                        fake.in_flight -= 1

            def _answer(self, body: dict[str, Any], behaviour: Behaviour) -> None:
                if isinstance(behaviour, Drop):
                    # shut the socket down under the client: it sees a closed connection, no reply
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                elif isinstance(behaviour, Garbage):
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(behaviour.body)))
                    self.end_headers()
                    self.wfile.write(behaviour.body)
                elif isinstance(behaviour, Status):
                    headers = {}
                    if behaviour.retry_after is not None:
                        headers["Retry-After"] = behaviour.retry_after
                    message = behaviour.message
                    if behaviour.echo_headers:
                        message += f" (request headers: {dict(self.headers.items())})"
                    error = {"message": message, "type": "fake_error", "code": None}
                    self._send_json(behaviour.code, {"error": error}, headers)
                else:
                    if behaviour.delay_s:
                        fake._closing.wait(behaviour.delay_s)
                    while not (fake.gate.wait(0.05) or fake._closing.is_set()):
                        pass
                    if self._client_gone():
                        with fake._lock:
                            fake.abandoned.append(body)
                        return
                    self._send_json(200, fake.completion(body, behaviour))
                    with fake._lock:
                        fake.answered.append(body)

            def _client_gone(self) -> bool:
                # a closed client socket reads as end-of-file; a waiting one has nothing to read
                readable, _, _ = select.select([self.connection], [], [], 0)
                if not readable:
                    return False
                try:
                    return self.connection.recv(1, socket.MSG_PEEK) == b""
                except OSError:
                    return True

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def completion(self, body: dict[str, Any], reply: Reply | str | None) -> dict[str, Any]:
        if not isinstance(reply, Reply):
            reply = Reply(reply)
        texts = self._texts(body, reply)
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body["messages"])
        completion_tokens = sum(len((text or "").split()) for text in texts)
        choices: list[dict[str, Any]] = [
            {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
                "logprobs": None,
            }
            for i, text in enumerate(texts)
        ]
        if body.get("logprobs"):
            top = int(body.get("top_logprobs") or 0)
            content = token_logprobs(texts[0] or "", top, reply.numbers)
            choices[0]["logprobs"] = {"content": content, "refusal": None}
        return {
            "id": f"chatcmpl-fake{len(self.requests)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", self.model),
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    def stop(self) -> None:
        self._closing.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def fake_openai(*script: Behaviour, **kwargs: Any) -> Iterator[FakeOpenAI]:
    with FakeOpenAI(script, **kwargs) as server:
        yield server


_NEURON_BLOCK = re.compile(r"Neuron (\d+), captions of its top images:\n((?:\d+\. .*\n?)+)")


# how the labeller tells a caption-simplifying request (neuroscribe's own prompt file, the
# authors' texts, the test fixture's) from a summary
SIMPLIFY_PHRASES = ("Shorten this description", "simplifies the following description")


def labeller(body: dict[str, Any]) -> Behaviour:
    """A stand-in concept model: answers neuroscribe's concept prompts from caption phrases.

    Batched prompts get the JSON they ask for (the most shared phrases of each neuron's captions,
    padded to N); reference prompts get a plain label (simplify: the caption's first words;
    summary: the most shared phrase).
    """
    from neuroscribe.words import FrequencySummariser

    summariser = FrequencySummariser()
    prompt = [m["content"] for m in body["messages"] if m["role"] == "user"][-1]
    blocks = _NEURON_BLOCK.findall(prompt)
    if blocks:
        n = int(re.search(r"give (\d+) different candidate", prompt).group(1))
        neurons = []
        for neuron, listing in blocks:
            # a caption may hold a line break of its own (random tiny captioners write anything)
            lines = listing.strip().splitlines()
            captions = [line.split(". ", 1)[1] for line in lines if ". " in line]
            concepts = summariser.propose(captions, n)
            concepts += [f"pattern {i}" for i in range(n - len(concepts))]
            neurons.append({"neuron": int(neuron), "concepts": concepts})
        return Reply(json.dumps({"neurons": neurons}))
    text = prompt.rsplit(": ", 1)[1]
    if any(phrase in prompt for phrase in SIMPLIFY_PHRASES):
        return Reply(" ".join(text.split()[:4]))
    best = summariser.propose(text.split(", "), 1)
    return Reply(best[0] if best else "unclear")


_LISTED = re.compile(r"^(\d+)\t(.*)$", re.MULTILINE)
_VALUED = re.compile(r"^(.*)\t(\d+)$", re.MULTILINE)


def tellme_responder(body: dict[str, Any]) -> Behaviour:
    """A stand-in for TeLLMe's explainer and simulator models.

    A simulator request (its listing is `number<TAB>text` lines after "What the neuron responds
    to: EXPLANATION") gets `number<TAB>value` lines: 10 where the item's text holds a word of the
    explanation, else 0. An explainer request (`text<TAB>value` lines) gets its n choices (or
    the k of a JSON list): the words of its highest-valued lines, most frequent first, one word
    more per choice; a request about several neurons (`Neuron N: ...` blocks) gets the JSON
    object it asks for, with k explanations per neuron.
    """
    from neuroscribe.words import STOPWORDS, words

    prompt = [m["content"] for m in body["messages"] if m["role"] == "user"][-1]
    if prompt.startswith("What the neuron responds to: "):
        explanation = prompt.split("\n", 1)[0].split(": ", 1)[1]
        wanted = {w for w in words(explanation) if w not in STOPWORDS}
        lines = [
            f"{k}\t{10 if wanted & set(words(text)) else 0}" for k, text in _LISTED.findall(prompt)
        ]
        return Reply("\n".join(lines))
    blocks = _BATCHED.findall(prompt)
    if blocks:  # several neurons: a JSON object with each one's explanations
        k = int(re.search(r"give (\d+) different", prompt).group(1))
        neurons = [
            {"neuron": int(n), "explanations": _explanations(_VALUED.findall(listing), k)}
            for n, listing in blocks
        ]
        return Reply(json.dumps({"neurons": neurons}))
    asked = re.search(r"Give (\d+) different explanations", prompt)
    n = int(asked.group(1)) if asked else int(body.get("n") or 1)
    texts = tuple(_explanations(_VALUED.findall(prompt), n))
    if body.get("response_format"):
        return Reply(json.dumps({"explanations": list(texts)}))
    return Reply(texts[0], texts=texts)


_BATCHED = re.compile(r"^Neuron (\d+): [^\n]*\n((?:[^\n]*\t\d+(?:\n|$))+)", re.MULTILINE)


def _explanations(valued: list[tuple[str, str]], n: int) -> list[str]:
    """n distinct explanations of a listing: the words of its highest-valued lines, most
    frequent first, one word more per explanation."""
    from neuroscribe.words import STOPWORDS, words

    listed = [(text, int(value)) for text, value in valued]
    top = max((v for _, v in listed), default=0)
    counts: dict[str, int] = {}
    for text, value in listed:
        if value >= top - 2:
            for w in words(text):
                if w not in STOPWORDS:
                    counts[w] = counts.get(w, 0) + 1
    ranked = sorted(counts, key=lambda w: (-counts[w], w)) or ["nothing"]
    # n distinct choices, however few words there are
    return [
        " ".join(ranked[: i + 1]) if i < len(ranked) else f"{ranked[0]} ({i + 1})" for i in range(n)
    ]


def any_method(body: dict[str, Any]) -> Behaviour:
    """TeLLMe's requests (listings of `text<TAB>value` lines, or the simulator's) to
    `tellme_responder`, the rest (Describe-and-Dissect's) to `labeller`."""
    prompt = [m["content"] for m in body["messages"] if m["role"] == "user"][-1]
    tellme = prompt.startswith("What the neuron responds to: ") or re.search(
        r"\t\d+$", prompt, re.MULTILINE
    )
    return tellme_responder(body) if tellme else labeller(body)
