"""The chat client: the real `openai` client against a fake local server (retries, cache,
concurrency, strict JSON, key hygiene), and the in-process backend with a tiny random Llama."""

from __future__ import annotations

import logging
import math
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


def test_the_same_request_in_flight_twice_is_paid_once(tmp_path: Path) -> None:
    def slow_echo(body: dict[str, Any]) -> Reply:
        return Reply(f"echo: {body['messages'][-1]['content']}", delay_s=0.3)

    with (
        FakeOpenAI(default=slow_echo) as server,
        DiskCache(tmp_path / "cache.sqlite", "llm") as cache,
    ):
        client, _ = make_client(server, cache, max_concurrency=4)
        replies = client.chat_many([ask("same")] * 4 + [ask("other")])
        assert [r.text for r in replies] == ["echo: same"] * 4 + ["echo: other"]
        assert len(server.requests) == 2  # the three waiting copies were not sent
        assert sum(not r.cached for r in replies) == 2 and client.stats.cache_hits == 3


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


class FixedBackend:
    """A backend with a fixed id (the fake server's port changes), for cache-key checks."""

    id = "openai:http://127.0.0.1:1/v1"

    def complete(self, request: ChatRequest) -> Any:
        raise AssertionError("not called")


def test_default_request_keeps_its_cache_key() -> None:
    from neuroscribe.cache import cache_key

    client = LLMClient(FixedBackend(), None)
    request = ask("what is it?", system="be brief", seed=3)
    # the key as it was before `n` and `logprobs` existed
    before = {
        "backend": FixedBackend.id,
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "what is it?"},
        ],
        "temperature": 0.0,
        "max_tokens": 256,
        "seed": 3,
        "response_format": None,
    }
    assert client.key(request) == cache_key(before)
    others = {client.key(replace(request, n=2)), client.key(replace(request, logprobs=0))}
    assert len(others | {client.key(request)}) == 3
    for bad in ({"n": 0}, {"logprobs": 21}, {"logprobs": True}):
        with pytest.raises(ValueError):
            replace(request, **bad)


def test_several_choices(server: FakeOpenAI, tmp_path: Path) -> None:
    server.add(Reply(None, texts=("a", "b", "c")), Reply("x"), Reply("y"))
    with DiskCache(tmp_path / "cache", "llm") as cache:
        client, _ = make_client(server, cache)
        three = client.chat(ask("name three", temperature=1.0, n=3))
        assert three.texts == ["a", "b", "c"] and three.text == "a"
        assert server.requests[0]["n"] == 3
        # without texts of its own, each choice takes the next scripted reply
        two = client.chat(ask("name two", temperature=1.0, n=2))
        assert two.texts == ["x", "y"]
        assert server.requests[1]["n"] == 2 and len(server.requests) == 2
    with DiskCache(tmp_path / "cache", "llm") as cache:
        client, _ = make_client(server, cache)
        again = client.chat(ask("name three", temperature=1.0, n=3))
    assert again.cached and again.texts == ["a", "b", "c"] and len(server.requests) == 2


def test_token_logprobs_round_trip_the_cache(server: FakeOpenAI, tmp_path: Path) -> None:
    from neuroscribe.backends.llm import ChatReply, TokenLogprob

    server.add(Reply("1\t7", numbers={1: {"7": 0.75, "3": 0.25}}))
    with DiskCache(tmp_path / "cache", "llm") as cache:
        client, _ = make_client(server, cache)
        request = ask("rate", logprobs=3)
        reply = client.chat(request)
        old = ask("an entry written before texts and logprobs existed")
        cache.put(client.key(old), {"text": "old", "prompt_tokens": 1, "completion_tokens": 2})
    body = server.requests[0]
    assert body["logprobs"] is True and body["top_logprobs"] == 3
    assert reply.logprobs is not None and [t.token for t in reply.logprobs] == ["1", "\t", "7"]
    seven = reply.logprobs[2]
    assert seven.logprob == pytest.approx(math.log(0.75))
    assert [t for t, _ in seven.top][:2] == ["7", "3"] and len(seven.top) == 3
    assert reply.texts == ["1\t7"]
    with DiskCache(tmp_path / "cache", "llm") as cache:
        client, _ = make_client(server, cache)
        again = client.chat(request)
        legacy = client.chat(old)
    assert again.cached and again.logprobs == reply.logprobs
    assert all(isinstance(t, TokenLogprob) for t in again.logprobs or [])
    assert legacy == ChatReply("old", 1, 2, True, ["old"], None)
    assert len(server.requests) == 1
    # a request without logprobs gets none, and its cache entry is the old shape
    assert reply.as_json().keys() >= {"logprobs"}
    plain = ChatReply("t", 1, 1, False)
    assert plain.texts == ["t"] and plain.as_json() == {
        "text": "t",
        "prompt_tokens": 1,
        "completion_tokens": 1,
    }


def test_local_value_distributions_match_a_direct_softmax(tmp_path: Path) -> None:
    import numpy as np
    import torch
    from tiny_chat import build_tiny_chat

    from neuroscribe.backends.llm import LocalBackend

    folder = str(build_tiny_chat(tmp_path / "chat"))
    backend = LocalBackend(folder)
    tok = backend.tokenizer
    values = [str(v) for v in range(11)]
    messages = [{"role": "system", "content": "rate"}, {"role": "user", "content": "1\tdog"}]
    reply = "1\t?\n2\t?\n10\t?\n"
    slots = [2, 6, 11]
    assert all(reply[s] == "?" for s in slots)
    got = backend.value_distributions(messages, reply, slots, values)
    assert got.shape == (3, 11)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-9)

    # by hand: the template's tokens (as generation sees them) then the reply's
    prompt_ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    prompt_ids = list(prompt_ids["input_ids"])
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(text + reply, add_special_tokens=False)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids
    value_ids = tok.convert_tokens_to_ids(values)
    assert tok.convert_ids_to_tokens(value_ids) == values  # "10" is one token
    with torch.no_grad():
        logits = backend._model(torch.tensor([ids])).logits[0]
    for row, slot in zip(got, slots, strict=True):
        # the slot's token comes right after the tokens of everything before it
        before = tok(text + reply[:slot], add_special_tokens=False)["input_ids"]
        assert ids[: len(before)] == before
        direct = torch.softmax(logits[len(before) - 1, value_ids].double(), dim=-1).numpy()
        np.testing.assert_allclose(row, direct, rtol=1e-5, atol=1e-7)

    with pytest.raises(ValueError, match="not a single token"):
        backend.value_distributions(messages, reply, slots, ["1", "123456789"])
    with pytest.raises(ValueError, match="does not start a token"):
        backend.value_distributions(messages, "1\t10\n", [3], values)  # inside "10"
    with pytest.raises(ValueError, match="outside the reply"):
        backend.value_distributions(messages, reply, [len(reply)], values)

    request = ChatRequest(folder, tuple(messages), max_tokens=4)
    with pytest.raises(ValueError, match="identical greedy"):
        backend.complete(replace(request, n=2))
    with pytest.raises(ValueError, match="value_distributions"):
        backend.complete(replace(request, logprobs=5))
    sampled = backend.complete(replace(request, n=2, temperature=1.0, seed=1))
    assert len(sampled.texts) == 2 and sampled.text == sampled.texts[0]
    assert 2 <= sampled.completion_tokens <= 8
