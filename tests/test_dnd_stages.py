"""The Describe-and-Dissect synthesis and scoring stages on the demo world with the demo CNN."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from neuroscribe.config import LayerSpec, TargetSpec, Transform
from neuroscribe.demo.world import render_world
from neuroscribe.failures import TooManyFailed
from neuroscribe.methods.dnd import stages as dnd
from neuroscribe.probe import image_id

TRANSFORM = Transform(resize=64, crop=64, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
TARGET = TargetSpec(
    name="demo",
    spec="python:neuroscribe.demo.cnn:tiny_cnn",
    weights=None,  # the seeded random initial weights: enough to check the plumbing
    transform=TRANSFORM,
    layers=(LayerSpec("conv3", "all", "avg", "cls"), LayerSpec("fc", "all", "avg", "cls")),
)
SYNTH = {
    "backend": "procedural",
    "model": "unused",
    "steps": 1,
    "guidance": 0.0,
    "size": 64,
    "scheduler": None,
    "images_per_concept": 4,
    "batch_size": 3,
    "seed": 0,
}
SCORING = {
    "method": "combined",
    "beta": 2,
    "labels": 2,
    "similarity": {"backend": "target-features", "model": "unused", "layer": None},
}
SETTINGS = {"batch_size": 16, "workers": 0, "device": "cpu", "dtype": "float32"}


def concepts_table(path: Path, candidates: dict[int, list[str]], layer: str = "fc") -> Path:
    rows = [
        {
            "model": "demo",
            "layer": layer,
            "neuron": n,
            "status": "ok",
            "error": None,
            "candidates": c,
        }
        for n, c in candidates.items()
    ]
    pd.DataFrame(rows).to_parquet(path)
    return path


def test_synthesis_draws_each_distinct_concept_once_and_reports_unrenderable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    first = concepts_table(
        tmp_path / "c1.parquet",
        {0: ["red circle", "quantum entanglement"], 1: ["red circle", "striped square"]},
    )
    store = tmp_path / "images"
    dnd.synthesize_chunk(first, tmp_path / "s1.parquet", SYNTH, store, device="cpu")
    table = pd.read_parquet(tmp_path / "s1.parquet").set_index("concept")
    assert list(table.index) == ["red circle", "quantum entanglement", "striped square"]
    assert table.loc["quantum entanglement", "status"] == "unrenderable"
    assert "names nothing the demo world can draw" in table.loc["quantum entanglement", "error"]
    assert len(table.loc["quantum entanglement", "images"]) == 0
    assert len(table.loc["red circle", "images"]) == 4 and table.loc["red circle", "status"] == "ok"
    assert len(list(store.rglob("*.png"))) == 8  # 2 renderable concepts x 4
    assert "8 drawn now, 0 from the store" in caplog.text
    # another chunk proposing a known concept draws only what is new
    second = concepts_table(tmp_path / "c2.parquet", {5: ["striped square", "blue star"]})
    dnd.synthesize_chunk(second, tmp_path / "s2.parquet", SYNTH, store, device="cpu")
    again = pd.read_parquet(tmp_path / "s2.parquet").set_index("concept")
    assert list(again.loc["striped square", "images"]) == list(
        table.loc["striped square", "images"]
    )
    assert "4 drawn now, 4 from the store" in caplog.text
    assert not list(store.rglob(".*.tmp-*"))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    root = tmp_path_factory.mktemp("world")
    annotations = render_world(root, 30, 64, seed=1)
    manifest = pd.DataFrame(
        {
            "image_id": [image_id("world", r) for r in annotations["relpath"]],
            "path": [str(root / "images" / r) for r in annotations["relpath"]],
        }
    )
    manifest.to_parquet(root / "manifest.parquet")
    return root, manifest


def _score(
    tmp_path: Path, root: Path, concepts: Path, exemplars: pd.DataFrame, **kwargs: Any
) -> Path:
    """The scores stage over a chunk synthesised into tmp_path/s.parquet; its output file."""
    exemplars.to_parquet(tmp_path / "e.parquet")
    out = tmp_path / "scores.parquet"
    dnd.score_chunk(
        concepts,
        tmp_path / "s.parquet",
        tmp_path / "e.parquet",
        root / "manifest.parquet",
        out,
        TARGET,
        "fc",
        SCORING,
        settings=SETTINGS,
        **kwargs,
    )
    return out


def test_scoring_labels_every_neuron_from_one_pass(
    tmp_path: Path, world: tuple[Path, pd.DataFrame]
) -> None:
    root, manifest = world
    candidates = {0: ["red circle", "blue square", "quantum foam"], 3: ["green star", "ring"]}
    concepts = concepts_table(tmp_path / "c.parquet", candidates | {6: []})
    dnd.synthesize_chunk(concepts, tmp_path / "s.parquet", SYNTH, tmp_path / "images")
    ids = list(manifest["image_id"])
    exemplars = pd.DataFrame(
        [
            {"neuron": n, "rank": k, "image_id": ids[n + k], "box": [0, 0, 40, 40] if k else None}
            for n in (0, 3, 6)
            for k in range(3)
        ]
    )
    out = _score(tmp_path, root, concepts, exemplars, top_k=3)
    scores = pd.read_parquet(out).set_index("neuron")
    first = scores.loc[0]
    assert first["status"] == "ok" and first["label"] == first["labels"][0]
    assert len(first["labels"]) == 2 and set(first["labels"]) <= {"red circle", "blue square"}
    # the unrenderable candidate has no images and no scores (null, read back as NaN)
    assert np.isnan(first["rank_scores"][2]) and first["n_images"].tolist() == [4, 4, 0]
    assert first["similarity_model"] == "target-features:penultimate"
    assert scores.loc[3, "score_kind"].startswith("dnd: rank position x image similarity")
    # the label is the candidate with the best combined score
    best = max(range(2), key=lambda c: scores.loc[3, "combined"][c])
    assert scores.loc[3, "label"] == ["green star", "ring"][best]
    assert scores.loc[6, "status"] == "failed" and pd.isna(scores.loc[6, "label"])
    # a failed neuron says why (here: the proposer gave it nothing); 1 of 3 failed is allowed
    assert scores.loc[6, "error"] == "no candidate concepts were proposed"


def test_too_many_failed_neurons_fail_the_scores_job(
    tmp_path: Path, world: tuple[Path, pd.DataFrame]
) -> None:
    root, manifest = world
    # every candidate of neuron 3 is unrenderable, neuron 6 has none: 2 of 3 neurons fail
    concepts = concepts_table(
        tmp_path / "c.parquet", {0: ["red circle"], 3: ["quantum foam"], 6: []}
    )
    dnd.synthesize_chunk(concepts, tmp_path / "s.parquet", SYNTH, tmp_path / "images")
    ids = list(manifest["image_id"])
    exemplars = pd.DataFrame(
        [{"neuron": n, "rank": 0, "image_id": ids[n], "box": None} for n in (0, 3, 6)]
    )
    with pytest.raises(TooManyFailed) as failed:
        _score(tmp_path, root, concepts, exemplars, top_k=1, max_failed_fraction=0.5)
    message = str(failed.value)
    assert "2 of 3 neurons failed, more than max_failed_fraction (0.5) allows" in message
    assert "neuron 3: no candidate could be drawn ('quantum foam':" in message
    assert "neuron 6: no candidate concepts were proposed" in message
    assert not (tmp_path / "scores.parquet").exists()


def test_scoring_resize_scores_the_drawn_images_shrunk_as_the_reference_does(
    tmp_path: Path, world: tuple[Path, pd.DataFrame]
) -> None:
    from PIL import Image

    root, manifest = world
    concepts = concepts_table(tmp_path / "c.parquet", {0: ["red circle", "blue square"]})
    dnd.synthesize_chunk(concepts, tmp_path / "s.parquet", SYNTH, tmp_path / "images")
    ids = list(manifest["image_id"])
    exemplars = pd.DataFrame(
        [{"neuron": 0, "rank": k, "image_id": ids[k], "box": None} for k in (0, 1)]
    )
    exemplars.to_parquet(tmp_path / "e.parquet")

    def score(synthesis: Path, scoring: dict[str, Any], out: Path) -> pd.Series:
        dnd.score_chunk(
            concepts,
            synthesis,
            tmp_path / "e.parquet",
            root / "manifest.parquet",
            out,
            TARGET,
            "fc",
            scoring,
            2,
            SETTINGS,
        )
        return pd.read_parquet(out).iloc[0]

    shrunk = score(tmp_path / "s.parquet", SCORING | {"resize": 16}, tmp_path / "a.parquet")
    # each drawn image has a 16 x 16 copy beside it, as PIL's `image.resize([16, 16])` makes it
    synth = pd.read_parquet(tmp_path / "s.parquet")
    drawn = [p for images in synth["images"] for p in images]
    assert len(drawn) == 8
    for path in drawn:
        small = Image.open(Path(path).with_name(f"{Path(path).stem}-16px.png"))
        expected = Image.open(path).convert("RGB").resize([16, 16])
        assert small.size == (16, 16) and np.array_equal(np.asarray(small), np.asarray(expected))
    # the scores are those of the small images scored as drawn images
    synth["images"] = [[dnd.shrunk(p, 16) for p in images] for images in synth["images"]]
    synth.to_parquet(tmp_path / "small.parquet")
    direct = score(tmp_path / "small.parquet", SCORING, tmp_path / "b.parquet")
    assert shrunk["label"] == direct["label"]
    assert np.allclose(shrunk["combined"], direct["combined"])
    assert np.allclose(shrunk["rank_scores"], direct["rank_scores"])
    # without the option the images are scored as drawn, which here ranks them otherwise
    full = score(tmp_path / "s.parquet", SCORING, tmp_path / "c.parquet")
    assert not np.allclose(full["similarities"], shrunk["similarities"])
    assert dnd.shrunk(drawn[0], None) == drawn[0]


def test_squashed_exemplars_are_embedded_as_their_square_views(
    tmp_path: Path, world: tuple[Path, pd.DataFrame], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exemplars table with `squash` (crop_squash) has its exemplars embedded for image
    similarity as the captioner sees them: resized to squash x squash; one without is as before."""
    root, manifest = world
    concepts = concepts_table(tmp_path / "c.parquet", {0: ["red circle", "blue square"]})
    dnd.synthesize_chunk(concepts, tmp_path / "s.parquet", SYNTH, tmp_path / "images")
    ids = list(manifest["image_id"])
    plain = pd.DataFrame(
        [{"neuron": 0, "rank": k, "image_id": ids[k], "box": [0, 8, 48, 24]} for k in (0, 1)]
    )
    embedded: list[Any] = []
    real = dnd.embed_files
    monkeypatch.setattr(
        dnd, "embed_files", lambda sim, items: embedded.extend(items) or real(sim, items)
    )
    for name in ("a", "b"):  # each score run in its own folder, on the same synthesis
        (tmp_path / name).mkdir()
        shutil.copy(tmp_path / "s.parquet", tmp_path / name / "s.parquet")
    before = pd.read_parquet(_score(tmp_path / "a", root, concepts, plain, top_k=2)).iloc[0]
    assert {item[2] for item in embedded if len(item) > 2} == {None}
    embedded.clear()
    squashed = plain.assign(squash=32)
    after = pd.read_parquet(_score(tmp_path / "b", root, concepts, squashed, top_k=2)).iloc[0]
    exemplar_items = [item for item in embedded if item[1] is not None]
    assert [item[2] for item in exemplar_items] == [32, 32]
    assert np.allclose(before["rank_scores"], after["rank_scores"])  # the drawn images' ranks
    assert not np.allclose(before["similarities"], after["similarities"])
