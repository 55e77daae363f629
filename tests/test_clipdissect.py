"""CLIP-Dissect (`clipdissect`): soft-WPMI against a hand computation, the chunked scoring,
the concept sets, the stage end to end on a tiny merged file, and its config errors."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from conftest import REPO
from neuroscribe import methods
from neuroscribe.config import ConfigError, validate_config
from neuroscribe.demo.world import SHAPES, render_world
from neuroscribe.methods.clipdissect import concepts as concept_sets
from neuroscribe.methods.clipdissect.stages import describe_layer
from neuroscribe.methods.clipdissect.wpmi import WpmiSettings, soft_wpmi
from neuroscribe.probe import image_id
from neuroscribe.words import STOPWORDS

DEMO = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
SCORING = {"top_k": 100, "a": 10, "lam": 1, "p_start": 0.998, "p_end": 0.97, "min_prob": 1e-7}


# -- soft-WPMI --------------------------------------------------------------------------------


def test_soft_wpmi_matches_a_hand_computation() -> None:
    # 4 images, 3 concepts, 2 neurons, top_k 2
    sim = np.array(
        [[0.9, 0.1, 0.0], [0.2, 0.8, 0.1], [0.3, 0.3, 0.3], [0.0, 0.2, 0.7]], dtype=np.float32
    )
    acts = np.array([[5.0, 0.0], [4.0, 1.0], [1.0, 3.0], [0.0, 2.0]], dtype=np.float32)
    a, lam, p_start, p_end, eps = 2.0, 0.5, 0.9, 0.6, 1e-7
    # by hand: softmax per image, each neuron's top two images (neuron 0: images 0 and 1;
    # neuron 1: images 2 then 3), weights 0.9 and 0.9 - 1/2 * 0.3 = 0.75
    probs = np.exp(a * sim) / np.exp(a * sim).sum(axis=1, keepdims=True)
    weights = [0.9, 0.75]
    log_de = np.array(
        [
            [
                sum(
                    math.log(1 + w * (probs[i, c] - 1) + eps)
                    for w, i in zip(weights, top, strict=True)
                )
                for c in range(3)
            ]
            for top in ([0, 1], [2, 3])
        ]
    )
    log_d = np.log(np.exp(log_de).sum(axis=0)) - math.log(2)
    expected = log_de - lam * log_d
    settings = WpmiSettings(top_k=2, a=a, lam=lam, p_start=p_start, p_end=p_end, min_prob=eps)
    got = soft_wpmi(acts, torch.from_numpy(sim), settings).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert got.argmax(axis=1).tolist() == [0, 2]


def test_blocks_of_neurons_give_the_same_scores_as_one_block() -> None:
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(300, 37)).astype(np.float16)
    sim = torch.from_numpy(rng.uniform(-0.2, 0.4, size=(300, 50)).astype(np.float32))
    settings = WpmiSettings(top_k=20)
    whole = soft_wpmi(acts, sim, settings, block=37)
    for block in (1, 5, 16):
        np.testing.assert_allclose(soft_wpmi(acts, sim, settings, block=block), whole)
    # a budget too small for one neuron still runs, one neuron at a time
    np.testing.assert_allclose(soft_wpmi(acts, sim, settings, memory_mb=0.001), whole)


def test_only_the_given_images_count() -> None:
    rng = np.random.default_rng(1)
    acts = rng.normal(size=(40, 3)).astype(np.float32)
    sim = torch.from_numpy(rng.uniform(size=(40, 4)).astype(np.float32))
    keep = np.arange(0, 40, 2)
    subset = soft_wpmi(acts, sim[keep], WpmiSettings(top_k=5), images=keep)
    np.testing.assert_allclose(subset, soft_wpmi(acts[keep], sim[keep], WpmiSettings(top_k=5)))


# -- concept sets -----------------------------------------------------------------------------


def test_concept_file_drops_blank_lines_and_repeats(tmp_path: Path) -> None:
    path = tmp_path / "concepts.txt"
    path.write_text("dog\n\n  cat  \ndog\nred car\n   \ncat\n")
    assert concept_sets.load_concepts(str(path)) == ["dog", "cat", "red car"]


def test_wordfreq_list_is_filtered() -> None:
    words = concept_sets.load_concepts("wordfreq", 500)
    assert 100 < len(words) < 500
    assert all(w.isalpha() and len(w) >= 3 and w not in STOPWORDS for w in words)
    assert "the" not in words and "time" in words


def test_demo_vocabulary_is_the_worlds_words() -> None:
    words = concept_sets.load_concepts("demo")
    assert set(SHAPES) <= set(words)
    assert {"red", "striped", "dotted", "checkered", "small", "large"} <= set(words)
    assert "plain" not in words and len(words) == len(set(words))


# -- the stage --------------------------------------------------------------------------------


def tiny_layer(tmp_path: Path, heldout: bool) -> tuple[Path, Path, Path]:
    """A rendered world, its manifest and a merged layer file whose neuron i fires on shape i;
    with `heldout`, the layer file holds out 40 images that fire every neuron most."""
    world = tmp_path / "world"
    table = render_world(world, n_images=140, size=32, seed=0)
    ids = [image_id("world", rel) for rel in table["relpath"]]
    shapes = [objects[0]["shape"] for objects in table["objects"]]
    rng = np.random.default_rng(0)
    acts = rng.normal(0, 0.1, size=(len(ids), len(SHAPES))).astype(np.float16)
    for row, shape in enumerate(shapes):
        acts[row, SHAPES.index(shape)] += 3
    manifest = pd.DataFrame(
        {"image_id": ids, "path": [str(world / "images" / r) for r in table["relpath"]]}
    )
    if heldout:
        # the first 40 images are held out: give them the top activation of every neuron
        acts[:40] = 10
    manifest_path = tmp_path / "manifest.parquet"
    manifest.to_parquet(manifest_path)
    layer = tmp_path / "fc.h5"
    with h5py.File(layer, "w") as h5:
        h5["activations"] = acts
        h5["rows"] = np.arange(len(ids))
        h5["image_ids"] = np.array([i.encode() for i in ids], dtype="S16")
        h5["neurons"] = np.arange(len(SHAPES))
        if heldout:
            h5["heldout"] = np.arange(len(ids)) < 40
        h5.attrs.update({"model": "net", "layer": "fc"})
    return world, manifest_path, layer


@pytest.mark.parametrize("heldout", [False, True])
def test_stage_labels_each_shape_neuron(tmp_path: Path, heldout: bool) -> None:
    world, manifest, layer = tiny_layer(tmp_path, heldout)
    out = tmp_path / "out.parquet"
    describe_layer(
        layer_file=str(layer),
        manifest=str(manifest),
        out=str(out),
        concepts="demo",
        wordfreq_words=100,
        backend={"backend": "annotations"},
        scoring=SCORING | {"top_k": 10},
        worlds=[["world", str(world)]],
        cache=str(tmp_path / "cache"),
        keep=5,
    )
    table = pd.read_parquet(out)
    assert table["label"].tolist() == list(SHAPES)
    assert (table["status"] == "ok").all() and (table["score_kind"] == "soft_wpmi").all()
    assert [len(x) for x in table["labels"]] == [3] * len(SHAPES)
    assert [len(x) for x in table["concepts"]] == [5] * len(SHAPES)
    assert table["images"].iloc[0] == (100 if heldout else 140)
    assert (table["similarity_model"] == "annotations").all()


def test_stage_with_a_tiny_clip_caches_embeddings(tmp_path: Path) -> None:
    from tiny_diffusion import build_tiny_clip

    clip = build_tiny_clip(tmp_path / "clip")
    _, manifest, layer = tiny_layer(tmp_path, heldout=False)
    words = tmp_path / "words.txt"
    words.write_text("circle\nsquare\nred car\n")
    args = dict(
        layer_file=str(layer),
        manifest=str(manifest),
        concepts=str(words),
        wordfreq_words=100,
        backend={"backend": "clip", "model": str(clip), "batch_size": 32, "text_batch_size": 2},
        scoring=SCORING | {"top_k": 10},
        worlds=[],
        cache=str(tmp_path / "cache"),
        device="cpu",
    )
    describe_layer(out=str(tmp_path / "a.parquet"), **args)
    cached = sorted(p.name.split("-")[0] for p in (tmp_path / "cache" / "clipdissect").iterdir())
    assert cached == ["images", "texts"]
    describe_layer(out=str(tmp_path / "b.parquet"), **args)
    a, b = pd.read_parquet(tmp_path / "a.parquet"), pd.read_parquet(tmp_path / "b.parquet")
    pd.testing.assert_frame_equal(a, b)
    assert set(a["label"]) <= {"circle", "square", "red car"}
    assert a["similarity_model"].iloc[0].startswith("clip:")


# -- config -----------------------------------------------------------------------------------


def demo_config(**section: object) -> dict:
    cfg = copy.deepcopy(DEMO)
    cfg["targets"] = cfg["targets"][:1]  # the clean CNN (the second has a planted shortcut)
    cfg["clipdissect"] = dict(cfg.get("clipdissect", {})) | section
    if "clipdissect" not in cfg["methods"]:
        cfg["methods"] = [*cfg["methods"], "clipdissect"]
    return cfg


def test_registered_with_one_stage_per_layer() -> None:
    method = methods.get("clipdissect")
    assert [(s.name, s.per_layer) for s in method.stages] == [("clipdissect", True)]
    assert method.rules is not None and method.rules.is_file()


def test_defaults_are_the_papers() -> None:
    cfg = validate_config(demo_config(), check_paths=False)
    section = cfg["clipdissect"]
    assert (section["top_k"], section["a"], section["lam"]) == (100, 10, 1)
    assert (section["p_start"], section["p_end"], section["min_prob"]) == (0.998, 0.97, 1e-7)


def test_a_missing_concept_file_names_the_key(tmp_path: Path) -> None:
    cfg = demo_config(concepts=str(tmp_path / "nope.txt"))
    with pytest.raises(ConfigError, match=r"clipdissect\.concepts.*does not exist"):
        validate_config(cfg)


def test_an_empty_concept_file_is_an_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ConfigError, match=r"clipdissect\.concepts.*no concepts"):
        validate_config(demo_config(concepts=str(empty)))


def test_annotations_need_a_demo_world(tmp_path: Path) -> None:
    cfg = demo_config(backend="annotations")
    cfg["methods"] = ["topk", "clipdissect"]
    cfg.pop("captioner")
    cfg["probe"]["datasets"] = [{"name": "photos", "type": "folder", "path": str(tmp_path)}]
    with pytest.raises(ConfigError, match=r"clipdissect\.backend"):
        validate_config(cfg)


def test_rows_and_details_come_from_the_layer_tables(tmp_path: Path) -> None:
    from neuroscribe.describe import exemplar_rows
    from neuroscribe.methods import RowInputs
    from neuroscribe.tables import to_arrow

    world, manifest, layer = tiny_layer(tmp_path, heldout=False)
    out = tmp_path / "clipdissect" / "net" / "fc.parquet"
    describe_layer(
        layer_file=str(layer),
        manifest=str(manifest),
        out=str(out),
        concepts="demo",
        wordfreq_words=100,
        backend={"backend": "annotations"},
        scoring=SCORING,
        worlds=[["world", str(world)]],
        cache=str(tmp_path / "cache"),
    )
    exemplars = pd.DataFrame(
        {"model": "net", "layer": "fc", "neuron": [0, 1], "rank": 0, "image_id": "x", "box": None}
        | {"activation": 1.0}
    )
    shared = exemplar_rows(exemplars, {"net": "python:net"})
    method = methods.get("clipdissect")
    result = method.rows(RowInputs(shared, {"clipdissect": [str(out)]}, {"net": "python:net"}))
    assert result.rows["label"].tolist() == ["circle", "square"]
    assert (result.rows["method"] == "clipdissect").all()
    assert '"similarity": "annotations"' in result.rows["models"].iloc[0]
    to_arrow(result.rows.assign(method="clipdissect"), "descriptions")
    assert result.details is not None and method.details_schema is not None
    to_arrow(result.details, method.details_schema)
    assert len(result.details["concepts"].iloc[0]) == 10


def test_the_plan_counts_one_job_per_layer(tmp_path: Path) -> None:
    from neuroscribe.fanout import build_layout
    from neuroscribe.plan import build_plan

    cfg = demo_config()
    cfg["targets"][0].pop("train")
    layout = build_layout(cfg, tmp_path / "results")
    plan = build_plan(layout, cfg)
    assert plan["jobs"]["clipdissect"] == len(layout.chunks) == 3
    assert plan["jobs"]["scores"] == len(layout.all_chunks())
