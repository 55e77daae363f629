"""Simulators beyond CLIP: the LLM simulator (explain-simulate-score) through the real `openai`
client against the fake server and with a tiny in-process chat model, its prompt file, and the
demo world's simulator over class names."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fake_openai import FakeOpenAI, Reply, fake_openai

from neuroscribe.backends import simulators
from neuroscribe.backends.llm import LLMClient, OpenAIBackend
from neuroscribe.backends.simulators import (
    LlmSimulator,
    ProbeImage,
    PromptFileError,
    Simulation,
    SimulatorPrompts,
    parse_values,
)
from neuroscribe.cache import DiskCache

MODEL = "fake-model"
CAPTIONS = ["a red circle on grass", "a dog on a sofa", "blue stripes\non a wall"]


@pytest.fixture
def server() -> Iterator[FakeOpenAI]:
    with fake_openai() as fake:
        yield fake


def images(captions: list[str | None] = CAPTIONS) -> list[ProbeImage]:  # type: ignore[assignment]
    return [ProbeImage(f"img{i}", f"/x/{i}.png", c) for i, c in enumerate(captions)]


def make_simulator(
    server: FakeOpenAI, cache: DiskCache | None = None, **kwargs: Any
) -> LlmSimulator:
    backend = OpenAIBackend(server.base_url, MODEL, api_key_env=None, timeout_s=5)
    return LlmSimulator(LLMClient(backend, cache, sleep=lambda s: None), MODEL, **kwargs)


def listing_answer(body: dict[str, Any]) -> Reply:
    """A stand-in simulator model: for item k of the listing, the value (3k) mod 11."""
    prompt = body["messages"][-1]["content"]
    items = [int(k) for k in re.findall(r"^(\d+)\t", prompt, re.MULTILINE)]
    return Reply("".join(f"{k}\t{3 * k % 11}\n" for k in items))


def test_expected_value_from_scripted_top_logprobs(server: FakeOpenAI) -> None:
    # numeric tokens of the reply, counted from 0: "1", "7", "2", "3", "3", "10"
    first = {"7": 0.5, "3": 0.2, "10": 0.1, "100": 0.1, "seven": 0.05}
    second = {"3": 0.5, "4": 0.5}
    server.add(Reply("1\t7\n2\t3\n3\t10\n", numbers={1: first, 3: second}))
    result = make_simulator(server).predict(["red circle"], images())
    # renormalised over the alternatives that are numbers 0-10 ("100" and "seven" are not)
    expect_first = (7 * 0.5 + 3 * 0.2 + 10 * 0.1) / (0.5 + 0.2 + 0.1)
    assert result.predictions[0, 0] == pytest.approx(expect_first, rel=1e-6)
    assert result.predictions[0, 1] == pytest.approx(3.5, rel=1e-6)
    # default alternatives: the written "10" is certain, neighbours ~e^-12
    assert result.predictions[0, 2] == pytest.approx(10.0, abs=1e-3)
    assert result.readings == ["expected-value"] and result.reasons == [None]
    assert result.missing == [0] and result.extra == [0]
    assert result.replies == ["1\t7\n2\t3\n3\t10\n"]
    body = server.requests[0]
    assert body["logprobs"] is True and body["top_logprobs"] == 20
    assert body["temperature"] == 0.0 and "n" not in body
    assert body["max_tokens"] == 6 * 3 + simulators.REPLY_SLACK_TOKENS
    system, user = body["messages"]
    assert system["role"] == "system" and "vision model" in system["content"]
    assert "red circle" in user["content"]
    # numbered from 1, tab-separated, a caption's own line break flattened
    assert (
        "1\ta red circle on grass\n2\ta dog on a sofa\n3\tblue stripes on a wall"
        in (user["content"])
    )


def test_parsing_fallback_counts_missing_and_extra(server: FakeOpenAI) -> None:
    text = "Here are the values:\n1\t4\n3\t9\n7\t5\n3\t2\n2\t12\n"
    server.add(Reply(text))
    result = make_simulator(server, logprobs=False).predict(["dogs"], images())
    values = result.predictions[0]
    assert values[0] == 4 and values[2] == 9 and math.isnan(values[1])  # never guessed
    # item 7 was not asked, item 3 repeated (the first line counts), 12 is off the scale
    assert result.missing == [1] and result.extra == [3]
    assert result.readings == ["parsed"] and result.replies == [text]
    assert "logprobs" not in server.requests[0]


def test_parse_values_lines() -> None:
    found, dropped = parse_values("1\t3\n2: 10\r\n 3 ) 0\n4\tseven\nprose 5\n5\t-1\n", 5)
    assert {k: v[0] for k, v in found.items()} == {0: 3, 1: 10, 2: 0}
    assert dropped == 2  # "seven" and -1; the prose line is no reply line at all
    text = "1\t3\n"
    assert text[found[0][1] : found[0][2]] == "3"


def test_one_request_per_label_and_a_rerun_costs_nothing(tmp_path: Path) -> None:
    labels = ["red circle", "", "stripes", None]
    with FakeOpenAI(default=listing_answer) as server:
        with DiskCache(tmp_path / "cache", "llm") as cache:
            first = make_simulator(server, cache).predict(labels, images())  # type: ignore[arg-type]
            classes = make_simulator(server, cache).predict_classes(["dog"], ["cat", "dog"])
        assert len(server.requests) == 3  # two usable labels, then one over the classes
        with DiskCache(tmp_path / "cache", "llm") as cache:
            again = make_simulator(server, cache)
            second = again.predict(labels, images())  # type: ignore[arg-type]
            assert again.client.stats.requests == 0 and again.client.stats.cache_hits == 2
        assert len(server.requests) == 3
    assert first.reasons == [None, "empty label", None, "no label"]
    assert first.readings == ["expected-value", None, "expected-value", None]
    np.testing.assert_allclose(first.predictions[[0, 2]], [[3, 6, 9]] * 2, atol=1e-3)
    assert np.isnan(first.predictions[[1, 3]]).all()
    np.testing.assert_array_equal(second.predictions, first.predictions)
    assert second.readings == first.readings and second.replies == first.replies
    # class names are listed with the classes' texts
    np.testing.assert_allclose(classes.predictions, [[3, 6]], atol=1e-3)
    user = server.requests[2]["messages"][-1]["content"]
    assert "1\tcat\n2\tdog" in user and "class" in server.requests[2]["messages"][0]["content"]


def test_images_need_captions_and_no_items_ask_nothing(server: FakeOpenAI) -> None:
    sim = make_simulator(server)
    with pytest.raises(ValueError, match=r"no caption.*img1"):
        sim.predict(["red"], images(["a", None]))
    empty = sim.predict(["red"], [])
    assert empty.predictions.shape == (1, 0) and server.requests == []


def test_simulation_defaults_keep_old_callers() -> None:
    sim = Simulation(np.zeros((2, 3)), [None, "empty label"])
    assert sim.missing == [0, 0] and sim.extra == [0, 0]
    assert sim.replies == [None, None] and sim.readings == [None, None]
    with pytest.raises(ValueError, match="rows"):
        Simulation(np.zeros((1, 3)), [None, None])
    assert ProbeImage("a", "p").caption is None


def test_prompt_file(tmp_path: Path) -> None:
    prompts = SimulatorPrompts.load()
    assert set(prompts.system) == set(prompts.user) == {"images", "classes"}
    assert prompts.source == "neuroscribe" and len(prompts.digest) == 12
    # an explanation holding a placeholder is put in as written
    user = prompts.messages("classes", "{items} lover", ["cat"])[1]["content"]
    assert "{items} lover" in user and "1\tcat" in user
    bad = tmp_path / "bad.yaml"
    bad.write_text("images: {system: s, user: 'no placeholders'}\nclasses: {system: s, user: u}\n")
    with pytest.raises(PromptFileError, match=r"images.user. must hold \{explanation\}"):
        SimulatorPrompts.load(bad)
    bad.write_text("images: {system: s, user: u}\nother: 1\n")
    with pytest.raises(PromptFileError, match="unknown key 'other'"):
        SimulatorPrompts.load(bad)
    with pytest.raises(PromptFileError, match="cannot be read"):
        SimulatorPrompts.load(tmp_path / "missing.yaml")
    custom = tmp_path / "custom.yaml"
    custom.write_text(
        "images: {system: s, user: '{explanation}: {items}'}\n"
        "classes: {system: s, user: '{explanation}: {items}'}\n"
    )
    assert SimulatorPrompts.load(custom).digest != prompts.digest


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tiny_chat import build_tiny_chat

    return str(build_tiny_chat(tmp_path_factory.mktemp("chat")))


def test_local_model_reads_values_exactly_and_caches(tiny_chat: str, tmp_path: Path) -> None:
    from neuroscribe.backends.llm import LocalBackend

    backend = LocalBackend(tiny_chat)
    with DiskCache(tmp_path / "cache", "llm") as cache:
        client = LLMClient(backend, cache)
        sim = LlmSimulator(client, tiny_chat)
        result = sim.predict_classes(["red circle", " "], ["circle", "square", "dog"])
        assert result.readings == ["exact", None] and result.reasons == [None, "empty label"]
        assert result.missing == [0, 0] and result.extra == [0, 0]
        values = result.predictions[0]
        assert np.all((values >= 0) & (values <= 10))
        # the expected value of the model's own distribution at each value's slot
        request = sim.request("classes", "red circle", ["circle", "square", "dog"])
        reply = "1\t?\n2\t?\n3\t?\n"
        dist = backend.value_distributions(request.messages, reply, [2, 6, 10], simulators.VALUES)
        np.testing.assert_allclose(values, dist @ np.arange(11), rtol=1e-5)
        assert client.stats.requests == 1
        again = sim.predict_classes(["red circle"], ["circle", "square", "dog"])
        assert client.stats.requests == 1 and client.stats.cache_hits == 1
        np.testing.assert_array_equal(again.predictions[0], values)


def test_local_model_falls_back_to_parsing(tiny_chat: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from neuroscribe.backends.llm import LocalBackend

    # a scale with a value of several tokens cannot be read in one pass: the reply is generated
    monkeypatch.setattr(simulators, "VALUES", (*simulators.VALUES, "1234567"))
    client = LLMClient(LocalBackend(tiny_chat), None)
    sim = LlmSimulator(client, tiny_chat, max_tokens_per_item=2)
    result = sim.predict(["red"], images())
    assert result.readings == ["parsed"] and isinstance(result.replies[0], str)
    assert sim._exact_failed is not None and "not a single token" in sim._exact_failed
    # whatever the random model wrote, an item without a usable line is NaN, and counted
    assert result.missing[0] == int(np.isnan(result.predictions[0]).sum())
    assert client.stats.requests == 2  # the failed pass, then one generation


def test_clip_simulator_over_class_names(tmp_path: Path) -> None:
    from tiny_diffusion import build_tiny_clip

    from neuroscribe.backends.simulators import ClipSimulator

    sim = ClipSimulator(str(build_tiny_clip(tmp_path / "clip")), device="cpu", dtype="float32")
    result = sim.predict_classes(["a photo of a dog", "", "stripes"], ["dog", "cat"])
    assert result.predictions.shape == (3, 2) and result.reasons == [None, "empty label", None]
    assert np.isnan(result.predictions[1]).all()
    # the label written as the class prompt is the class prompt itself: cosine 1
    assert result.predictions[0, 0] == pytest.approx(1.0, abs=1e-5)
    expect = sim.text_cosine(["stripes", "stripes"], ["a photo of a dog", "a photo of a cat"])
    np.testing.assert_allclose(result.predictions[2], expect, rtol=1e-5)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from neuroscribe.demo.world import render_world

    root = tmp_path_factory.mktemp("world")
    render_world(root, n_images=4, size=32, seed=1)
    return root


def test_annotation_simulator_over_class_names(world: Path) -> None:
    from neuroscribe.demo.annotations import AnnotationSimulator

    sim = AnnotationSimulator([("w", str(world))])
    classes = ["circle", "square", "stars"]
    result = sim.predict_classes(["red circles", "star", "red", "", "zebra"], classes)
    np.testing.assert_array_equal(result.predictions[:2], [[1, 0, 0], [0, 0, 1]])
    assert np.isnan(result.predictions[2:]).all()
    assert result.reasons == [
        None,
        None,
        "the label names no shape; classes are shapes",
        "empty label",
        "no word of the demo world's vocabulary in 'zebra'",
    ]
    with pytest.raises(ValueError, match="class name 'dog' names no shape"):
        sim.predict_classes(["circle"], ["circle", "dog"])
