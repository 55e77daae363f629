"""The held-out evaluation: the split, the metrics on hand-computed cases, the shuffled control,
class names from each kind of target, the simulators, and a layer's evaluation job end to end
on a small demo world."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml
from tiny_diffusion import build_tiny_clip

from conftest import REPO
from neuroscribe.activations import extract_shard
from neuroscribe.backends.simulators import ClipSimulator, ProbeImage
from neuroscribe.config import (
    ConfigError,
    DatasetSpec,
    LayerSpec,
    TargetSpec,
    Transform,
    validate_config,
)
from neuroscribe.demo.annotations import AnnotationSimulator
from neuroscribe.demo.world import images_folder, render_world
from neuroscribe.evaluation.checks import check_evaluation
from neuroscribe.evaluation.classes import check_class_files, class_names, read_class_file
from neuroscribe.evaluation.external import check_external
from neuroscribe.evaluation.metrics import (
    bootstrap_interval,
    names_class,
    pearson_rows,
    shuffled,
)
from neuroscribe.evaluation.split import heldout_mask
from neuroscribe.evaluation.stage import (
    Scorers,
    _class_rows,
    _simulation_rows,
    evaluate_layer,
    format_summary,
    summarise,
)
from neuroscribe.merge import merge_layer
from neuroscribe.probe import build_manifest

TRANSFORM = Transform(64, 64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def spec(kind_ref: str, weights: str | None = None) -> TargetSpec:
    return TargetSpec("t", kind_ref, weights, TRANSFORM, ())


def test_split_is_a_stable_function_of_the_image_id() -> None:
    ids = [f"{i:016x}" for i in range(4000)]
    fifth = heldout_mask(ids, 0.2)
    assert abs(fifth.mean() - 0.2) < 0.02
    assert (heldout_mask(list(reversed(ids)), 0.2) == fifth[::-1]).all()  # order-free
    assert (fifth <= heldout_mask(ids, 0.3)).all()  # a larger share holds out a superset
    assert not heldout_mask(ids, 0).any()
    assert (heldout_mask([i.encode() for i in ids], 0.2) == fifth).all()
    with pytest.raises(ValueError, match=r"not in \[0, 1\)"):
        heldout_mask(ids, 1.0)


def test_pearson_on_a_hand_computed_case() -> None:
    predicted = np.array([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0], [3.0, 2.0, 1.0]])
    actual = np.array([[2.0, 4.0, 7.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    r = pearson_rows(predicted, actual)
    # row 0: deviations (-1, 0, 1) and (-7/3, -1/3, 8/3): r = 5 / sqrt(2 * 114/9)
    assert r[0] == pytest.approx(5 / np.sqrt(2 * 114 / 9))
    assert np.isnan(r[1])  # a constant prediction has no correlation
    assert r[2] == pytest.approx(-1.0)


def test_bootstrap_interval_contains_the_mean() -> None:
    values = np.random.default_rng(1).normal(0.3, 0.2, size=50)
    low, high = bootstrap_interval(np.append(values, np.nan), resamples=500, seed=0)
    assert low < values.mean() < high
    assert high - low < 0.2
    assert np.isnan(bootstrap_interval([np.nan])[0])


def test_shuffle_moves_every_label() -> None:
    labels = [f"label {i}" for i in range(9)]
    mixed = shuffled(labels, seed=3)
    assert sorted(mixed) == sorted(labels)
    assert all(a != b for a, b in zip(labels, mixed, strict=True))
    assert shuffled(labels, seed=3) == mixed
    assert shuffled(["only"]) == ["only"]


def test_label_names_its_class_or_a_synonym() -> None:
    assert names_class("Striped circles", ["circle"]) == 1.0
    assert names_class("a great white shark", ["great white shark", "white shark"]) == 1.0
    assert names_class("white sharks", ["great white shark", "white shark"]) == 1.0
    assert names_class("a square", ["circle"]) == 0.0
    assert names_class("squares", ["square"]) == 1.0
    assert names_class("", ["circle"]) is None and names_class(None, ["circle"]) is None


def test_class_names_from_each_kind_of_target(tmp_path: Path) -> None:
    tv = class_names(spec("torchvision:resnet18", "IMAGENET1K_V1"), None, 1000)
    assert tv is not None and tv[0] == ["tench"] and len(tv) == 1000
    assert class_names(spec("torchvision:resnet18"), None, 1000) is None  # no weights, no names
    timm_names = class_names(spec("timm:resnet18"), None, 1000)
    assert timm_names is not None and len(timm_names) == 1000
    from transformers import ViTConfig

    labelled = tmp_path / "hf"
    ViTConfig(num_labels=2, id2label={0: "cat", 1: "dog, puppy"}).save_pretrained(labelled)
    assert class_names(spec(f"hf:{labelled}"), None, 2) == [["cat"], ["dog", "puppy"]]
    unlabelled = tmp_path / "hf-plain"
    ViTConfig(num_labels=2).save_pretrained(unlabelled)
    assert class_names(spec(f"hf:{unlabelled}"), None, 2) is None
    demo = class_names(spec("python:neuroscribe.demo.cnn:tiny_cnn"), None, 7)
    assert demo is not None and demo[0] == ["circle"]
    assert class_names(spec("python:neuroscribe.demo.cnn:tiny_cnn"), None, 9) is None
    classes = tmp_path / "classes.txt"
    classes.write_text("cat, kitty\n\ndog\n")
    assert class_names(spec("python:x.py:f"), str(classes), 2) == [["cat", "kitty"], ["dog"]]
    with pytest.raises(ConfigError, match="has 2 classes but the output layer has 3 neurons"):
        read_class_file(classes, 3)


def _demo_config(**evaluation) -> dict:
    cfg = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    cfg["targets"] = cfg["targets"][:1]  # the clean CNN (the second has a planted shortcut)
    cfg["evaluation"] = cfg.get("evaluation", {}) | evaluation
    return cfg


def test_bad_evaluation_settings_fail_at_parse_time(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"evaluation\.holdout"):
        validate_config(_demo_config(holdout=1.0))
    with pytest.raises(ConfigError, match=r"evaluation\.simulator\.backend"):
        validate_config(_demo_config(simulator={"backend": "gpt"}))
    cfg = validate_config(_demo_config())
    classes = tmp_path / "classes.txt"
    classes.write_text("a\nb\n")
    cfg["targets"][0]["classes"] = str(classes)
    with pytest.raises(ConfigError, match=r"classes': class file .* has 2 classes but .* has 7"):
        check_class_files(cfg, {"shapenet": "fc"}, {"shapenet": {"fc": 7}})
    cfg["targets"][0]["classes"] = str(tmp_path / "none.txt")
    with pytest.raises(ConfigError, match="does not exist"):
        check_class_files(cfg, {"shapenet": "fc"}, {"shapenet": {"fc": 7}})
    cfg["targets"][0]["classes"] = None
    cfg["probe"]["datasets"].append({"name": "photos", "type": "folder", "path": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"annotations reads the demo world's .* \(photos\)"):
        check_evaluation(cfg, {"shapenet": "fc"}, {"shapenet": {"fc": 7}})
    # the llm simulator needs a chat model (the demo config's llm backend is none)
    cfg = validate_config(_demo_config(simulator={"backend": "llm"}))
    assert cfg["llm"]["backend"] == "none" and cfg["evaluation"]["simulator"]["logprobs"] is True
    with pytest.raises(
        ConfigError,
        match=r"'evaluation\.simulator\.backend': llm .* llm\.backend is none; set llm\.backend "
        r"to openai or local",
    ):
        check_evaluation(cfg, {"shapenet": "fc"}, {"shapenet": {"fc": 7}})
    cfg["llm"]["backend"] = "openai"
    check_evaluation(cfg, {"shapenet": "fc"}, {"shapenet": {"fc": 7}})
    # its captions: the annotations captioner has them only for demo worlds
    cfg["probe"]["datasets"].append({"name": "photos", "type": "folder", "path": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"'captioner\.backend': .* not for photos; use `blip`"):
        check_evaluation(cfg, {"shapenet": "fc"}, {"shapenet": {"fc": 7}})
    cfg["captioner"]["backend"] = "blip"
    check_evaluation(cfg, {"shapenet": "fc"}, {"shapenet": {"fc": 7}})


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("world")
    render_world(root / "world", n_images=60, size=32, seed=2)
    return root / "world"


def test_annotation_simulator_reads_labels_with_the_world_vocabulary(world: Path) -> None:
    sim = AnnotationSimulator([("w", str(world))])
    notes = pd.read_parquet(world / "annotations.parquet")
    from neuroscribe.probe import image_id

    images = [ProbeImage(image_id("w", rel), "") for rel in notes["relpath"]]
    result = sim.predict(["red circles", "", "zebra", "noisy background"], images)
    expect = [
        float(any(o["colour"] == "red" and o["shape"] == "circle" for o in objects))
        for objects in notes["objects"]
    ]
    assert result.predictions[0].tolist() == expect
    assert result.predictions[3].tolist() == [float(b == "noise") for b in notes["background"]]
    assert result.reasons == [
        None,
        "empty label",
        "no word of the demo world's vocabulary in 'zebra'",
        None,
    ]
    assert np.isnan(result.predictions[1:3]).all()


def test_external_tables_are_checked_at_parse_time(tmp_path: Path) -> None:
    table = tmp_path / "labels.csv"
    pd.DataFrame({"unit": [0], "label": ["circle"]}).to_csv(table, index=False)
    base = {"name": "theirs", "path": str(table)}
    cfg = validate_config(_demo_config(external=[base]))
    with pytest.raises(ConfigError, match=r"has no column 'description'.*set unit_column"):
        check_external(cfg)
    cfg = validate_config(_demo_config(external=[base | {"label_column": "label", "layer": "fc"}]))
    check_external(cfg)
    cfg = validate_config(_demo_config(external=[base | {"path": str(tmp_path / "no.csv")}]))
    with pytest.raises(ConfigError, match=r"external\[0\]' \(theirs\): file .* does not exist"):
        check_external(cfg)


def test_clip_simulator_embeds_each_image_once(tmp_path: Path, world: Path) -> None:
    folder = build_tiny_clip(tmp_path / "clip")
    sim = ClipSimulator(str(folder), device="cpu", dtype="float32")
    files = sorted(world.rglob("*.png"))[:5]
    images = [ProbeImage(f.stem, str(f)) for f in files]
    first = sim.predict(["a red circle", "stripes", " "], images)
    assert first.predictions.shape == (3, 5)
    assert first.reasons == [None, None, "empty label"]
    assert np.all(np.abs(first.predictions[:2]) <= 1.0 + 1e-5)
    again = sim.predict(["stripes"], images[::-1])
    np.testing.assert_allclose(again.predictions[0], first.predictions[1][::-1], rtol=1e-5)
    assert len(sim._images) == 5
    same, other = sim.text_cosine(["a red circle", "a red circle"], ["a red circle", "stripes"])
    assert same == pytest.approx(1.0, abs=1e-5) and other < same
    # the class-name cosine in CLIP's text space, beside the word and sentence metrics
    scorers = Scorers({"backend": "annotations"}, None, str(folder), [], "cpu", "float32")
    rows = pd.DataFrame(_class_rows({0: "circle", 1: None}, [["circle"], ["square"]], scorers, 0))
    clip_rows = rows[rows["metric"] == "class_clip_similarity"].set_index("neuron")
    assert clip_rows.loc[0, "value"] == pytest.approx(1.0, abs=1e-5)
    assert clip_rows.loc[0, "scorer"].startswith("clip:")
    assert pd.isna(clip_rows.loc[1, "value"]) and clip_rows.loc[1, "reason"] == "no label"
    assert set(rows["metric"]) == {"class_named", "class_text_similarity", "class_clip_similarity"}


CNN_FC = LayerSpec("fc", "all", "avg", "cls")
CNN = TargetSpec("shapenet", "python:neuroscribe.demo.cnn:tiny_cnn", None, TRANSFORM, (CNN_FC,))


def _evaluate_fc(tmp_path: Path, out: Path, **extra: object) -> None:
    """The layer job on the test's files: fc of the demo CNN, the annotations simulator."""
    evaluate_layer(
        tmp_path / "descriptions.parquet",
        tmp_path / "fc.h5",
        tmp_path / "manifest.parquet",
        CNN,
        "fc",
        width=7,
        output_layer=True,
        classes_file=None,
        simulator={"backend": "annotations"},
        text_model=None,
        worlds=[("w", str(tmp_path / "world"))],
        out=out,
        cache=tmp_path / "cache",
        **extra,  # type: ignore[arg-type]
    )


def _shape_layer(tmp_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A demo world, its manifest and the merged fc file of the demo CNN under `tmp_path`, the
    fc neurons 0-6 firing exactly on the images that hold shape i; returns the file's image ids
    and held-out flags."""
    render_world(tmp_path / "world", n_images=120, size=32, seed=4)
    build_manifest(
        [DatasetSpec(name="w", type="folder", path=str(images_folder(tmp_path / "world")))],
        tmp_path,
        tmp_path / "manifest.parquet",
        tmp_path / "rejected.parquet",
    )
    # a merged file whose neurons 0-6 fire exactly on the images holding shape i
    extract_shard(tmp_path / "manifest.parquet", CNN, [CNN_FC], 0, 1, tmp_path / "s.h5", workers=0)
    merge_layer([tmp_path / "s.h5"], CNN, CNN_FC, tmp_path / "fc.h5", top_k=5, holdout=0.3)
    from neuroscribe.demo.annotations import load_annotations
    from neuroscribe.demo.world import SHAPES

    notes = load_annotations([("w", tmp_path / "world")]).set_index("image_id")
    with h5py.File(tmp_path / "fc.h5", "r+") as h5:
        ids = h5["image_ids"][:].astype(str)
        truth = np.array(
            [[any(o["shape"] == s for o in notes.loc[i, "objects"]) for s in SHAPES] for i in ids]
        )
        h5["activations"][...] = truth.astype(np.float16)
        held = h5["heldout"][:]
    return ids, held


def test_layer_job_scores_labels_against_their_shuffle(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Labels that the annotations simulator makes exactly right for a neuron's activations
    beat their shuffled control; every row says who scored it, and unscored rows say why."""
    from neuroscribe.demo.world import SHAPES

    ids, held = _shape_layer(tmp_path)
    assert 0 < held.sum() < len(held)
    # held-out images are never among the top-K the methods see
    with h5py.File(tmp_path / "fc.h5", "r") as h5:
        assert not held[np.searchsorted(h5["rows"][:], h5["topk_rows"][:].ravel())].any()
    labels = [("crosses" if s == "cross" else f"{s}s") for s in SHAPES]
    labels[6] = "zebra"  # a word the world does not know
    descriptions = pd.DataFrame(
        {
            "model": "shapenet",
            "layer": "fc",
            "neuron": range(7),
            "method": "m",
            "label": labels,
            "exemplar_ids": [[] for _ in range(7)],
        }
    )
    descriptions = pd.concat(
        [descriptions, descriptions.assign(method="topk", label=None)], ignore_index=True
    )
    descriptions.to_parquet(tmp_path / "descriptions.parquet")
    out = tmp_path / "evaluation" / "fc.parquet"
    _evaluate_fc(tmp_path, out)
    rows = pd.read_parquet(out)
    assert set(rows["method"]) == {"m"}  # topk does not label (and no truth worlds given)
    sim = rows[rows["metric"] == "simulation_r"].set_index("neuron")
    assert sim.loc[0:5, "value"].tolist() == pytest.approx([1.0] * 6)
    assert (sim.loc[0:5, "shuffled"].dropna() < 0.9).all()  # one drew the unknown label
    assert sim.loc[6, "reason"] == "no word of the demo world's vocabulary in 'zebra'"
    named = rows[rows["metric"] == "class_named"].set_index("neuron")
    assert named.loc[0:5, "value"].tolist() == [1.0] * 6
    assert set(rows["scorer"]) == {"annotations", "words", "sentence:all-MiniLM-L6-v2"}
    summary = tmp_path / "evaluation" / "summary.parquet"
    split = tmp_path / "evaluation" / "split.parquet"
    summarise(
        [out],
        tmp_path / "evaluation" / "neurons.parquet",
        summary,
        summary.with_suffix(".csv"),
        manifest=tmp_path / "manifest.parquet",
        holdout=0.3,
        split_out=split,
    )
    # the split table lists the same held-out images as the layer file
    flags = pd.read_parquet(split).set_index("image_id")["heldout"]
    assert set(flags[flags].index) == set(ids[held])
    table = pd.read_parquet(summary).set_index("metric")
    r = table.loc["simulation_r"]
    assert r["mean"] == pytest.approx(1.0) and r["neurons"] == 6 and r["unscored"] == 1
    assert r["difference"] > 0.5 and r["ci_low"] <= r["mean"] <= r["ci_high"]
    assert "simulation_r" in format_summary(pd.read_parquet(summary))

    # another tool's labels (unit 9 is not in the layer), and a rerun that scores only them
    external = tmp_path / "other.csv"
    pd.DataFrame(
        {
            "layer": ["fc", "fc", "fc", "conv"],
            "unit": [0, 1, 9, 0],
            "description": ["circle", "x", "y", "z"],
        }
    ).to_csv(external, index=False)
    spec = {
        "name": "other",
        "path": str(external),
        "model": None,
        "layer": None,
        "layer_column": "layer",
        "unit_column": "unit",
        "label_column": "description",
    }
    caplog.set_level("INFO")
    _evaluate_fc(tmp_path, out, external=[spec])
    assert "m from the cache" in caplog.text and "other from the cache" not in caplog.text
    assert "1 rows name units layer fc does not have (first: [9]); skipped" in caplog.text
    again = pd.read_parquet(out)
    pd.testing.assert_frame_equal(
        again[again["method"] == "m"].reset_index(drop=True), rows.reset_index(drop=True)
    )
    other = again[(again["method"] == "other") & (again["metric"] == "simulation_r")]
    assert other.set_index("neuron").loc[0, "value"] == pytest.approx(1.0)
    assert sorted(other["neuron"]) == [0, 1]

    # on a demo world, every method is also judged against the world's truth, topk included
    descriptions["exemplar_ids"] = [[ids[held == 0][0]]] * len(descriptions)
    descriptions.to_parquet(tmp_path / "descriptions.parquet")
    truthful = tmp_path / "evaluation" / "truth.parquet"
    _evaluate_fc(tmp_path, truthful, truth_worlds=[("w", str(tmp_path / "world"))])
    judged = pd.read_parquet(truthful)
    assert set(judged[judged.method == "topk"]["metric"]) == {"exemplar_precision"}
    named = judged[(judged.method == "m") & (judged.metric == "truth_named")].set_index("neuron")
    assert list(named["truth"]) == [f"shape:{s}" for s in SHAPES]
    assert named.loc[0:5, "value"].tolist() == [1.0] * 6 and named.loc[6, "value"] == 0.0


def test_llm_simulator_scores_every_method_from_the_heldout_captions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The llm simulator reads each held-out image's caption (captioned once, for every
    method) and asks the chat model once per distinct label, whatever the method; a rerun asks
    nothing, from the rows' cache or, without it, from the LLM cache."""
    from fake_openai import fake_openai, tellme_responder

    from neuroscribe.cache import DiskCache
    from neuroscribe.demo.annotations import load_annotations
    from neuroscribe.demo.world import SHAPES

    monkeypatch.setenv("NEUROSCRIBE_TEST_KEY", "sk-test-secret")
    ids, held = _shape_layer(tmp_path)
    labels = {
        "m": [*SHAPES[:6], "zebra"],  # neurons 0-5 named by their shape; 6 by no world word
        "n": ["circle", "striped things", "zebra", None, "square", "star", "ring"],
    }
    pd.DataFrame(
        [
            {
                "model": "shapenet",
                "layer": "fc",
                "neuron": n,
                "method": method,
                "label": label,
                "exemplar_ids": [],
            }
            for method, named in labels.items()
            for n, label in enumerate(named)
        ]
    ).to_parquet(tmp_path / "descriptions.parquet")
    distinct = {x for named in labels.values() for x in named if x is not None}
    world = [("w", str(tmp_path / "world"))]

    def run(out: str, llm: dict, simulator: dict | None = None) -> pd.DataFrame:
        evaluate_layer(
            tmp_path / "descriptions.parquet",
            tmp_path / "fc.h5",
            tmp_path / "manifest.parquet",
            CNN,
            "fc",
            width=7,
            output_layer=False,
            classes_file=None,
            simulator=simulator or {"backend": "llm", "model": "unused", "logprobs": True},
            text_model=None,
            worlds=world,  # the annotations simulator's
            out=tmp_path / out,
            cache=tmp_path / "cache",
            captioner={"backend": "annotations"},
            captioner_worlds=world,
            llm=llm,
        )
        return pd.read_parquet(tmp_path / out)

    caplog.set_level("INFO")
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
        rows = run("a.parquet", llm)
        # one request per distinct label over both methods, each listing every held-out image
        # by its caption, token probabilities asked
        bodies = list(server.requests)
        assert len(bodies) == len(distinct)
        assert all(b["logprobs"] and b["model"] == "fake-model" for b in bodies)
        listed = [b["messages"][-1]["content"] for b in bodies]
        assert all(f"\n{held.sum() + 1}\t" not in m for m in listed)
        notes = load_annotations(world).set_index("image_id")["caption"]
        listing = "\n".join(f"{k}\t{notes[i]}" for k, i in enumerate(ids[held], 1))
        assert all(listing in m for m in listed)
        # each held-out image captioned once, into the run's caption cache
        with DiskCache(tmp_path / "cache", "captions") as captions:
            assert len(captions) == held.sum()

        sim = rows[rows["metric"] == "simulation_r"]
        assert set(rows["metric"]) == {"simulation_r"} and len(sim) == 14
        assert sim["scorer"].nunique() == 1
        scorer = sim["scorer"].iloc[0]
        assert scorer.startswith("llm:") and ":fake-model:prompts-" in scorer
        m = sim[sim["method"] == "m"].set_index("neuron")
        # a caption names an image's shapes: the simulation is the neuron's activation
        assert m.loc[0:5, "value"].tolist() == pytest.approx([1.0] * 6, abs=1e-3)
        assert (m.loc[0:5, "shuffled"].dropna() < 0.9).all()
        assert m.loc[0:5, "reason"].isna().all()
        assert pd.isna(m.loc[6, "value"]) and "predicts the same value" in m.loc[6, "reason"]
        n = sim[sim["method"] == "n"].set_index("neuron")
        assert n.loc[0, "value"] == pytest.approx(m.loc[0, "value"])
        assert np.isfinite(n.loc[1, "value"])  # "striped": a texture word of the captions
        assert pd.isna(n.loc[3, "value"]) and n.loc[3, "reason"] == "no label"
        assert np.isfinite(n.loc[[4, 5, 6], "value"].astype(float)).all()
        assert "llm: {'requests': " in caplog.text

        # a rerun: the rows' cache, no request
        again = run("b.parquet", llm)
        assert "m, n from the cache" in caplog.text
        pd.testing.assert_frame_equal(again, rows)
        # without the rows' cache: the captions' and the LLM's caches, still no request
        shutil.rmtree(tmp_path / "cache" / "evaluation")
        caplog.clear()
        third = run("c.parquet", llm)
        assert "m, n from the cache" not in caplog.text
        pd.testing.assert_frame_equal(third, rows)
        n_held = int(held.sum())
        assert f"captions: {n_held} held-out images, {n_held} from the cache, 0 captioned" in (
            caplog.text
        )
        # a setting of how fast, not what, scores nothing again
        faster = run("d.parquet", llm | {"max_concurrency": 1, "timeout_s": 9})
        pd.testing.assert_frame_equal(faster, rows)
        assert len(server.requests) == len(distinct)

    # the other simulators' rows do not depend on the llm-only key (old caches still hit)
    plain = run("e.parquet", {}, {"backend": "annotations"})
    caplog.clear()
    run("f.parquet", {}, {"backend": "annotations", "logprobs": True})
    assert "m, n from the cache" in caplog.text
    assert set(plain["scorer"]) == {"annotations"}


def test_values_a_reply_left_out_are_left_out_of_the_correlation() -> None:
    """An llm reply may give no value for some images: r is over the images it gave one for,
    nothing guessed; a label with no value at all says so."""
    from neuroscribe.backends.simulators import Simulation

    class Partial:
        id = "partial"

        def predict(self, labels: list[str], images: list[ProbeImage]) -> Simulation:
            rows = {
                "a": [0.0, 10.0, np.nan, 10.0, 0.0],  # the third image left out
                "b": [np.nan] * 5,
            }
            return Simulation(
                np.array([rows[x] for x in labels], dtype=np.float32),
                [None] * len(labels),
                missing=[int(np.isnan(rows[x]).sum()) for x in labels],
            )

    # neuron 0 fires on images 1 and 3 only, except on the image the reply left out
    activations = np.array([[0, 0], [1, 1], [5, 0], [1, 0], [0, 1]], dtype=np.float32)
    images = [ProbeImage(str(i), "") for i in range(5)]
    rows = _simulation_rows({0: "a", 1: "b"}, {0: 0, 1: 1}, activations, Partial(), images, 0)
    by = {r["neuron"]: r for r in rows}
    assert by[0]["value"] == pytest.approx(1.0) and by[0]["reason"] is None
    assert by[1]["value"] is None
    assert by[1]["reason"] == "the simulator gave no value for any held-out image"
