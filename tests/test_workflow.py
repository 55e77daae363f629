"""The real Snakefile through the snakemake CLI on a reduced demo, in a temporary directory."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import zipfile
from pathlib import Path

import h5py
import pandas as pd
import pytest
import yaml
from browser import broken_images, chrome, console_errors, needs_chromium, open_page, screenshot

from conftest import REPO, run_snakemake, workflow_env
from neuroscribe.demo.world import SHAPES
from neuroscribe.methods import KEY

pytestmark = pytest.mark.slow


def _config(tmp_path: Path, **changes: object) -> Path:
    cfg = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    cfg["targets"] = cfg["targets"][:1]  # the clean CNN (the demo's second has a shortcut)
    cfg["probe"]["datasets"][0]["n_images"] = 60
    cfg["shard_size"] = 25
    cfg["chunk_size"] = 16
    cfg["top_k"] = 5
    # conv3 (a few channels): pooled into fc, so TeLLMe explains it from its weights too
    cfg["targets"][0]["layers"] = [
        "conv2",
        {"name": "conv3", "neurons": "0-7"},
        {"name": "fc", "neurons": "all"},
    ]
    # TExplain at smoke-test size: a briefly pre-trained LM, a few epochs, few sentences
    cfg["texplain"] = cfg["texplain"] | {
        "lm": {"model": "demo", "demo_steps": 150},
        "train": cfg["texplain"]["train"] | {"max_epochs": 5},
        "sampling": {"sentences": 8, "max_new_tokens": 16},
        "reference_images": 20,
        "class_images": 10,
    }
    cfg.update(changes)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table Snakemake prints: rule → count."""
    table = output[output.index("Job stats:") :]
    return {
        m.group(1): int(m.group(2))
        for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)
        if m.group(1) != "total"
    }


def _without_environment() -> dict[str, str]:
    """A shell where the project's environment is not activated: its bin folder is not on PATH
    (snakemake is still started by its absolute path, as `.venv/bin/snakemake ...`)."""
    env = workflow_env()
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if p != bin_dir)
    env.pop("VIRTUAL_ENV", None)
    return env


# the jobs of the main run: what its dry run lists (with `all`) and what its plan counts
JOBS = {
    "render_demo_probe": 1,
    "train_demo_target": 1,
    "probe_manifest": 1,
    "activations": 3,  # 60 images / 25 per shard
    "merge_activations": 3,  # conv2, conv3, fc
    "exemplars": 4,  # conv2: 32 neurons in chunks of 16; conv3: 8; fc: 7 neurons
    "captions": 4,
    "concepts": 4,
    "synthesis": 4,
    "scores": 4,
    "clipdissect": 3,  # one job per layer
    "tellme_captions": 4,
    "tellme_weights": 3,  # one per layer (empty but for conv3)
    "tellme": 4,
    "texplain_lm": 1,
    "texplain_captions": 1,
    "texplain_features": 1,
    "texplain_train": 1,
    "texplain_reference": 1,
    "texplain_classes": 1,
    "texplain": 4,
    "describe": 1,
    "evaluate_layer": 3,
    "evaluation_summary": 1,
    "report": 1,
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    workdir = tmp_path_factory.mktemp("run")
    config = _config(workdir)
    env = _without_environment()  # the jobs find the package through snakemake's interpreter
    dry = run_snakemake(workdir, config, "-n", env=env)
    assert _job_counts(dry.stdout + dry.stderr) == JOBS | {"all": 1}
    assert not (workdir / "results" / "demo" / "probe").exists(), "a dry run wrote outputs"
    proc = run_snakemake(workdir, config, env=env)
    # the end of the run says how many neurons were described, and that none failed
    out = proc.stdout + proc.stderr
    assert "dnd: 47 of 47 neurons described" in out
    assert "clipdissect: 47 of 47 neurons described" in out
    assert "tellme-activations: 47 of 47 neurons described" in out
    assert re.search(r"tellme-weights: \d of 8 neurons described", out)
    assert re.search(r"texplain-exemplars: \d+ of 47 neurons described", out)
    assert re.search(r"texplain-direction: \d of 8 neurons described", out)
    return workdir, config


def test_full_run_writes_the_table(finished: tuple[Path, Path]) -> None:
    workdir, _ = finished
    results = workdir / "results" / "demo"
    table = pd.read_parquet(results / "descriptions.parquet")
    manifest = pd.read_parquet(results / "probe" / "manifest.parquet")
    assert len(manifest) == 60
    # every method on every neuron; TeLLMe's weight-based variant and TExplain's direction
    # mode on conv3 only (the layer pooled into fc, which the translator reads)
    assert len(table) == 5 * (32 + 8 + 7) + 8 + 8
    assert set(table["method"]) == {
        "topk",
        "dnd",
        "clipdissect",
        "tellme-activations",
        "tellme-weights",
        "texplain-exemplars",
        "texplain-direction",
    }
    for method in ("topk", "dnd", "clipdissect", "tellme-activations"):
        fc = table[(table.layer == "fc") & (table.method == method)]
        assert sorted(fc["neuron"]) == list(range(7))
    dnd = table[table.method == "dnd"]
    assert dnd["label"].notna().all() and dnd["labels"].map(len).between(1, 3).all()
    # DnD's details are in its own table, one row per neuron, joined on (model, layer, neuron)
    details = pd.read_parquet(results / "descriptions" / "dnd.parquet")
    assert len(details) == len(dnd) and set(map(tuple, details[KEY].values)) == set(
        map(tuple, dnd[KEY].values)
    )
    assert (details["captions"].map(len) == 5).all()
    assert details["candidates"].map(len).ge(1).all()
    assert "candidates" not in table.columns and "captions" not in table.columns
    assert len(pd.read_csv(results / "descriptions" / "dnd.csv")) == len(details)
    assert all(row["label"] == row["labels"][0] for _, row in dnd.iterrows())
    assert (dnd["status"] == "ok").all() and dnd["error"].isna().all()
    # the models that ran, as their stages recorded them, and nothing that did not run
    assert json.loads(dnd["models"].iloc[0]) == {
        "target": "python:neuroscribe.demo.cnn:tiny_cnn@results/demo/models/shapenet.pt",
        "captioner": "annotations",
        "llm": "none:frequency-5",
        "synthesizer": "procedural:world-v1@64px",
        "similarity": "target-features:penultimate",
    }
    for _, row in table.iterrows():
        assert len(row["exemplar_ids"]) == 5
        assert set(row["exemplar_ids"]) <= set(manifest["image_id"])
        assert list(row["exemplar_activations"]) == sorted(
            row["exemplar_activations"], reverse=True
        )
        assert json.loads(row["models"])["target"] == (
            "python:neuroscribe.demo.cnn:tiny_cnn@results/demo/models/shapenet.pt"
        )
    csv = pd.read_csv(results / "descriptions.csv")
    assert len(csv) == len(table) and json.loads(csv["exemplar_ids"][0]) == list(
        table["exemplar_ids"][0]
    )
    with h5py.File(results / "activations" / "shapenet" / "conv2.h5") as h5:
        assert h5["activations"].shape == (60, 32) and h5["activations"].dtype == "float16"
        assert (
            h5.attrs["spec"] == "python:neuroscribe.demo.cnn:tiny_cnn"
            and h5.attrs["pooling"] == "avg"
        )
    log = (results / "logs" / "activations" / "shapenet" / "shard-0000.log").read_text()
    assert "100%" in log and "img" in log  # the tqdm bar
    assert not list(results.rglob(".*.tmp-*")), "temporary files left behind"


@needs_chromium
def test_the_report_opens_in_chromium_and_its_filter_narrows_the_rows(
    finished: tuple[Path, Path],
) -> None:
    from selenium.webdriver.common.by import By

    workdir, _ = finished
    report = workdir / "results" / "demo" / "report"
    table = pd.read_parquet(workdir / "results" / "demo" / "descriptions.parquet")
    conv2 = table[(table["model"] == "shapenet") & (table["layer"] == "conv2")]
    # a word of some labels but not all: the rows whose labels hold it, by any method (the
    # page splits labels into words as this does)
    words = conv2["label"].fillna("").str.lower().map(lambda x: set(re.findall(r"[^\W_]+", x)))
    word = next(
        w
        for w in sorted(set().union(*words))
        if 0 < conv2[words.map(lambda ws, w=w: w in ws)]["neuron"].nunique() < 32
    )
    expected = set(conv2[words.map(lambda ws: word in ws)]["neuron"])
    driver = chrome()
    try:
        pages = {
            "demo-index": report / "index.html",
            "demo-layer": report / "layers" / "shapenet" / "conv2.html",
            "demo-neuron": report / "neurons" / "shapenet" / "conv2" / "0.html",
        }
        for name, page in pages.items():
            open_page(driver, page)
            assert console_errors(driver) == [], name
            assert broken_images(driver) == [], name
            assert driver.find_elements(By.TAG_NAME, "img"), name
            screenshot(driver, name)
        open_page(driver, pages["demo-layer"])
        assert "32 of 32 neurons" in driver.find_element(By.ID, "count").text
        driver.find_element(By.ID, "filter").send_keys(word)
        shown = {
            int(r.get_attribute("data-neuron"))
            for r in driver.find_elements(By.CSS_SELECTOR, "tr.neuron")
        }
        assert shown == expected
        screenshot(driver, "demo-layer-filtered")
        assert console_errors(driver) == []
    finally:
        driver.quit()
    # every method's part of the neuron page, and the plots on the index
    neuron = pages["demo-neuron"].read_text()
    for method in ("dnd", "clipdissect", "tellme", "texplain"):
        assert f"<h2>{method}</h2>" in neuron
    index = pages["demo-index"].read_text()
    assert "plots/shapenet/conv2.evaluation.png" in index and "Plan against what was spent" in index


def test_snakemakes_own_report_packs_the_flagged_outputs(
    finished: tuple[Path, Path], job_env: dict[str, str]
) -> None:
    workdir, config = finished
    run_snakemake(workdir, config, "--report", "report.zip", env=job_env)
    with zipfile.ZipFile(workdir / "report.zip") as packed:
        names = {Path(n).name for n in packed.namelist()}
    assert {"descriptions.csv", "summary.csv", "loss.png", "report.html"} <= names
    assert {
        f"{layer}.evaluation.{fmt}" for layer in ("conv2", "conv3", "fc") for fmt in ("png", "svg")
    } <= names


def test_every_method_is_scored_on_the_held_out_images(finished: tuple[Path, Path]) -> None:
    results = finished[0] / "results" / "demo"
    with h5py.File(results / "activations" / "shapenet" / "fc.h5", "r") as h5:
        held = set(h5["image_ids"][:][h5["heldout"][:]].astype(str))
    table = pd.read_parquet(results / "descriptions.parquet")
    # no method saw a held-out image
    assert held and not held & {i for ids in table["exemplar_ids"] for i in ids}
    split = pd.read_parquet(results / "evaluation" / "split.parquet")
    assert set(split.loc[split["heldout"], "image_id"]) == held and len(split) == 60
    summary = pd.read_parquet(results / "evaluation" / "summary.parquet")
    assert set(summary["method"]) == {
        "topk",
        "dnd",
        "clipdissect",
        "tellme-activations",
        "tellme-weights",
        "texplain-exemplars",
        "texplain-direction",
    }
    # topk gives no labels: its exemplars alone are judged, against the world's truth
    assert set(summary[summary["method"] == "topk"]["metric"]) == {"exemplar_precision"}
    assert (results / "evaluation" / "summary.csv").exists()
    named = summary[summary["metric"] == "class_named"].set_index("method")
    # TExplain's LM here is trained for seconds on 48 captions: its run is a smoke test
    named = named.drop(index=["texplain-exemplars"], errors="ignore")
    # both name the output neurons' class, far above their shuffled control
    assert (named["mean"] >= 6 / 7).all() and (named["difference"] > 0.5).all(), named
    neurons = pd.read_parquet(results / "evaluation" / "neurons.parquet")
    assert neurons.loc[neurons["value"].isna(), "reason"].notna().all()
    log = (results / "logs" / "evaluation_summary.log").read_text()
    assert "simulation_r" in log and "shuffled" in log


def test_demo_captions_and_concepts_come_from_the_world(finished: tuple[Path, Path]) -> None:
    results = finished[0] / "results" / "demo"
    exemplars = pd.read_parquet(results / "exemplars" / "shapenet" / "fc" / "0000.parquet")
    captions = pd.read_parquet(results / "captions" / "shapenet" / "fc" / "0000.parquet")
    assert len(captions) == len(exemplars) == 7 * 5
    assert (captions["captioner"] == "annotations").all()
    assert captions["caption"].str.len().gt(0).all()
    concepts = pd.read_parquet(results / "concepts" / "shapenet" / "fc" / "0000.parquet")
    assert list(concepts["neuron"]) == list(range(7)) and (concepts["status"] == "ok").all()
    assert concepts["candidates"].map(len).between(1, 5).all()
    assert concepts["llm_requests"].sum() == 0
    # the output neurons' candidates mostly name their class (the world's shape words)
    named = [shape in list(c) for shape, c in zip(SHAPES, concepts["candidates"], strict=True)]
    assert sum(named) >= 5, list(concepts["candidates"])
    log = (results / "logs" / "captions" / "shapenet" / "conv2" / "0000.log").read_text()
    assert "distinct" in log and "captioned by annotations" in log


def test_the_workflow_trains_the_demo_target_to_the_accuracy_target(
    finished: tuple[Path, Path],
) -> None:
    results = finished[0] / "results" / "demo"
    metrics = json.loads((results / "models" / "shapenet.metrics.json").read_text())
    assert metrics["holdout_accuracy"] >= 0.9 and metrics["holdout_images"] == 600
    log = (results / "logs" / "train_demo_target" / "shapenet.log").read_text()
    assert f"held-out accuracy {metrics['holdout_accuracy']:.3f} on 600 images" in log
    # the trained output layer ranks images of its own class first
    table = pd.read_parquet(results / "descriptions.parquet")
    table = table[table.method == "topk"].set_index(["layer", "neuron"])
    labels = pd.read_parquet(results / "probe" / "manifest.parquet").set_index("image_id")["label"]
    top_is_own_class = [
        labels[table.loc[("fc", n), "exemplar_ids"][0]] == shape for n, shape in enumerate(SHAPES)
    ]
    assert sum(top_is_own_class) >= 6, top_is_own_class
    rows = pd.read_parquet(results / "evaluation" / "neurons.parquet")

    def metric(name: str, method: str, layer: str) -> pd.DataFrame:
        return rows[(rows.metric == name) & (rows.method == method) & (rows.layer == layer)]

    output = metric("exemplar_precision", "topk", "fc").sort_values("neuron")
    assert list(output["truth"]) == [f"shape:{s}" for s in SHAPES]
    assert output["value"].mean() >= 0.7
    # topk gives no labels: only its exemplars are judged
    assert set(rows[rows.method == "topk"]["metric"]) == {"exemplar_precision"}
    # Describe-and-Dissect names the class of the output neurons (the demo's target: >= 90%)
    named = metric("truth_named", "dnd", "fc")
    assert len(named) == 7 and named["value"].mean() >= 0.9, list(named["value"])
    similar = metric("truth_text_similarity", "dnd", "fc")["value"]
    assert similar.between(-1, 1.0001).all() and similar.mean() > 0.5
    hidden = metric("truth_named", "dnd", "conv2")
    assert len(hidden) == 32 and hidden["truth"].str.contains(":").all()


def test_texplain_trains_a_translator_and_describes_neurons_and_classes(
    finished: tuple[Path, Path],
) -> None:
    workdir, _ = finished
    results = workdir / "results" / "demo"
    models = results / "texplain_models" / "shapenet"
    metrics = json.loads((models / "metrics.json").read_text())
    assert metrics["best_val_loss"] < metrics["first_val_loss"]
    loss = pd.read_csv(models / "loss.csv")
    assert set(loss["split"]) == {"train", "validation"}
    assert (models / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = pd.read_parquet(results / "descriptions.parquet")
    direction = table[table.method == "texplain-direction"]
    assert set(direction["layer"]) == {"conv3"} and len(direction) == 8
    details = pd.read_parquet(results / "descriptions" / "texplain.parquet")
    assert set(details["mode"]) == {"exemplars", "direction"}
    ok = details.merge(table[table.status == "ok"][KEY], on=KEY)
    assert (ok["sentences"] > 0).all() and ok["words"].map(len).gt(0).all()
    used = json.loads(table[table.method == "texplain-exemplars"]["models"].iloc[0])
    assert used["lm"].endswith("texplain_models/lm") and used["captioner"] == "annotations"
    classes = pd.read_parquet(results / "texplain" / "classes.parquet")
    assert set(classes["by"]) == {"predicted", "label"} and set(classes["model"]) == {"shapenet"}
    reference = pd.read_parquet(models / "reference.parquet")
    assert len(reference) == 20 and reference["sentences"].map(len).eq(8).all()


def test_tellme_explains_from_captions_and_from_weights(finished: tuple[Path, Path]) -> None:
    results = finished[0] / "results" / "demo"
    table = pd.read_parquet(results / "descriptions.parquet")
    details = pd.read_parquet(results / "descriptions" / "tellme.parquet")
    assert len(details) == 47 + 8 and set(details["variant"]) == {"activations", "weights"}
    activations = table[table.method == "tellme-activations"]
    assert (activations["status"] == "ok").all() and activations["label"].notna().all()
    assert json.loads(activations["models"].iloc[0])["simulator"] == "annotations"
    # scored on held-out images only, chosen on one part and reported on the other
    with h5py.File(results / "activations" / "shapenet" / "conv3.h5", "r") as h5:
        held = set(h5["image_ids"][:][h5["heldout"][:]].astype(str))
    shown = pd.read_parquet(results / "tellme_captions" / "shapenet" / "conv3" / "0000.parquet")
    assert not held & set(shown.loc[shown["part"] == "explain", "image_id"])
    assert set(shown.loc[shown["part"] != "explain", "image_id"]) <= held
    # from weights: each conv3 channel is named by a class its weights to fc favour
    weights = pd.read_parquet(results / "tellme_weights" / "shapenet" / "conv3.parquet")
    by_neuron = weights.set_index("neuron")
    named = table[(table.method == "tellme-weights") & (table.status == "ok")]
    assert len(named) >= 6
    for _, row in named.iterrows():
        classes = dict(
            zip(
                by_neuron.loc[row.neuron, "classes"],
                by_neuron.loc[row.neuron, "weights"],
                strict=True,
            )
        )
        assert classes[row.label] == max(classes.values()), (row.neuron, row.label, classes)
    failed = table[(table.method == "tellme-weights") & (table.status == "failed")]
    assert failed["error"].str.contains("votes against").all()
    # the output neurons' class is named, far above the shuffled control
    summary = pd.read_parquet(results / "evaluation" / "summary.parquet")
    fc = summary[(summary.method == "tellme-activations") & (summary.metric == "class_named")]
    assert fc["mean"].iloc[0] >= 6 / 7 and fc["difference"].iloc[0] > 0.5


def test_complete_rerun_does_nothing_and_a_deleted_chunk_reruns_alone(
    finished: tuple[Path, Path], job_env: dict[str, str]
) -> None:
    workdir, config = finished
    again = run_snakemake(workdir, config, env=job_env)
    assert "Nothing to be done" in again.stdout + again.stderr

    results = workdir / "results" / "demo"
    before = pd.read_parquet(results / "descriptions.parquet")
    chunk = results / "exemplars" / "shapenet" / "conv2" / "0001.parquet"
    other = results / "exemplars" / "shapenet" / "conv2" / "0000.parquet"
    shard = results / "activations" / "shapenet" / "shard-0000.h5"
    stamps = (other.stat().st_mtime_ns, shard.stat().st_mtime_ns)
    chunk.unlink()
    dry = run_snakemake(workdir, config, "-n", env=job_env)
    assert _job_counts(dry.stdout + dry.stderr) == {
        "exemplars": 1,
        "captions": 1,
        "concepts": 1,
        "synthesis": 1,
        "scores": 1,
        "texplain": 1,
        "describe": 1,
        "evaluate_layer": 3,  # each reads the rewritten table; unchanged labels come from its cache
        "evaluation_summary": 1,
        "report": 1,
        "all": 1,
    }
    run_snakemake(workdir, config, env=job_env)
    assert chunk.exists()
    assert (other.stat().st_mtime_ns, shard.stat().st_mtime_ns) == stamps
    pd.testing.assert_frame_equal(pd.read_parquet(results / "descriptions.parquet"), before)

    # deleted activation files are rebuilt too: a merged layer file, then a shard
    layer = results / "activations" / "shapenet" / "fc.h5"
    layer.unlink()
    dry = run_snakemake(workdir, config, "-n", env=job_env)
    counts = _job_counts(dry.stdout + dry.stderr)
    assert counts["merge_activations"] == 1 and "activations" not in counts
    run_snakemake(workdir, config, env=job_env)
    assert layer.exists()
    pd.testing.assert_frame_equal(pd.read_parquet(results / "descriptions.parquet"), before)
    kept = shard.with_name("kept.h5")
    shutil.copy2(shard, kept)
    shard.unlink()
    dry = run_snakemake(workdir, config, "-n", env=job_env)
    counts = _job_counts(dry.stdout + dry.stderr)
    assert counts["activations"] == 1 and counts["merge_activations"] == 3
    kept.rename(shard)  # as it was (same bytes and time): the tests below start from a whole run


def test_a_changed_setting_reruns_the_jobs_it_changes_and_no_others(
    finished: tuple[Path, Path], job_env: dict[str, str], tmp_path: Path
) -> None:
    workdir, config = finished
    cfg = yaml.safe_load(config.read_text())
    # a setting of the scores only: their jobs and what reads them, nothing upstream
    changed = tmp_path / "beta.yaml"
    scoring = cfg["dnd"]["scoring"] | {"beta": 3}
    changed.write_text(yaml.safe_dump(cfg | {"dnd": cfg["dnd"] | {"scoring": scoring}}))
    dry = run_snakemake(workdir, changed, "-n", env=job_env)
    assert _job_counts(dry.stdout + dry.stderr) == {
        "scores": 4,
        "describe": 1,
        "evaluate_layer": 3,
        "evaluation_summary": 1,
        "report": 1,
        "all": 1,
    }
    assert "Params have changed since last execution" in dry.stdout + dry.stderr
    # a setting of speed, not of results: nothing to redo
    faster = tmp_path / "batch.yaml"
    faster.write_text(yaml.safe_dump(cfg | {"batch_size": 7}))
    dry = run_snakemake(workdir, faster, "-n", env=job_env)
    assert "Nothing to be done" in dry.stdout + dry.stderr


def test_plan_prints_a_summary_and_writes_plan_json(
    finished: tuple[Path, Path], job_env: dict[str, str]
) -> None:
    workdir, config = finished
    proc = run_snakemake(workdir, config, "plan", env=job_env)
    assert "neuroscribe plan for run 'demo'" in proc.stdout
    assert re.search(r"conv2\s+32 of\s+32\s+in 2 chunk\(s\) of ≤16", proc.stdout)
    assert re.search(r"activations\s+3", proc.stdout)
    plan = json.loads((workdir / "results" / "demo" / "plan.json").read_text())
    assert plan["neurons"] == 47 and plan["probe"]["files"] == 60 and plan["probe"]["shards"] == 3
    assert plan["jobs"] == JOBS
    split = plan["split"]
    assert split["exact"] and split["images"] == 60 and 0 < split["heldout"] < 30
    assert f"{split['heldout']} of 60 probe images held out (20%" in proc.stdout
    observed = plan["estimates"]["dnd"]["synthesis"]["observed"]
    assert observed["neurons"] == 47 and observed["distinct_prompts"] <= observed["candidates"]
    assert observed["images"] == observed["distinct_prompts"] * 10
    assert plan["estimates"]["dnd"]["exemplars_to_caption"] == 47 * 5
    assert plan["estimates"]["dnd"]["llm"]["requests"] == 0  # backend none
    assert "exemplars to caption: ≤235 images and crops" in proc.stdout
    tellme = plan["estimates"]["tellme"]
    assert tellme["llm"]["requests"] == 0 and tellme["images_to_caption"] <= 60
    assert plan["layers"]["shapenet"]["conv3"]["tellme"]["variants"] == ["activations", "weights"]
    assert "images to caption: ≤" in proc.stdout


def test_wrong_layer_fails_the_dry_run_listing_valid_names(
    tmp_path: Path, job_env: dict[str, str]
) -> None:
    config = _config(tmp_path)
    cfg = yaml.safe_load(config.read_text())
    cfg["targets"][0]["layers"] = ["conv2", "conv_3"]
    config.write_text(yaml.safe_dump(cfg))
    proc = run_snakemake(tmp_path, config, "-n", env=job_env, check=False)
    assert proc.returncode != 0
    assert (
        "target 'shapenet' (python:neuroscribe.demo.cnn:tiny_cnn) has no layer 'conv_3'. "
        "Valid layer names, closest first: conv3, conv1.3, conv2.3, conv3.0"
    ) in proc.stdout + proc.stderr
    assert not (tmp_path / "results" / "demo" / "probe").exists()


def test_bad_config_value_fails_the_dry_run(tmp_path: Path, job_env: dict[str, str]) -> None:
    proc = run_snakemake(tmp_path, _config(tmp_path, top_k=0), "-n", env=job_env, check=False)
    assert proc.returncode != 0
    assert "config key 'top_k': 0 is less than the minimum of 1" in proc.stdout + proc.stderr


def test_the_full_pipeline_on_tiny_foundation_models(tmp_path: Path) -> None:
    """A tiny config on the real backends: a tiny BLIP from a local folder captions the exemplars,
    the concepts come from an OpenAI-compatible server through the `openai` client, a tiny Stable
    Diffusion draws them through diffusers and a tiny CLIP compares images."""
    from fake_openai import any_method, fake_openai
    from tiny_blip import build_tiny_blip
    from tiny_diffusion import build_tiny_clip, build_tiny_sd

    blip = build_tiny_blip(tmp_path / "blip")
    sd = build_tiny_sd(tmp_path / "sd")
    clip = build_tiny_clip(tmp_path / "clip")
    cfg = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    cfg["targets"] = cfg["targets"][:1]
    cfg["targets"][0].pop("train")  # random weights are enough to test the plumbing
    cfg["targets"][0]["layers"] = ["conv2"]
    cfg["probe"]["datasets"][0]["n_images"] = 40
    # TExplain's demo LM speaks the demo world's words only, not a random BLIP's
    cfg["methods"] = ["topk", "dnd", "clipdissect", "tellme"]
    cfg |= {"run": "tiny", "shard_size": 40, "chunk_size": 16, "top_k": 4}
    cfg["captioner"] = {"backend": "blip", "model": str(blip), "max_new_tokens": 6}
    cfg["dnd"] = {
        "neurons_per_request": 4,
        "synthesizer": {
            "backend": "diffusers",
            "model": str(sd),
            "steps": 2,
            "size": 32,
            "images_per_concept": 2,
            "batch_size": 16,
        },
        "scoring": {"similarity": {"backend": "clip", "model": str(clip)}},
    }
    cfg["resources"] |= {"synthesis": {"gpus": 0}, "scores": {"gpus": 0}}
    # TeLLMe on the same captioner and server: explanations and an LLM simulator
    cfg["tellme"] = {"simulator": {"backend": "llm"}}
    env = workflow_env() | {"NEUROSCRIBE_TEST_KEY": "sk-never-logged-42"}

    def dnd_requests() -> int:
        return sum("captions of its top images" in str(b["messages"]) for b in server.requests)

    with fake_openai(default=any_method) as server:
        cfg["llm"] = {
            "backend": "openai",
            "model": "fake-model",
            "base_url": server.base_url,
            "api_key_env": "NEUROSCRIBE_TEST_KEY",
        }
        config = tmp_path / "config.yaml"
        config.write_text(yaml.safe_dump(cfg))
        run_snakemake(tmp_path, config, env=env)
        results = tmp_path / "results" / "tiny"
        assert dnd_requests() == 32 // 4  # one request per 4 neurons
        concepts = pd.concat(
            pd.read_parquet(p) for p in sorted((results / "concepts").rglob("*.parquet"))
        )
        captions = pd.concat(
            pd.read_parquet(p) for p in sorted((results / "captions").rglob("*.parquet"))
        )
        assert len(concepts) == 32 and (concepts["status"] == "ok").all()
        assert concepts["candidates"].map(len).ge(1).all()
        assert concepts["llm_requests"].sum() == 8
        assert len(captions) == 32 * 4 and captions["captioner"].str.startswith("blip:").all()
        # the concepts summarise the BLIP captions they were given
        first = concepts.iloc[0]
        assert list(first["captions"]) == list(captions[captions.neuron == 0]["caption"])
        table = pd.read_parquet(results / "descriptions.parquet")
        dnd = table[table.method == "dnd"]
        assert len(dnd) == 32 and dnd["label"].notna().all()
        details = pd.read_parquet(results / "descriptions" / "dnd.parquet").set_index(KEY)
        assert all(
            row["label"] in list(details.loc[tuple(row[KEY])]["candidates"])
            for _, row in dnd.iterrows()
        )
        models = json.loads(dnd["models"].iloc[0])
        assert models["synthesizer"] == (
            f"diffusers:{sd}:steps=2:guidance=7.5:size=32:scheduler=default:dtype=float32"
        )
        assert models["similarity"] == f"clip:{clip}:float32"
        assert models["llm"] == f"batched:openai:{server.base_url}:fake-model"
        assert models["captioner"].startswith(f"blip:{blip}:")
        synthesis = pd.concat(
            pd.read_parquet(p) for p in sorted((results / "synthesis").rglob("*.parquet"))
        )
        stored = list((results / "images").rglob("*.png"))
        # each distinct concept of the run drawn once, 2 images each, shared across chunks
        assert len(stored) == 2 * synthesis["concept"].nunique()
        # a lost concepts file is rebuilt from the LLM cache (no new request), and its concepts
        # are redrawn from the image store (no new image)
        (results / "concepts" / "shapenet" / "conv2" / "0001.parquet").unlink()
        asked = len(server.requests)
        run_snakemake(tmp_path, config, env=env)
        assert dnd_requests() == 8 and len(server.requests) == asked
        assert len(list((results / "images").rglob("*.png"))) == len(stored)
        synth_log = results / "logs" / "synthesis" / "shapenet" / "conv2" / "0001.log"
        assert " 0 drawn now" in synth_log.read_text()
        # TeLLMe: one explainer request per neuron (3 choices), then a simulation per candidate
        explainers = [b for b in server.requests if b.get("n") == 3]
        simulations = [b for b in server.requests if b.get("logprobs")]
        assert len(explainers) == 32 and 0 < len(simulations) <= 32 * 3
    tellme = table[table.method == "tellme-activations"]
    assert len(tellme) == 32 and (tellme["status"] == "ok").all()
    models = json.loads(tellme["models"].iloc[0])
    assert models["captioner"].startswith(f"blip:{blip}:") and models["simulator"].startswith(
        "llm:"
    )
    rows = pd.read_parquet(results / "descriptions" / "tellme.parquet")
    assert set(rows["simulation_reading"]) == {"expected-value"}
    assert rows["candidates"].map(len).eq(3).all()
    logs = "".join(p.read_text() for p in (results / "logs").rglob("*.log"))
    assert "sk-never-logged-42" not in logs
    rerun_log = results / "logs" / "concepts" / "shapenet" / "conv2" / "0001.log"
    assert "16 neurons (0 failed), 0 requests, 4 cache hits" in rerun_log.read_text()


def test_a_run_where_every_neuron_failed_fails_and_the_fixed_server_is_asked_again(
    tmp_path: Path, job_env: dict[str, str]
) -> None:
    """The LLM server's replies are valid JSON in the wrong shape (and so are the repairs):
    the concepts job fails, naming why; once the server is fixed, the next run asks for those
    neurons again (the unusable replies are not served from the cache) and succeeds."""
    from fake_openai import Reply, fake_openai, labeller

    cfg = yaml.safe_load(_config(tmp_path).read_text())
    cfg["targets"][0].pop("train")  # random weights: the plumbing is under test
    cfg["targets"][0]["layers"] = [{"name": "fc", "neurons": "all"}]
    cfg["methods"] = ["topk", "dnd"]  # the server speaks to Describe-and-Dissect only
    with fake_openai(default=lambda body: Reply(json.dumps({"labels": ["x"]}))) as server:
        cfg["llm"] = {"backend": "openai", "model": "m", "base_url": server.base_url}
        cfg["llm"]["api_key_env"] = None
        config = tmp_path / "config.yaml"
        config.write_text(yaml.safe_dump(cfg))
        # the local profile, as a user runs it: a failed job's log is shown
        profile = ("--profile", str(REPO / "profiles" / "local"))
        failed = run_snakemake(tmp_path, config, *profile, env=job_env, check=False)
        assert failed.returncode != 0
        out = failed.stdout + failed.stderr
        assert "7 of 7 neurons failed, more than max_failed_fraction (0.2) allows" in out
        assert len(server.requests) == 14  # a request and a repair per neuron
        results = tmp_path / "results" / "demo"
        assert not (results / "descriptions.parquet").exists()
        server.default = labeller
        fixed = run_snakemake(tmp_path, config, *profile, env=job_env)
        assert len(server.requests) == 14 + 7
    assert "dnd: 7 of 7 neurons described" in fixed.stdout + fixed.stderr
    table = pd.read_parquet(results / "descriptions.parquet")
    assert (table["status"] == "ok").all() and table[table.method == "dnd"]["label"].notna().all()
