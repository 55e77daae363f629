"""TeLLMe's parts: which images and classes, prompts, explainers, scores, and its stages."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from neuroscribe.methods.tellme import prompts
from neuroscribe.methods.tellme.explainer import (
    FrequencyExplainer,
    Item,
    clean_explanation,
    distinct,
)
from neuroscribe.methods.tellme.scoring import choose, correlation
from neuroscribe.methods.tellme.sets import (
    SetSizes,
    class_sets,
    neuron_sets,
    quantise,
    scale_weights,
    validation_parts,
)


def _layer(n_images: int = 200, n_neurons: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    activations = rng.random((n_images, n_neurons)).astype(np.float32)
    ids = [f"img{i:04d}" for i in range(n_images)]
    heldout = np.zeros(n_images, dtype=bool)
    heldout[::5] = True
    return activations, heldout, ids


def test_sets_keep_held_out_images_for_scoring_only():
    activations, heldout, ids = _layer()
    sizes = SetSizes(explain_top=10, explain_random=5, score_items=20, score_top_fraction=0.5)
    table = neuron_sets(activations, heldout, ids, [4, 7, 9], sizes)
    held = {ids[i] for i in np.flatnonzero(heldout)}
    for n, column in zip([4, 7, 9], range(3), strict=True):
        rows = table[table["neuron"] == n]
        explain = rows[rows["part"] == "explain"]
        scored = rows[rows["part"] != "explain"]
        assert not set(explain["image_id"]) & held
        assert set(scored["image_id"]) <= held
        # the top explain images are the neuron's 10 best of the explain split
        seen = np.flatnonzero(~heldout)
        best = seen[np.argsort(-activations[seen, column])[:10]]
        assert set(explain[explain["source"] == "top"]["image_id"]) == {ids[i] for i in best}
        assert len(scored) == 20 and (scored["source"] == "top").sum() == 10
        # validation and test alternate over the ranks: both get top and random images
        assert (scored["part"] == "validation").sum() == 10
        assert set(scored[scored["source"] == "top"]["part"]) == {"validation", "test"}
        # quantised over the explain split's range, as the reference scales
        low, high = activations[seen, column].min(), activations[seen, column].max()
        expected = np.clip(np.round((explain["activation"] - low) / (high - low) * 10), 0, 10)
        assert (explain["quantised"].to_numpy() == expected.to_numpy()).all()
    # the random images are the same for every neuron (captioned once)
    randoms = [
        set(
            table[
                (table["neuron"] == n)
                & (table["source"] == "random")
                & (table["part"] == "explain")
            ]["image_id"]
        )
        for n in (4, 7, 9)
    ]
    assert all(len(r) <= 5 for r in randoms)
    assert randoms[0] | randoms[1] | randoms[2] <= set(ids)


def test_random_only_scoring_sample():
    activations, heldout, ids = _layer()
    table = neuron_sets(
        activations, heldout, ids, [0], SetSizes(score_items=16, score_top_fraction=0.0)
    )
    scored = table[table["part"] != "explain"]
    assert len(scored) == 16 and set(scored["source"]) == {"random"}


def test_quantise_and_validation_parts():
    assert quantise(np.array([0.0, 0.5, 1.0, 2.0]), 0.0, 1.0).tolist() == [0, 5, 10, 10]
    assert quantise(np.array([3.0, 3.0]), 3.0, 3.0).tolist() == [0, 0]
    assert validation_parts(6, 0.5).tolist() == [True, False] * 3
    assert validation_parts(5, 0.4).sum() == 2


def test_class_weights_scaled_as_the_reference_and_scored_on_classes_not_shown():
    weights = np.array([-2.0, 0.0, 1.0, 4.0, 2.5])
    assert scale_weights(weights).tolist() == [0, 0, 2, 10, 6]
    rng = np.random.default_rng(1)
    classes = [f"class {i}" for i in range(200)]
    values = rng.normal(size=200)
    frame = class_sets(values, classes, 25, 40, 0.5, 0.5)
    explain = frame[frame["part"] == "explain"]
    scored = frame[frame["part"] != "explain"]
    assert len(explain) == 25 and len(scored) == 40
    assert set(explain["item"]) == {classes[i] for i in np.argsort(-values)[:25]}
    assert not set(explain["item"]) & set(scored["item"])
    # the best classes after the shown ones, then random ones
    top = scored[scored["source"] == "top"]
    assert set(top["item"]) == {classes[i] for i in np.argsort(-values)[25:45]}
    # a model with fewer classes than are shown leaves nothing to score
    few = class_sets(values[:7], classes[:7], 25, 40, 0.5, 0.5)
    assert set(few["part"]) == {"explain"}


def test_correlation_is_pearson_without_shrink_and_says_why_not():
    rng = np.random.default_rng(0)
    p, a = rng.random(30), rng.random(30)
    r, why = correlation(p, a)
    assert why is None and r == pytest.approx(np.corrcoef(p, a)[0, 1])
    r, why = correlation(np.full(30, 3.0), a)
    assert r is None and "same value" in why
    r, why = correlation(np.array([1.0, np.nan, np.nan, np.nan, np.nan]), a[:5])
    assert r is None and "fewer than" in why


def test_choice_on_validation_score_on_test():
    actual = np.arange(20, dtype=float)
    validation = validation_parts(20, 0.5)
    good = actual.copy()
    noisy = actual.copy()
    noisy[~validation] = noisy[~validation][::-1]  # perfect on validation only
    noisy[validation] = noisy[validation] + np.random.default_rng(0).normal(0, 3, validation.sum())
    choice = choose(np.stack([noisy, good]), actual, validation)
    assert choice.index == 1 and choice.score == pytest.approx(1.0)
    # every candidate constant on validation: the first, saying so
    flat = np.stack([np.zeros(20), np.zeros(20)])
    choice = choose(flat, actual, validation)
    assert choice.index == 0 and choice.score is None and "without validation" in choice.reason


def test_explanations_cleaned_and_distinct():
    assert clean_explanation("the main thing this neuron does is find red circles.\nmore") == (
        "red circles"
    )
    assert clean_explanation('  "Striped textures."  ') == "Striped textures"
    assert distinct(["a", "A", "", "b", "c"], 2) == ["a", "b"]


def test_frequency_explainer_finds_what_sets_the_top_images_apart():
    items = [Item("a red circle on a plain background", 10)] * 5
    items += [Item("a red square on a plain background", 6)] * 2
    items += [Item("a blue square on a plain background", 0)] * 4
    items += [Item("a red cross on a plain background", 0)] * 1
    explained = FrequencyExplainer(k=2).explain("activations", 3, items)
    assert explained.candidates[0] in {"red circle", "circle"}
    weights = [Item("tiger shark", 10), Item("great white shark", 8), Item("goldfish", 3)]
    assert FrequencyExplainer(k=1).explain("weights", 0, weights).candidates == ["shark"]


def test_prompt_files(tmp_path):
    shipped = prompts.load_prompts()
    reference = shipped.get("activations", "reference")
    messages = reference.messages(12, [("b caption", 9), ("a caption", 2)])
    assert messages[0]["role"] == "system" and len(reference.examples) == 2
    assert [m["role"] for m in messages[1:]] == ["user", "assistant"] * 2 + ["user"]
    last = messages[-1]["content"]
    # ascending, between <start> and <end>, ending as the reference's prompt ends
    assert last.index("a caption\t2") < last.index("b caption\t9")
    assert "<start>" in last and last.rstrip().endswith("the main thing this neuron does is find")
    compact = shipped.get("weights", "compact").messages(1, [("cat", 3)], shipped.json_suffix(3))
    assert len(compact) == 2 and '{"explanations"' in compact[-1]["content"]
    broken = tmp_path / "p.yaml"
    broken.write_text(prompts.DEFAULT.read_text().replace("{listing}", "{items}"))
    with pytest.raises(prompts.PromptFileError, match="listing"):
        prompts.load_prompts(broken)
    with pytest.raises(prompts.PromptFileError, match="cannot read"):
        prompts.load_prompts(tmp_path / "missing.yaml")


def test_weights_stage_lists_each_channels_weights_to_the_classes(tmp_path):
    import torch

    from neuroscribe.config import LayerSpec, TargetSpec, Transform
    from neuroscribe.demo.cnn import tiny_cnn
    from neuroscribe.demo.world import SHAPES
    from neuroscribe.methods.tellme.stages import weights_layer

    target = TargetSpec(
        "shapenet",
        "python:neuroscribe.demo.cnn:tiny_cnn",
        None,
        Transform(64, 64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        (LayerSpec("conv3", "all", "avg", "cls"),),
    )
    out = tmp_path / "w.parquet"
    weights_layer(target, "conv3", [0, 5, 63], 64, out, enabled=True)
    table = pd.read_parquet(out)
    fc = tiny_cnn().fc.weight.detach().to(torch.float32).numpy()
    assert table["neuron"].tolist() == [0, 5, 63]
    assert list(table.loc[1, "classes"]) == list(SHAPES)
    assert np.allclose(table.loc[1, "weights"], fc[:, 5])
    assert "fc: Linear" in list(table.loc[0, "path"])
    # a layer the variant does not describe: an empty table, no model built
    weights_layer(target, "conv2", [0], 32, tmp_path / "none.parquet", enabled=False)
    assert pd.read_parquet(tmp_path / "none.parquet").empty


# -- the tellme stage through the real openai client and a fake server ---------------------------

EXPLAIN = {
    "candidates": 3,
    "candidates_via": "n",
    "neurons_per_request": 1,
    "prompt_mode": "reference",
    "prompts": None,
    "temperature": 1.0,
    "max_tokens": 64,
}
WEIGHT_SETS = {
    "explain_classes": 25,
    "score_classes": 50,
    "score_top_fraction": 0.5,
    "validation_fraction": 0.5,
    "seed": 0,
}


def _captions(tmp_path, neurons=(0, 1, 2, 3)):
    """A chunk's images as tellme_captions writes them: neuron n fires on `colour n` images."""
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    rng = np.random.default_rng(0)
    rows, manifest = [], []
    for i in range(120):
        colour = colours[i % len(colours)]
        caption = f"a {colour} {['circle', 'square', 'star'][i % 3]} on a plain background"
        manifest.append({"image_id": f"img{i:03d}", "path": f"/nowhere/{i}.png"})
        for n in neurons:
            # each neuron its own scoring images: a quarter of them, in blocks of every colour
            held = (i // 6 + n) % 4 == 0
            part = "explain" if not held else ("validation" if (i // 24) % 2 else "test")
            value = float(colour == colours[n]) + rng.random() * 0.1
            rows.append(
                {
                    "model": "m",
                    "layer": "l",
                    "neuron": n,
                    "part": part,
                    "source": "top" if value > 0.5 else "random",
                    "image_id": f"img{i:03d}",
                    "activation": value,
                    "quantised": min(10, round(value * 10)),
                    "caption": caption,
                    "captioner": "test",
                }
            )
    captions = tmp_path / "captions.parquet"
    pd.DataFrame(rows).to_parquet(captions)
    manifest_path = tmp_path / "manifest.parquet"
    pd.DataFrame(manifest).to_parquet(manifest_path)
    weights = tmp_path / "weights.parquet"
    classes = [f"{c} thing {j}" for j in range(10) for c in colours]
    pd.DataFrame(
        {
            "model": "m",
            "layer": "l",
            "neuron": list(neurons),
            "classes": [classes] * len(neurons),
            "weights": [
                [1.0 if c.startswith(colours[n]) else -0.1 for c in classes] for n in neurons
            ],
            "path": [["fc: Linear"]] * len(neurons),
        }
    ).to_parquet(weights)
    return captions, manifest_path, weights


def test_one_request_per_neuron_then_one_per_candidate_and_a_rerun_costs_nothing(
    tmp_path, monkeypatch
):
    from fake_openai import fake_openai, tellme_responder

    from neuroscribe.methods.tellme.stages import explain_chunk

    monkeypatch.setenv("NEUROSCRIBE_TEST_KEY", "sk-test-secret")
    captions, manifest, weights = _captions(tmp_path)
    with fake_openai(default=tellme_responder) as server:
        llm = {
            "backend": "openai",
            "model": "fake-model",
            "base_url": server.base_url,
            "api_key_env": "NEUROSCRIBE_TEST_KEY",
            "seed": 0,
            "max_concurrency": 4,
            "max_attempts": 2,
            "timeout_s": 5,
        }
        args = {
            "captions": captions,
            "weights": weights,
            "manifest": manifest,
            "llm": llm,
            "explain": EXPLAIN,
            "weight_sets": WEIGHT_SETS,
            "simulator": {"backend": "llm", "model": "unused", "logprobs": True},
            "worlds": [],
            "cache": tmp_path / "cache",
        }
        explain_chunk(out=tmp_path / "a.parquet", **args)
        bodies = list(server.requests)
        explainers = [b for b in bodies if b.get("n") == 3]
        simulations = [b for b in bodies if b.get("logprobs")]
        # per neuron and variant: one explainer request (3 choices), then one simulation per
        # candidate, never the very same request twice (two neurons whose scored images have
        # the same captions ask the same of the same label)
        table = pd.read_parquet(tmp_path / "a.parquet")
        assert len(explainers) == 8 and sum(map(len, table["candidates"])) == 8 * 3
        assert (table["simulation_replies"].map(len) == 3).all()
        sent = {json.dumps(b["messages"]) for b in simulations}
        assert len(sent) == len(simulations) and 8 * 3 - 4 <= len(simulations) <= 8 * 3
        assert len(bodies) == 8 + len(simulations)
        explained = [b["messages"][-1]["content"] for b in explainers]
        assert all("the main thing this neuron does is find" in m for m in explained)
        explain_chunk(out=tmp_path / "b.parquet", **args)
        assert len(server.requests) == len(bodies)  # the rerun came from the cache
    first, again = pd.read_parquet(tmp_path / "a.parquet"), pd.read_parquet(tmp_path / "b.parquet")
    pd.testing.assert_frame_equal(
        first.drop(
            columns=["llm_requests", "llm_cache_hits", "prompt_tokens", "completion_tokens"]
        ),
        again.drop(
            columns=["llm_requests", "llm_cache_hits", "prompt_tokens", "completion_tokens"]
        ),
    )
    assert (again["llm_requests"] == 0).all() and (again["llm_cache_hits"] == 1).all()
    activations = first[first["variant"] == "activations"].set_index("neuron")
    assert activations.loc[2, "label"].startswith("blue")
    # chosen on validation, scored on test, read from token probabilities
    assert (activations["validation_items"] >= 12).all() and (activations["test_items"] >= 12).all()
    assert activations.loc[2, "score"] > 0.9
    assert set(activations["simulation_reading"]) == {"expected-value"}
    weights_rows = first[first["variant"] == "weights"].set_index("neuron")
    assert weights_rows.loc[1, "label"].startswith("green")
    # the green classes were all shown to the explainer: none is among the scored classes
    assert not [c for c in weights_rows.loc[1, "scored_items"] if c.startswith("green")]
    shown, scored = weights_rows.loc[1, "explain_items"], len(weights_rows.loc[1, "scored_items"])
    assert shown == 25 and scored == 60 - 25
    assert "sk-test-secret" not in first.to_json()


# -- parse-time checks ------------------------------------------------------------------------


def _demo_config(**tellme):
    import copy

    import yaml

    from conftest import REPO

    cfg = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    cfg = copy.deepcopy(cfg)
    cfg["targets"][0].pop("train")  # random weights: only the architecture is inspected
    cfg["tellme"] = cfg["tellme"] | tellme
    return cfg


def test_a_layer_without_a_linear_path_to_the_classes_fails_when_parsed(tmp_path, monkeypatch):
    from neuroscribe.config import ConfigError
    from neuroscribe.fanout import build_layout

    monkeypatch.chdir(tmp_path)
    cfg = _demo_config(weights={"layers": ["conv2"]})
    with pytest.raises(ConfigError) as err:
        build_layout(cfg)
    message = str(err.value)
    assert "conv2" in message and "conv3" in message and "tellme.weights.path" in message
    with pytest.raises(ConfigError, match="no target has a layer 'conv9'"):
        build_layout(_demo_config(weights={"layers": ["conv9"]}))
    # the demo's own: conv3 through the global pool into fc
    layout = build_layout(_demo_config())
    from neuroscribe.methods.tellme import weight_layers

    assert weight_layers(layout, validate(_demo_config())) == {("shapenet", "conv3")}


def validate(cfg):
    from neuroscribe.config import validate_config

    return validate_config(cfg)


def test_an_llm_simulator_needs_an_llm(tmp_path):
    from neuroscribe.config import ConfigError

    cfg = _demo_config(simulator={"backend": "llm"})
    with pytest.raises(ConfigError, match=r"tellme\.simulator\.backend.*llm\.backend is `none`"):
        validate(cfg)
    cfg = _demo_config(simulator={"backend": "annotations"})
    cfg["probe"]["datasets"] = [{"name": "photos", "type": "folder", "path": str(tmp_path)}]
    cfg["captioner"] = {"backend": "blip"}
    with pytest.raises(ConfigError, match=r"annotations.*photos"):
        validate(cfg)
    cfg = _demo_config(temperature=0)
    cfg["llm"] = {"backend": "openai", "api_key_env": None}
    with pytest.raises(ConfigError, match=r"tellme\.temperature"):
        validate(cfg)


@pytest.mark.parametrize("per_request", [4, 8])
def test_several_neurons_per_explainer_request(tmp_path, monkeypatch, per_request):
    from fake_openai import fake_openai, tellme_responder

    from neuroscribe.methods.tellme.stages import explain_chunk

    captions, manifest, weights = _captions(tmp_path)
    with fake_openai(default=tellme_responder) as server:
        llm = {
            "backend": "openai",
            "model": "fake-model",
            "base_url": server.base_url,
            "api_key_env": None,
            "seed": 0,
            "max_concurrency": 4,
            "max_attempts": 2,
            "timeout_s": 5,
        }
        explain_chunk(
            captions=captions,
            weights=weights,
            manifest=manifest,
            out=tmp_path / "a.parquet",
            llm=llm,
            explain=EXPLAIN | {"neurons_per_request": per_request, "prompt_mode": "compact"},
            weight_sets=WEIGHT_SETS,
            simulator={"backend": "llm", "model": "unused", "logprobs": True},
            worlds=[],
            cache=tmp_path / "cache",
        )
        explainers = [b for b in server.requests if b.get("response_format")]
    table = pd.read_parquet(tmp_path / "a.parquet")
    # 4 neurons x 2 variants, one request per variant (a request covers one variant's neurons)
    assert len(explainers) == 2 and (table["status"] == "ok").all()
    assert (table["candidates"].map(len) == 3).all()
    by_variant = table.groupby("variant")["llm_requests"].sum()
    assert by_variant.to_dict() == {"activations": 1, "weights": 1}  # on each group's first
    assert (
        table.set_index(["variant", "neuron"]).loc[("activations", 2), "label"].startswith("blue")
    )


def test_plan_counts_k_plus_one_requests_per_neuron_and_variant():
    from neuroscribe.methods.tellme.plan import requests, tokens_per_neuron

    cfg = validate(_demo_config(simulator={"backend": "llm"}) | {"llm": {"backend": "openai"}})
    assert requests(cfg, [16, 16, 3]) == 35 * (1 + 3)
    batched = validate(
        _demo_config(simulator={"backend": "llm"}, neurons_per_request=8)
        | {"llm": {"backend": "openai"}}
    )
    assert requests(batched, [16, 16, 3]) == (2 + 2 + 1) + 35 * 3
    offline = validate(_demo_config())
    assert requests(offline, [16]) == 0
    assert tokens_per_neuron(offline, "activations") == {"prompt_tokens": 0, "completion_tokens": 0}
    reference = validate(
        _demo_config(simulator={"backend": "llm"}, prompt_mode="reference")
        | {"llm": {"backend": "openai"}}
    )
    compact = tokens_per_neuron(cfg, "activations")["prompt_tokens"]
    assert tokens_per_neuron(reference, "activations")["prompt_tokens"] > compact > 0
