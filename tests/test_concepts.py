"""Concept proposal: the batched and reference prompt modes through the real `openai` client and
a local OpenAI-compatible server, the frequency backend, the local backend with a tiny chat
model, and the concepts stage with its cache (a rerun makes no request)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from fake_openai import FakeOpenAI, Reply, Status, fake_openai, labeller

from neuroscribe.backends.llm import LLMClient, LLMError, OpenAIBackend
from neuroscribe.cache import DiskCache
from neuroscribe.failures import TooManyFailed
from neuroscribe.methods.dnd import PROPOSAL_KEYS
from neuroscribe.methods.dnd import stages as dnd
from neuroscribe.methods.dnd.concepts import (
    BatchedProposer,
    ConceptSettings,
    FrequencyProposer,
    ReferenceProposer,
    check_concept,
    normalise,
    unique,
)

MODEL = "fake-model"
NEURONS = [
    (3, ["a red circle on a white background", "a red circle with stripes", "a small red circle"]),
    (7, ["a blue square", "a blue square on a gradient", "two blue squares"]),
    (9, ["a green triangle", "a green triangle with dots", "a large green triangle"]),
]


def client_for(server: FakeOpenAI, cache: DiskCache | None, **kwargs: Any) -> LLMClient:
    backend = OpenAIBackend(server.base_url, MODEL, api_key_env=None, timeout_s=5)
    return LLMClient(backend, cache, sleep=lambda _s: None, **kwargs)


def test_normalise_and_unique() -> None:
    assert normalise('  1. "Red Circles."  ') == "red circles"
    assert normalise("- striped   TEXTURE") == "striped texture"
    assert unique(["Red circle", "red circle.", "", "blue"]) == ["red circle", "blue"]
    assert check_concept("A Red Circle") == "a red circle"
    with pytest.raises(ValueError, match="has 6 words"):
        check_concept("one two three four five six")
    with pytest.raises(ValueError, match="not a string"):
        check_concept(3)


def test_batched_one_request_per_neuron_then_cache(tmp_path: Path) -> None:
    settings = ConceptSettings(model=MODEL, n=5)
    with fake_openai(default=labeller) as server, DiskCache(tmp_path / "c.sqlite", "llm") as cache:
        records = BatchedProposer(client_for(server, cache), settings).propose(NEURONS)
        assert len(server.requests) == 3  # one request per neuron
        body = server.requests[0]
        assert body["response_format"] == {"type": "json_object"} and body["seed"] == 0
        by_neuron = {r.neuron: r for r in records}
        assert [r.neuron for r in records] == [3, 7, 9]
        assert by_neuron[3].candidates[0] == "red circle"
        assert len(by_neuron[3].candidates) == 5
        assert all(r.status == "ok" and r.llm_requests == 1 for r in records)
        assert all(r.prompt_tokens > 0 and r.completion_tokens > 0 for r in records)
        again = BatchedProposer(client_for(server, cache), settings).propose(NEURONS)
        assert len(server.requests) == 3  # all from the cache
        assert [r.candidates for r in again] == [r.candidates for r in records]
        assert all(r.llm_requests == 0 and r.llm_cache_hits == 1 for r in again)


def test_batched_several_neurons_per_request(tmp_path: Path) -> None:
    settings = ConceptSettings(model=MODEL, n=3, neurons_per_request=2)
    with fake_openai(default=labeller) as server:
        records = BatchedProposer(client_for(server, None), settings).propose(NEURONS)
    assert len(server.requests) == 2  # neurons (3, 7) then (9)
    assert [r.llm_requests for r in records] == [1, 0, 1]  # a group is counted once
    assert {r.neuron: r.candidates[0] for r in records}[7] == "blue"
    assert all(len(r.candidates) == 3 for r in records)


def test_batched_repair_then_recorded_failure(tmp_path: Path) -> None:
    good = json.dumps({"neurons": [{"neuron": 3, "concepts": ["red", "round", "circle"]}]})
    settings = ConceptSettings(model=MODEL, n=3)
    script = [Reply("no json here"), Reply(good), Reply("still not json"), Reply("{}")]
    with fake_openai(*script) as server:
        proposer = BatchedProposer(client_for(server, None), settings)
        (repaired,) = proposer.propose(NEURONS[:1])
        assert repaired.status == "ok" and repaired.candidates == ["red", "round", "circle"]
        assert repaired.raw_replies == ["no json here", good] and repaired.llm_requests == 2
        (failed,) = proposer.propose(NEURONS[:1])
    assert failed.status == "failed" and failed.candidates == []
    assert failed.raw_replies == ["still not json", "{}"]
    assert "malformed reply after one repair" in failed.error
    assert "Your reply could not be used" in server.requests[-1]["messages"][-1]["content"]


def test_batched_rejects_wrong_shapes() -> None:
    proposer = BatchedProposer(None, ConceptSettings(model=MODEL, n=2))  # type: ignore[arg-type]
    validate = proposer.validator([3, 7])
    ok = {"neurons": [{"neuron": 3, "concepts": ["a", "b"]}, {"neuron": 7, "concepts": ["c", "C"]}]}
    assert validate(ok) == {3: ["a", "b"], 7: ["c"]}  # lower-cased, de-duplicated
    with pytest.raises(ValueError, match=r"no concepts for neuron\(s\) \[7\]"):
        validate({"neurons": [{"neuron": 3, "concepts": ["a", "b"]}]})
    with pytest.raises(ValueError, match="unexpected or repeated neuron 5"):
        validate({"neurons": [{"neuron": 5, "concepts": ["a", "b"]}]})
    with pytest.raises(ValueError, match="1 concepts, expected 2"):
        validate({"neurons": [{"neuron": 3, "concepts": ["a"]}]})


def test_reference_mode_makes_the_papers_calls(tmp_path: Path) -> None:
    settings = ConceptSettings(model=MODEL, n=5)
    with fake_openai(default=labeller) as server, DiskCache(tmp_path / "c.sqlite", "llm") as cache:
        records = ReferenceProposer(client_for(server, cache), settings).propose(NEURONS[:2])
        # per neuron: 3 caption simplifications + 5 summaries
        assert len(server.requests) == 2 * (3 + 5)
        assert all(r.llm_requests == 8 for r in records)
        assert records[0].candidates == ["red circle"]  # the 5 summaries agree, de-duplicated
        assert len(records[0].raw_replies) == 5
        ReferenceProposer(client_for(server, cache), settings).propose(NEURONS[:2])
        assert len(server.requests) == 16  # nothing new


def test_reference_mode_refeeds_a_list_reply() -> None:
    settings = ConceptSettings(model=MODEL, n=1)
    script = [Reply("red"), Reply("red"), Reply("red"), Reply("Label: red things, circles")]
    with fake_openai(*script, default=lambda _b: Reply("red circles")) as server:
        (record,) = ReferenceProposer(client_for(server, None), settings).propose(NEURONS[:1])
    assert len(server.requests) == 5  # 3 simplifications, 1 summary, 1 re-summary of the list
    # the re-ask is sent alone, with the list as the authors' code rebuilds it: split at commas
    # (the spaces after them kept) and joined with ", " again
    (reask,) = server.requests[-1]["messages"]
    assert reask["content"].endswith(":  red things,  circles")
    assert record.candidates == ["red circles"]


def test_given_up_request_fails_the_job_after_the_rest(tmp_path: Path) -> None:
    settings = ConceptSettings(model=MODEL, n=2)
    with (
        fake_openai(Status(400, "bad request"), default=labeller) as server,
        DiskCache(tmp_path / "c.sqlite", "llm") as cache,
    ):
        proposer = BatchedProposer(client_for(server, cache, max_concurrency=1), settings)
        with pytest.raises(LLMError, match="1 of 3 concept requests failed"):
            proposer.propose(NEURONS)
        assert len(server.requests) == 3
        records = proposer.propose(NEURONS)  # the retried job pays only for the failure
    assert len(server.requests) == 4 and len(records) == 3


def test_frequency_backend() -> None:
    records = FrequencyProposer(n=2).propose([*NEURONS, (11, ["a", "the"])])
    assert records[0].candidates == ["red circle", "circle"]
    assert records[0].llm_requests == 0
    assert records[-1].status == "failed" and "no content words" in records[-1].error


def test_local_backend_with_a_tiny_chat_model(tmp_path: Path) -> None:
    from tiny_chat import build_tiny_chat

    from neuroscribe.backends.llm import LocalBackend

    folder = str(build_tiny_chat(tmp_path / "chat"))
    client = LLMClient(LocalBackend(folder), None)
    settings = ConceptSettings(model=folder, n=2, max_tokens=16, temperature=0.0)
    (record,) = BatchedProposer(client, settings).propose(NEURONS[:1])
    # a random model cannot write the JSON: recorded as a failure with its two raw replies
    assert record.status == "failed" and len(record.raw_replies) == 2
    assert record.llm_requests == 2 and record.prompt_tokens > 0


def captions_table(path: Path) -> Path:
    rows = [
        {
            "model": "m",
            "layer": "conv3",
            "neuron": neuron,
            "rank": rank,
            "image_id": f"img{neuron}-{rank}",
            "box": None,
            "caption": caption,
            "captioner": "annotations",
        }
        for neuron, captions in NEURONS
        for rank, caption in enumerate(captions)
    ]
    pd.DataFrame(rows).to_parquet(path)
    return path


def llm_config(**overrides: Any) -> dict[str, Any]:
    cfg = {
        "backend": "openai",
        "model": MODEL,
        "base_url": None,
        "api_key_env": "NEUROSCRIBE_TEST_KEY",
        "prompt_mode": "batched",
        "neurons_per_request": 1,
        "candidates": 5,
        "temperature": 0.3,
        "max_tokens": 256,
        "prompts": None,
        "max_words": 5,
        "background_variants": False,
        "seed": 0,
        "max_concurrency": 4,
        "max_attempts": 3,
        "timeout_s": 5,
    }
    return cfg | overrides


def proposal_of(cfg: dict[str, Any]) -> dict[str, Any]:
    """The `dnd:` settings of a concept job, taken from a test's flat llm settings."""
    return {k: cfg[k] for k in PROPOSAL_KEYS}


def test_concept_stage_writes_the_table_and_reruns_for_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NEUROSCRIBE_TEST_KEY", "sk-test-secret-123")
    captions = captions_table(tmp_path / "captions.parquet")
    out = tmp_path / "concepts.parquet"
    caplog.set_level(logging.INFO)
    with fake_openai(default=labeller) as server:
        cfg = llm_config(base_url=server.base_url)
        dnd.concept_chunk(
            captions, out, cfg, proposal_of(cfg), tmp_path / "llm.sqlite", device="cpu"
        )
        first = pd.read_parquet(out)
        assert len(server.requests) == 3
        assert server.headers[0]["authorization"] == "Bearer sk-test-secret-123"
        out.unlink()
        dnd.concept_chunk(
            captions, out, cfg, proposal_of(cfg), tmp_path / "llm.sqlite", device="cpu"
        )
        assert len(server.requests) == 3  # the rerun is answered by the cache
    second = pd.read_parquet(out)
    assert list(first["neuron"]) == [3, 7, 9]
    assert list(first["status"]) == ["ok"] * 3
    assert first["candidates"].iloc[0][0] == "red circle"
    assert list(first["captions"].iloc[1]) == NEURONS[1][1]
    assert first["proposer"].iloc[0] == f"batched:openai:{server.base_url}:{MODEL}"
    assert first["llm_requests"].sum() == 3 and second["llm_requests"].sum() == 0
    assert second["llm_cache_hits"].sum() == 3
    assert [list(c) for c in second["candidates"]] == [list(c) for c in first["candidates"]]
    assert "sk-test-secret-123" not in caplog.text


def test_concept_stage_with_the_frequency_backend(tmp_path: Path) -> None:
    captions = captions_table(tmp_path / "captions.parquet")
    out = tmp_path / "concepts.parquet"
    dnd.concept_chunk(
        captions,
        out,
        llm_config(backend="none"),
        proposal_of(llm_config()),
        tmp_path / "llm.sqlite",
    )
    table = pd.read_parquet(out)
    assert table["candidates"].iloc[2][0] == "green triangle"
    assert table["proposer"].iloc[0] == "none:frequency-5"
    assert table["llm_requests"].sum() == 0


def test_batched_prompt_keeps_captions_verbatim() -> None:
    proposer = BatchedProposer(None, ConceptSettings(model=MODEL, n=2))  # type: ignore[arg-type]
    request = proposer.request([(4, ["a man's hat", 'a "quoted" sign'])])
    prompt = request.messages[-1]["content"]
    assert '1. a man\'s hat\n2. a "quoted" sign' in prompt
    assert '{"neurons": [{"neuron": 4, "concepts": ["...", "..."]}]}' in prompt


def off_schema(body: dict[str, Any]) -> Reply:
    """Valid JSON that does not follow the asked shape (and its repair the same)."""
    return Reply(json.dumps({"labels": ["red circle"]}))


def test_unusable_replies_fail_the_chunk_and_are_asked_again_after_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NEUROSCRIBE_TEST_KEY", "sk-test-secret-123")
    captions = captions_table(tmp_path / "captions.parquet")
    out = tmp_path / "concepts.parquet"
    cache = tmp_path / "cache"
    with fake_openai(default=off_schema) as server:
        cfg = llm_config(base_url=server.base_url)
        with pytest.raises(TooManyFailed) as failed:
            dnd.concept_chunk(captions, out, cfg, proposal_of(cfg), cache, max_failed_fraction=0.2)
        assert len(server.requests) == 6  # each neuron: its request and one repair
        message = str(failed.value)
        assert "3 of 3 neurons failed, more than max_failed_fraction (0.2) allows" in message
        assert "expected an object" in message
        assert not out.exists(), "a failed chunk wrote its output"
        # the server is fixed: the unusable replies are not served from the cache again
        server.default = labeller
        dnd.concept_chunk(captions, out, cfg, proposal_of(cfg), cache, max_failed_fraction=0.2)
        assert len(server.requests) == 6 + 3
        table = pd.read_parquet(out)
        assert list(table["status"]) == ["ok"] * 3 and table["llm_requests"].sum() == 3
        # a third run pays for nothing, whatever the server would say now
        server.default = off_schema
        out.unlink()
        dnd.concept_chunk(captions, out, cfg, proposal_of(cfg), cache)
        assert len(server.requests) == 9
    # the unusable replies stay in the cache, for audit, with the reason they were rejected
    with DiskCache(cache, "llm") as store:
        entries = [json.loads(line) for f in store.folder.glob("*.jsonl") for line in f.open()]
    rejected = [e["v"] for e in entries if e["k"].startswith("rejected:")]
    assert len(rejected) == 6 and all("expected an object" in r["reason"] for r in rejected)
    assert sum('"labels"' in str(e["v"].get("text")) for e in entries) == 6


def test_a_few_failed_neurons_are_listed_with_their_error(tmp_path: Path) -> None:
    captions = captions_table(tmp_path / "captions.parquet")
    out = tmp_path / "concepts.parquet"

    def one_neuron_broken(body: dict[str, Any]) -> Reply:
        prompt = body["messages"][-1]["content"]
        return off_schema(body) if "Neuron 7," in prompt or "expected" in prompt else labeller(body)

    with fake_openai(default=one_neuron_broken) as server:
        cfg = llm_config(base_url=server.base_url, api_key_env=None)
        dnd.concept_chunk(
            captions, out, cfg, proposal_of(cfg), tmp_path / "cache", max_failed_fraction=0.5
        )
    table = pd.read_parquet(out).set_index("neuron")
    assert list(table["status"]) == ["ok", "failed", "ok"]
    assert "malformed reply after one repair" in table.loc[7, "error"]
    assert list(table.loc[7, "candidates"]) == [] and len(table.loc[7, "raw_replies"]) == 2


def test_a_key_the_server_echoes_back_is_redacted_everywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "sk-test-echoed-0123456789"
    monkeypatch.setenv("NEUROSCRIBE_TEST_KEY", secret)
    captions = captions_table(tmp_path / "captions.parquet")
    caplog.set_level(logging.INFO)

    def echo_headers(body: dict[str, Any]) -> Reply:
        return Reply(json.dumps({"neurons": [], "debug": "Authorization: Bearer " + secret}))

    out = tmp_path / "c.parquet"
    with fake_openai(Status(500, echo_headers=True), default=echo_headers) as server:
        cfg = llm_config(base_url=server.base_url)
        dnd.concept_chunk(
            captions, out, cfg, proposal_of(cfg), tmp_path / "cache", max_failed_fraction=1.0
        )
    assert secret in server.headers[0]["authorization"]  # it was sent, and echoed
    assert secret not in caplog.text and "Bearer [redacted]" in caplog.text  # the retry warning
    table = pd.read_parquet(out)
    stored = json.dumps([list(r) for r in table["raw_replies"]]) + str(list(table["error"]))
    assert secret not in stored and "Bearer [redacted]" in stored


def test_a_failing_job_prints_no_key_in_its_traceback(tmp_path: Path, job_env: dict) -> None:
    import subprocess
    import sys

    secret = "sk-test-traceback-0123456789"
    captions = captions_table(tmp_path / "captions.parquet")
    with fake_openai(default=lambda body: Status(401, "bad key", echo_headers=True)) as server:
        args = {
            "captions": str(captions),
            "out": str(tmp_path / "c.parquet"),
            "llm": llm_config(base_url=server.base_url),
            "proposal": proposal_of(llm_config()),
            "cache": str(tmp_path / "cache"),
            "device": "cpu",
            "dtype": "auto",
            "max_failed_fraction": 0.2,
        }
        job = subprocess.run(
            [sys.executable, "-m", "neuroscribe", "concepts", json.dumps(args)],
            env=job_env | {"NEUROSCRIBE_TEST_KEY": secret},
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert job.returncode == 1
    assert "Traceback" in job.stderr and "HTTP 401" in job.stderr  # the error is there...
    assert secret not in job.stderr + job.stdout  # ...without the key the server echoed
    assert "Bearer [redacted]" in job.stderr
