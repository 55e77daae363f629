"""The chat client: the real `openai` client against a fake local server (retries, cache,
concurrency, strict JSON, key hygiene), and the in-process backend with a tiny random Llama."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fake_openai import Drop, FakeOpenAI, Garbage, Reply, Status, fake_openai

from neuroscribe.backends.llm import (
    ChatRequest,
    LLMClient,
    LLMError,
    MalformedReply,
    OpenAIBackend,
    parse_json_reply,
    retry_after_s,
)
from neuroscribe.cache import DiskCache

MODEL = "fake-model"


class Sleeps:
    """A fake `sleep` that records the delays instead of waiting."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


@pytest.fixture
def server() -> Iterator[FakeOpenAI]:
    with fake_openai() as fake:
        yield fake


def make_client(
    server: FakeOpenAI, cache: DiskCache | None = None, timeout_s: float = 5, **kwargs: Any
) -> tuple[LLMClient, Sleeps]:
    sleeps = Sleeps()
    backend = OpenAIBackend(server.base_url, MODEL, api_key_env=None, timeout_s=timeout_s)
    return LLMClient(backend, cache, sleep=sleeps, **kwargs), sleeps


def ask(prompt: str = "hi", **kwargs: Any) -> ChatRequest:
    return ChatRequest.of(MODEL, prompt, **kwargs)


def concepts(value: Any) -> list[str]:
    """A validator: {"concepts": [str, ...]}."""
    if not isinstance(value, dict) or not isinstance(value.get("concepts"), list):
        raise ValueError('expected an object {"concepts": [...]}')
    if not all(isinstance(c, str) for c in value["concepts"]):
        raise ValueError("every concept must be a string")
    return value["concepts"]


def test_canned_reply_and_request_parameters(server: FakeOpenAI) -> None:
    server.add(Reply("red circle"), Reply('{"concepts": []}'))
    client, sleeps = make_client(server)
    reply = client.chat(ask("what is it?", system="be brief", temperature=0.5, seed=7))
    assert reply.text == "red circle" and not reply.cached
    assert (reply.prompt_tokens, reply.completion_tokens) == (5, 2)
    body = server.requests[0]
    assert body["model"] == MODEL and body["seed"] == 7 and body["temperature"] == 0.5
    assert body["max_tokens"] == 256 and "response_format" not in body
    assert body["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "what is it?"},
    ]
    assert client.chat_json(ask(response_format="json"), concepts).value == []
    assert server.requests[1]["response_format"] == {"type": "json_object"}
    assert sleeps.delays == []
    assert client.stats.as_dict() == {
        "requests": 2,
        "retries": 0,
        "cache_hits": 0,
        "prompt_tokens": 6,
        "completion_tokens": 4,
        "failures": 0,
    }


@pytest.mark.parametrize("retry_after", ["0", "1"])
def test_rate_limit_honours_retry_after(server: FakeOpenAI, retry_after: str) -> None:
    server.add(Status(429, "slow down", retry_after=retry_after), Reply("ok"))
    client, sleeps = make_client(server)
    assert client.chat(ask()).text == "ok"
    assert sleeps.delays == [float(retry_after)]
    assert client.stats.requests == 2 and client.stats.retries == 1


def test_server_error_then_success_backs_off_with_jitter(server: FakeOpenAI) -> None:
    server.add(Status(500), Status(503), Reply("ok"))
    client, sleeps = make_client(server, base_delay_s=2.0)
    assert client.chat(ask()).text == "ok"
    # exponential: about 2 s then about 4 s, each jittered down to at most half
    assert len(sleeps.delays) == 2
    assert 1.0 <= sleeps.delays[0] <= 2.0 and 2.0 <= sleeps.delays[1] <= 4.0
    assert client.stats.retries == 2 and len(server.requests) == 3


def test_timeout_then_success(server: FakeOpenAI) -> None:
    server.add(Reply("too late", delay_s=3), Reply("ok"))
    client, sleeps = make_client(server, timeout_s=0.5)
    assert client.chat(ask()).text == "ok"
    assert len(sleeps.delays) == 1 and client.stats.retries == 1


@pytest.mark.parametrize("fault", [Drop(), Garbage()], ids=["dropped", "garbage-body"])
def test_dropped_connection_or_garbage_body_then_success(server: FakeOpenAI, fault: Any) -> None:
    server.add(fault, Reply("ok"))
    client, sleeps = make_client(server)
    assert client.chat(ask()).text == "ok"
    assert len(sleeps.delays) == 1 and len(server.requests) == 2


def test_client_error_fails_at_once(server: FakeOpenAI) -> None:
    server.add(Status(400, "unknown parameter 'foo'"))
    client, sleeps = make_client(server)
    with pytest.raises(LLMError) as caught:
        client.chat(ask())
    assert caught.value.status == 400 and caught.value.attempts == 1
    assert "400" in str(caught.value) and "unknown parameter 'foo'" in str(caught.value)
    assert sleeps.delays == [] and len(server.requests) == 1
    assert client.stats.failures == 1 and client.stats.retries == 0


def test_gives_up_after_max_attempts(server: FakeOpenAI) -> None:
    server.add(*[Status(500, "overloaded")] * 3)
    client, sleeps = make_client(server, max_attempts=3)
    with pytest.raises(LLMError, match=r"after 3 attempts.*HTTP 500: .*overloaded") as caught:
        client.chat(ask())
    assert caught.value.attempts == 3 and caught.value.status == 500
    assert len(server.requests) == 3 and len(sleeps.delays) == 2
    stats = client.stats
    assert (stats.requests, stats.retries, stats.failures) == (3, 2, 1)


def test_malformed_json_is_repaired_once(server: FakeOpenAI) -> None:
    server.add(
        Reply("Sure! The concepts are red and round."), Reply('```json\n{"concepts": ["red"]}\n```')
    )
    client, _ = make_client(server)
    request = ask("concepts?", response_format="json")
    assert client.chat_json(request, concepts).value == ["red"]
    assert len(server.requests) == 2
    repair = server.requests[1]["messages"]
    assert repair[:1] == server.requests[0]["messages"]
    assert repair[1] == {"role": "assistant", "content": "Sure! The concepts are red and round."}
    assert repair[2]["role"] == "user" and "not valid JSON" in repair[2]["content"]
    assert "valid JSON only" in repair[2]["content"]


def test_wrong_shape_is_repaired_with_the_validators_message(server: FakeOpenAI) -> None:
    server.add(Reply('{"concepts": [1, 2]}'), Reply('{"concepts": ["a", "b"]}'))
    client, _ = make_client(server)
    assert client.chat_json(ask(), concepts).value == ["a", "b"]
    assert "every concept must be a string" in server.requests[1]["messages"][-1]["content"]


@pytest.mark.parametrize(
    ("first", "second", "problem"),
    [
        ("garbage <<", "still garbage", "not valid JSON"),
        (None, "", "empty"),
        ('{"other": 1}', '["a"]', "expected an object"),
    ],
    ids=["garbage", "empty", "wrong-shape"],
)
def test_malformed_twice_raises_with_raw_replies(
    server: FakeOpenAI, first: str | None, second: str, problem: str
) -> None:
    server.add(Reply(first), Reply(second))
    client, _ = make_client(server)
    with pytest.raises(MalformedReply, match=problem) as caught:
        client.chat_json(ask(), concepts)
    assert caught.value.replies == [first or "", second]
    assert len(caught.value.problems) == 2
    assert len(server.requests) == 2 and client.stats.failures == 1


def test_cache_answers_a_second_client_without_requests(server: FakeOpenAI, tmp_path: Path) -> None:
    requests = [ask(f"prompt {i}") for i in range(3)]
    with DiskCache(tmp_path / "cache.sqlite", "llm") as cache:
        first, _ = make_client(server, cache)
        replies = first.chat_many(requests)
        assert [r.text for r in replies] == [f"echo: prompt {i}" for i in range(3)]
        assert not any(r.cached for r in replies) and len(cache) == 3
    assert len(server.requests) == 3

    with DiskCache(tmp_path / "cache.sqlite", "llm") as cache:
        second, _ = make_client(server, cache)
        again = [second.chat(r) for r in requests]
        # a different parameter is a different request
        other = second.chat(replace(requests[0], temperature=1.0))
    assert [r.text for r in again] == [r.text for r in replies] and all(r.cached for r in again)
    assert [r.prompt_tokens for r in again] == [r.prompt_tokens for r in replies]
    assert not other.cached and len(server.requests) == 4
    assert second.stats.cache_hits == 3 and second.stats.requests == 1


def test_reply_is_cached_before_a_later_failure(server: FakeOpenAI, tmp_path: Path) -> None:
    server.add(Reply("paid for"), Status(400))
    with DiskCache(tmp_path / "cache.sqlite", "llm") as cache:
        client, _ = make_client(server, cache)
        client.chat(ask("one"))
        with pytest.raises(LLMError):
            client.chat(ask("two"))
        assert len(cache) == 1


def test_chat_many_bounds_concurrency_and_keeps_order(tmp_path: Path) -> None:
    def slow_echo(body: dict[str, Any]) -> Reply:
        return Reply(f"echo: {body['messages'][-1]['content']}", delay_s=0.15)

    with (
        FakeOpenAI(default=slow_echo) as server,
        DiskCache(tmp_path / "cache.sqlite", "llm") as cache,
    ):
        client, _ = make_client(server, cache, max_concurrency=2)
        replies = client.chat_many([ask(f"p{i}") for i in range(8)])
        assert [r.text for r in replies] == [f"echo: p{i}" for i in range(8)]
        assert server.max_in_flight == 2 and len(server.requests) == 8
        assert len(cache) == 8  # stored from the worker threads too
        assert client.stats.requests == 8 and client.stats.completion_tokens == 16


def test_api_key_never_leaks(
    server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "sk-test-DO-NOT-LEAK-1234567890"
    monkeypatch.setenv("NEUROSCRIBE_TEST_KEY", secret)
    caplog.set_level(logging.DEBUG)
    server.add(Status(429, retry_after="0"), Reply("ok"), Status(500), Status(401, "bad key"))
    backend = OpenAIBackend(server.base_url, MODEL, api_key_env="NEUROSCRIBE_TEST_KEY")
    client = LLMClient(backend, None, max_attempts=2, sleep=Sleeps())
    assert client.chat(ask()).text == "ok"
    with pytest.raises(LLMError) as caught:
        client.chat(ask("again"))
    assert server.headers[0]["authorization"] == f"Bearer {secret}"  # the key was sent
    assert caught.value.status == 401
    for text in (repr(client), repr(backend), str(caught.value), caplog.text):
        assert secret not in text
    assert "retrying" in caplog.text  # the retries were logged


def test_missing_api_key_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NEUROSCRIBE_MISSING_KEY", raising=False)
    with pytest.raises(LLMError, match="NEUROSCRIBE_MISSING_KEY"):
        OpenAIBackend("http://127.0.0.1:9/v1", MODEL, api_key_env="NEUROSCRIBE_MISSING_KEY")


def test_parse_json_reply_and_retry_after() -> None:
    assert parse_json_reply(' {"a": 1} ') == {"a": 1}
    assert parse_json_reply('Here:\n```json\n{"a": [1]}\n```\nDone.') == {"a": [1]}
    assert parse_json_reply("```\n[1, 2]\n```") == [1, 2]
    for bad, message in [("", "empty"), ("  \n", "empty"), ('{"a": 1} extra', "not valid JSON")]:
        with pytest.raises(ValueError, match=message):
            parse_json_reply(bad)
    assert retry_after_s({"retry-after": "2"}) == 2.0
    assert retry_after_s({"retry-after-ms": "250"}) == 0.25
    assert retry_after_s({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0  # in the past
    assert retry_after_s({}) is None and retry_after_s({"retry-after": "soon"}) is None


def test_request_validation() -> None:
    with pytest.raises(ValueError, match="role"):
        ChatRequest(MODEL, ({"role": "robot", "content": "x"},))
    with pytest.raises(ValueError, match="response_format"):
        ask(response_format="yaml")
    messages = [{"role": "user", "content": "x"}]
    request = ChatRequest(MODEL, tuple(messages))
    messages[0]["content"] = "changed"
    assert request.messages[0]["content"] == "x"


def test_local_backend_tiny_chat(tmp_path: Path) -> None:
    from tiny_chat import build_tiny_chat

    from neuroscribe.backends.llm import LocalBackend

    folder = str(build_tiny_chat(tmp_path / "chat"))
    backend = LocalBackend(folder)
    with DiskCache(tmp_path / "cache.sqlite", "llm") as cache:
        client = LLMClient(backend, cache)
        request = ChatRequest.of(folder, "a red circle", system="be brief", max_tokens=8)
        first = backend.complete(request)
        assert isinstance(first.text, str)
        assert first.prompt_tokens > 5 and 1 <= first.completion_tokens <= 8
        assert backend.complete(request) == first  # greedy at temperature 0
        sampled = replace(request, temperature=1.0, seed=3)
        assert backend.complete(sampled) == backend.complete(sampled)  # seeded sampling
        assert client.chat(request).text == first.text
        assert client.chat(request).cached and client.stats.requests == 1
        with pytest.raises(ValueError, match="sent to"):
            backend.complete(replace(request, model="other"))
