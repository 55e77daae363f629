"""TExplain's method: parse-time checks, per-class and per-neuron words, its stages on a tiny
LM, and its rows of the final table."""

from __future__ import annotations

import copy

import pytest
import yaml

from conftest import REPO


def _demo_config(**texplain):
    cfg = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    cfg = copy.deepcopy(cfg)
    cfg["targets"] = cfg["targets"][:1]  # the clean CNN (the second has a planted shortcut)
    cfg["targets"][0].pop("train")  # random weights: only the architecture is inspected
    cfg["texplain"] = cfg["texplain"] | texplain
    return cfg


def validate(cfg):
    from neuroscribe.config import validate_config

    return validate_config(cfg)


# -- parse-time checks ------------------------------------------------------------------------


def test_the_default_input_layer_feeds_the_classifier_head(tmp_path, monkeypatch):
    from neuroscribe.fanout import build_layout
    from neuroscribe.methods.texplain import direction_layers, input_layers

    monkeypatch.chdir(tmp_path)
    layout = build_layout(_demo_config())
    cfg = validate(_demo_config())
    assert input_layers(layout, cfg) == {"shapenet": "conv3"}
    assert direction_layers(layout, cfg) == {("shapenet", "conv3")}


def test_the_direction_mode_refuses_a_layer_the_translator_does_not_read(tmp_path, monkeypatch):
    from neuroscribe.config import ConfigError
    from neuroscribe.fanout import build_layout

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        build_layout(_demo_config(direction={"layers": ["conv2"]}))
    message = str(err.value)
    assert "texplain.direction.layers" in message and "'conv2'" in message
    assert "'conv3'" in message  # names the input layer it could list instead
    with pytest.raises(ConfigError, match=r"texplain\.input_layer.*no layer 'conv9'.*conv"):
        build_layout(_demo_config(input_layer="conv9"))
    with pytest.raises(ConfigError, match="no target has a layer 'conv7'"):
        build_layout(_demo_config(direction={"layers": ["conv3", "conv7"]}))
    # naming conv2 as the input makes conv2 the direction layer
    layout = build_layout(_demo_config(input_layer="conv2", direction={"layers": ["conv2"]}))
    assert layout.targets["shapenet"].layer("conv2")


def test_resnet_default_input_layer_is_layer4(tmp_path):
    from neuroscribe.config import targets_from_config
    from neuroscribe.methods.texplain import input_layer

    (target,) = targets_from_config(
        validate(
            _demo_config()
            | {"targets": [{"name": "r18", "spec": "torchvision:resnet18", "layers": ["layer2"]}]}
        )
    )
    assert input_layer(target, validate(_demo_config()), str(tmp_path)) == "layer4"


def test_an_lm_that_cannot_spell_the_captions_fails_before_training(tmp_path):
    from neuroscribe.demo.lm import build_word_lm, world_vocabulary
    from neuroscribe.methods.texplain.stages import check_vocabulary

    lm = build_word_lm(world_vocabulary(), tmp_path / "lm", n_layer=1, n_embd=16, n_head=2)
    check_vocabulary(str(lm), ["a large red star on a plain background"])
    with pytest.raises(ValueError, match=r"does not know \d+% of the caption tokens"):
        check_vocabulary(str(lm), ["an astronaut in a white suit holding a flag"])


# -- words ------------------------------------------------------------------------------------


def test_per_class_words_come_from_the_class_against_the_other_classes():
    from neuroscribe.methods.texplain.stages import Words, _class_rows

    groups = {"star": ["a", "b"], "ring": ["c", "d"]}
    sentences = {
        "a": ["a red star on a gradient background"] * 4,
        "b": ["a blue star on a gradient background"] * 4,
        "c": ["a red ring on a plain background"] * 4,
        "d": ["a blue ring on a noisy background"] * 4,
    }
    rows = _class_rows("m", "predicted", groups, sentences, Words(top_words=3))
    star = [r["word"] for r in rows if r["class"] == "star"]
    assert star[:2] in (["star", "gradient"], ["gradient", "star"])
    assert "red" not in star and "blue" not in star  # shared with the rest: not overused
    first = next(r for r in rows if r["class"] == "star")
    assert first["images"] == 2 and first["sentences"] == 8 and first["reference_sentences"] == 8
    assert {r["rank"] for r in rows if r["class"] == "ring"} == set(range(len(rows) - len(star)))


def test_hash_order_is_a_stable_draw():
    from neuroscribe.methods.texplain.stages import hash_order

    ids = [f"img{i}" for i in range(50)]
    assert hash_order(ids, 0) == hash_order(list(reversed(ids)), 0)
    assert hash_order(ids, 0) != hash_order(ids, 1)
    assert hash_order(ids[:10], 0) == [i for i in hash_order(ids, 0) if i in ids[:10]]


# -- the per-chunk stage on a tiny LM ---------------------------------------------------------


def _world(tmp_path, n_images=40, units=6, seed=0):
    """A features file as texplain_features writes it, a random translator into a tiny
    word-level LM, an exemplars chunk, reference sentences and captions."""
    import h5py
    import numpy as np
    import pandas as pd
    import torch

    from neuroscribe.demo.lm import build_word_lm, world_vocabulary
    from neuroscribe.methods.texplain.translator import (
        TranslatorSpec,
        build_translator,
        save_translator,
    )

    rng = np.random.default_rng(seed)
    ids = np.array([f"img{i:03d}" for i in range(n_images)])
    values = rng.normal(size=(n_images, units)).astype(np.float32)
    features = tmp_path / "features.h5"
    with h5py.File(features, "w") as h5:
        h5.create_dataset("image_ids", data=ids.astype("S"))
        h5.create_group("layers").create_dataset("conv3", data=values.astype(np.float16))
    lm = build_word_lm(world_vocabulary(), tmp_path / "lm", n_layer=1, n_embd=16, n_head=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        translator = build_translator(
            TranslatorSpec("linear", in_features=units, embed_dim=16, prefix_tokens=2)
        )
    translator.set_standardisation(torch.from_numpy(values))
    save_translator(translator, tmp_path / "translator.pt")
    exemplars = pd.DataFrame(
        [
            {"neuron": n, "rank": r, "image_id": ids[(n * 3 + r) % n_images]}
            for n in range(units)
            for r in range(4)
        ]
    )
    exemplars.to_parquet(tmp_path / "exemplars.parquet")
    pd.DataFrame(
        {"image_id": ids[:5], "sentences": [["a red star on a plain background"] * 3] * 5}
    ).to_parquet(tmp_path / "reference.parquet")
    pd.DataFrame({"image_id": ids, "caption": "a star", "captioner": "annotations"}).to_parquet(
        tmp_path / "captions.parquet"
    )
    return {"features": features, "lm": str(lm), "translator": tmp_path / "translator.pt"}


def _explain(tmp_path, world, out, direction=True, neurons=(0, 1, 2), llm=None):
    from neuroscribe.methods.texplain.sentences import Sampling
    from neuroscribe.methods.texplain.stages import Words, explain_chunk

    explain_chunk(
        exemplars=tmp_path / "exemplars.parquet",
        reference=tmp_path / "reference.parquet",
        features=world["features"],
        translator=world["translator"],
        input_layer="conv3",
        layer="conv3",
        model="m",
        neurons=list(neurons),
        direction=direction,
        direction_scale=3.0,
        holdout=0.2,
        lm=world["lm"],
        captions=tmp_path / "captions.parquet",
        sampling=Sampling(sentences=4, max_new_tokens=8, temperature=1.0, top_p=0.95),
        words=Words(top_words=5, label_words=2),
        llm=llm,
        cache=tmp_path / "cache",
        out=out,
        max_failed_fraction=1.0,
        device="cpu",
        dtype="float32",
    )


def test_a_chunk_gets_words_per_neuron_and_mode_and_a_rerun_samples_nothing(tmp_path, caplog):
    import logging

    import pandas as pd

    world = _world(tmp_path)
    with caplog.at_level(logging.INFO, logger="neuroscribe.methods.texplain.stages"):
        _explain(tmp_path, world, tmp_path / "a.parquet")
    table = pd.read_parquet(tmp_path / "a.parquet")
    assert sorted(zip(table["neuron"], table["mode"], strict=True)) == [
        (n, m) for n in range(3) for m in ("direction", "exemplars")
    ]
    exemplars = table[table["mode"] == "exemplars"]
    assert (exemplars["images"] == 4).all() and (exemplars["sentences"] == 16).all()
    direction = table[table["mode"] == "direction"]
    assert (direction["images"] == 0).all() and (direction["sentences"] == 4).all()
    for row in table.itertuples():
        if row.status == "ok":
            assert row.label == " ".join(list(row.words)[:2]) and row.labels[0] == row.label
            assert row.score == pytest.approx(row.zscores[0]) and row.score > 0
        else:
            assert "no word is overrepresented" in row.error and row.label is None
    assert "16 sentences sampled by this job" not in caplog.text  # images shared: fewer
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="neuroscribe.methods.texplain.stages"):
        _explain(tmp_path, world, tmp_path / "b.parquet")
    assert "0 sentences sampled by this job" in caplog.text
    again = pd.read_parquet(tmp_path / "b.parquet")
    pd.testing.assert_frame_equal(table, again)


def test_class_samples_are_drawn_per_class_and_capped():
    import numpy as np

    from neuroscribe.methods.texplain.stages import _groups, hash_order

    ids = np.array([f"img{i}" for i in range(30)])
    keys = ["star" if i % 3 == 0 else "ring" for i in range(30)]
    groups = _groups(ids, keys, 4, seed=0)
    assert sorted(groups) == ["ring", "star"] and all(len(g) == 4 for g in groups.values())
    stars = [str(i) for i, k in zip(ids, keys, strict=True) if k == "star"]
    assert groups["star"] == hash_order(stars, 0)[:4]


def test_with_an_llm_one_cached_request_per_neuron_phrases_its_words(tmp_path, monkeypatch):
    import pandas as pd
    from fake_openai import Reply, fake_openai

    world = _world(tmp_path)
    monkeypatch.setenv("NEUROSCRIBE_TEST_KEY", "sk-never-logged-7")

    def phrase(body):
        words = body["messages"][-1]["content"].removeprefix("Words: ").split(", ")
        return Reply(f"the {words[0]} thing")

    with fake_openai(default=phrase) as server:
        llm = {
            "backend": "openai",
            "model": "fake-model",
            "base_url": server.base_url,
            "api_key_env": "NEUROSCRIBE_TEST_KEY",
            "timeout_s": 30,
            "max_concurrency": 2,
            "max_attempts": 2,
        }
        for out in ("a.parquet", "b.parquet"):
            _explain(tmp_path, world, tmp_path / out, direction=False, neurons=[0, 1], llm=llm)
        table = pd.read_parquet(tmp_path / "a.parquet")
        ok = table[table.status == "ok"]
        assert len(server.requests) == len(ok) > 0  # once per neuron, none on the rerun
    for row in ok.itertuples():
        assert row.label == f"the {row.words[0]} thing" and row.labels[0] == row.label
    assert '"llm": "fake-model"' in table["models"].iloc[0]
    assert "sk-never-logged-7" not in (tmp_path / "a.parquet").read_bytes().decode("latin-1")


# -- a named caption file as the training data ------------------------------------------------


def _caption_file(tmp_path, suffix=".csv"):
    """Three images (one unreadable), five caption rows: two for one image, one empty."""
    import pandas as pd
    from PIL import Image

    folder = tmp_path / "coco"
    folder.mkdir()
    for name, colour in (("a.png", "red"), ("b.png", "blue")):
        Image.new("RGB", (32, 32), colour).save(folder / name)
    (folder / "broken.png").write_bytes(b"not a png")
    table = pd.DataFrame(
        {
            "file": ["a.png", "a.png", "b.png", "broken.png", str(folder / "b.png")],
            "text": ["a red square", "a red plain square", "a blue square", "a square", " "],
        }
    )
    path = folder / f"captions{suffix}"
    if suffix == ".csv":
        table.to_csv(path, index=False)
    else:
        table.to_parquet(path)
    return path


def test_a_caption_file_is_checked_when_the_config_is_read(tmp_path):
    from neuroscribe.config import ConfigError

    path = _caption_file(tmp_path)
    named = {"path": str(path), "path_column": "file", "caption_column": "text"}
    validate(_demo_config(captions=named))
    with pytest.raises(
        ConfigError,
        match=r"texplain\.captions\.caption_column.*no column "
        r"'caption' \(columns: file, text\)",
    ):
        validate(_demo_config(captions={"path": str(path), "path_column": "file"}))
    with pytest.raises(ConfigError, match=r"texplain\.captions\.path.*does not exist"):
        validate(_demo_config(captions=named | {"path": str(tmp_path / "none.csv")}))
    with pytest.raises(ConfigError, match=r"not a \.csv or \.parquet"):
        validate(_demo_config(captions=named | {"path": str(tmp_path / "list.txt")}))


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_caption_file_gives_every_caption_of_its_readable_images(tmp_path, suffix):
    import pandas as pd

    from neuroscribe.methods.texplain.dataset import caption_dataset

    path = _caption_file(tmp_path, suffix)
    out, manifest = tmp_path / "out" / "captions.parquet", tmp_path / "out" / "images.parquet"
    rejected = tmp_path / "out" / "rejected.parquet"
    caption_dataset(str(path), "file", "text", out, manifest, rejected)
    images = pd.read_parquet(manifest)
    assert sorted(p.rsplit("/", 1)[1] for p in images["path"]) == ["a.png", "b.png"]
    assert pd.read_parquet(rejected)["path"].str.endswith("broken.png").all()
    pairs = pd.read_parquet(out)
    by_image = dict(
        zip(images["image_id"], images["path"].str.rsplit("/", n=1).str[1], strict=True)
    )
    assert sorted(
        (by_image[i], c) for i, c in zip(pairs["image_id"], pairs["caption"], strict=True)
    ) == [
        ("a.png", "a red plain square"),
        ("a.png", "a red square"),
        ("b.png", "a blue square"),
    ]
    assert set(pairs["captioner"]) == {f"file:captions{suffix}"}
    assert not list(out.parent.glob(".*"))  # the de-duplicated image list is gone


def test_a_caption_file_trains_on_its_own_images_features(tmp_path, job_env):
    """The dry run: the caption file's job and one feature job per target feed the training;
    the explain split is not captioned for it."""
    from conftest import run_snakemake

    path = _caption_file(tmp_path)
    cfg = _demo_config(
        captions={"path": str(path), "path_column": "file", "caption_column": "text"}
    )
    cfg["methods"] = ["topk", "texplain"]
    config = tmp_path / "config.yaml"
    cfg["report"] = {"enabled": False}  # tested in test_report.py and test_workflow.py
    config.write_text(yaml.safe_dump(cfg))
    dry = run_snakemake(tmp_path, config, "-n", "-p", env=job_env)
    listing = dry.stdout + dry.stderr
    assert dry.returncode == 0, listing[-3000:]
    assert "rule texplain_caption_file:" in listing and "rule texplain_captions:" not in listing
    assert "rule texplain_train_features:" in listing
    assert "texplain_models/shapenet/train_features.h5" in listing
    train = listing[listing.index("rule texplain_train:") :]
    assert "train_features.h5" in train.split("output:")[0]


def test_the_plan_counts_texplain_jobs_and_bounds_its_sentences(tmp_path, monkeypatch):
    from neuroscribe.fanout import build_layout
    from neuroscribe.plan import build_plan

    monkeypatch.chdir(tmp_path)
    cfg = validate(_demo_config())
    plan = build_plan(build_layout(cfg), cfg)
    # the clean target alone here: no planted shortcut to look for
    assert "evaluate_shortcuts" not in plan["jobs"]
    assert {k: v for k, v in plan["jobs"].items() if k.startswith("texplain_")} == {
        "texplain_lm": 1,
        "texplain_captions": 1,
        "texplain_features": 1,
        "texplain_train": 1,
        "texplain_reference": 1,
        "texplain_classes": 1,
    }
    # each image's sentences once per target: the 800 explain-split images of the 1000 (200
    # held out), and conv3's 64 direction steps with the mean; 24 sentences each in the demo
    assert plan["estimates"]["texplain"]["sentences"] == 24 * (800 + 64 + 1)
    # the whole demo: a second target, trained with a planted shortcut that is looked for
    cfg = validate(yaml.safe_load((REPO / "config" / "demo.yaml").read_text()))
    jobs = build_plan(build_layout(cfg), cfg)["jobs"]
    assert jobs["evaluate_shortcuts"] == 1 and jobs["texplain_train"] == 2
    named = {"path": str(_caption_file(tmp_path)), "path_column": "file", "caption_column": "text"}
    cfg = validate(_demo_config(captions=named))
    jobs = build_plan(build_layout(cfg), cfg)["jobs"]
    assert "texplain_captions" not in jobs
    assert jobs["texplain_caption_file"] == 1 and jobs["texplain_train_features"] == 1


def test_an_edited_caption_file_changes_the_training_settings(tmp_path):
    from neuroscribe.methods.texplain import settings

    path = _caption_file(tmp_path)
    named = {"path": str(path), "path_column": "file", "caption_column": "text"}
    cfg = validate(_demo_config(captions=named))
    before = settings("texplain_train", cfg)
    assert settings("texplain_train", cfg) == before
    path.write_text(path.read_text().replace("a blue square", "a blue diamond"))
    assert settings("texplain_train", cfg)["captions"]["digest"] != before["captions"]["digest"]
