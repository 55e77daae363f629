"""The method registry: a method registered from outside the package (tests/plugin, through the
`neuroscribe.methods` entry-point group) is validated, planned, run and merged like a built-in.

The fast tests cover the registry, config sections, the plan, the CLI's argument checks and the
final-table merge in-process; the slow one runs the plug-in through the real workflow."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from conftest import REPO, run_snakemake, workflow_env
from neuroscribe import cli, methods
from neuroscribe.config import ConfigError, validate_config
from neuroscribe.fanout import build_layout
from neuroscribe.plan import build_plan, format_plan

PLUGIN = Path(__file__).parent / "plugin" / "frequent_caption"
DEMO = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())


def install_plugin(site: Path) -> Path:
    """The plug-in as an installed distribution would leave it on sys.path: its package and a
    .dist-info whose entry_points.txt registers it (what `pip install` of a package with
    `[project.entry-points."neuroscribe.methods"]` writes)."""
    shutil.copytree(PLUGIN, site / "frequent_caption")
    info = site / "frequent_caption-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: frequent-caption\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[neuroscribe.methods]\nfrequent = frequent_caption:METHOD\n"
    )
    return site


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    site = install_plugin(tmp_path / "site")
    monkeypatch.syspath_prepend(str(site))
    methods.registered.cache_clear()
    methods.get.cache_clear()
    yield site
    sys.modules.pop("frequent_caption", None)
    methods.registered.cache_clear()
    methods.get.cache_clear()


def small_demo(**top: Any) -> dict[str, Any]:
    cfg = copy.deepcopy(DEMO)
    cfg["targets"] = cfg["targets"][:1]  # the clean CNN (the second has a planted shortcut)
    cfg["targets"][0].pop("train")  # random weights: nothing here needs trained ones
    cfg["probe"]["datasets"][0]["n_images"] = 40
    cfg |= {"shard_size": 40, "chunk_size": 16, "top_k": 4} | top
    cfg["targets"][0]["layers"] = ["conv2", {"name": "fc", "neurons": "all"}]
    return cfg


# -- registry and config ----------------------------------------------------------------------


def test_built_in_methods_are_registered() -> None:
    assert list(methods.registered())[:2] == ["topk", "dnd"]
    dnd = methods.get("dnd")
    assert [s.name for s in dnd.stages] == ["captions", "concepts", "synthesis", "scores"]
    assert dnd.rules == REPO / "workflow" / "rules" / "dnd.smk" and dnd.rules.is_file()
    assert dnd.details_schema is not None and dnd.details_schema.is_file()


def test_an_unknown_method_lists_the_registered_ones() -> None:
    with pytest.raises(ConfigError) as err:
        validate_config(small_demo(methods=["topk", "netdissect"]))
    assert str(err.value) == (
        "config key 'methods[1]': 'netdissect' is not allowed; allowed values: topk, dnd, "
        "clipdissect, tellme, texplain"
    )


def test_a_plugin_registers_through_its_entry_point(plugin: Path) -> None:
    assert methods.registered()["frequent"] == "frequent_caption:METHOD"
    cfg = validate_config(small_demo(methods=["topk", "frequent"]))
    # its config section and its stage's resources get their defaults from its own schema
    assert cfg["frequent"] == {"min_count": 1}
    assert cfg["resources"]["frequent_label"] == {
        "mem_mb": 1000,
        "runtime": 10,
        "cpus": 1,
        "gpus": None,
    }
    with pytest.raises(ConfigError, match=r"'frequent\.min_count': 0 is less than the minimum"):
        validate_config(small_demo(methods=["frequent"], frequent={"min_count": 0}))


def test_a_plugin_that_cannot_be_loaded_is_named(plugin: Path) -> None:
    (plugin / "frequent_caption" / "__init__.py").write_text("import no_such_module\n")
    with pytest.raises(methods.MethodLoadError) as err:
        validate_config(small_demo())
    assert str(err.value).startswith(
        "method 'frequent' is registered as 'frequent_caption:METHOD' but cannot be loaded "
        "(No module named 'no_such_module'); fix or uninstall the package that registers it"
    )


def test_the_plan_counts_each_methods_stages(plugin: Path, tmp_path: Path) -> None:
    cfg = small_demo(methods=["topk", "dnd", "frequent"])
    layout = build_layout(cfg, tmp_path / "results")
    plan = build_plan(layout, cfg)
    chunks = 2 + 1  # conv2: 32 neurons in chunks of 16; fc: 7
    assert {k: plan["jobs"][k] for k in ("exemplars", "captions", "scores", "frequent_label")} == {
        "exemplars": chunks,
        "captions": chunks,
        "scores": chunks,
        "frequent_label": chunks,
    }
    assert plan["stage_order"].index("frequent_label") > plan["stage_order"].index("scores")
    assert plan["estimates"]["dnd"]["exemplars_to_caption"] == 39 * 4
    assert plan["layers"]["shapenet"]["fc"]["dnd"]["exemplars_to_caption"] == 7 * 4
    text = format_plan(plan)
    assert "frequent_label" in text and "exemplars to caption: ≤156 images" in text


# -- the CLI ----------------------------------------------------------------------------------


def test_the_cli_runs_each_registered_stage(plugin: Path) -> None:
    known = cli.stages()
    assert known["scores"] == "neuroscribe.methods.dnd.stages:score_chunk"
    assert known["frequent_label"] == "frequent_caption:label_chunk"
    assert known["manifest"] == "neuroscribe.probe:build_manifest"


@pytest.mark.parametrize(
    ("stage", "args", "message"),
    [
        (
            "merge",
            {"shards": [], "target": {}, "layer": {}, "out": "x.h5", "topk": 5},
            "error: stage 'merge': unknown argument 'topk'; it takes shards, target, layer, "
            "out, top_k, holdout\n",
        ),
        (
            "concepts",
            {"captions": "c.parquet", "out": "o.parquet", "llm": {}, "cache": "c"},
            "error: stage 'concepts': missing argument 'proposal'\n",
        ),
    ],
)
def test_a_wrong_stage_argument_names_the_stage_and_the_key(
    stage: str, args: dict[str, Any], message: str, tmp_path: Path
) -> None:
    # checked before anything is loaded or written: the stage's output is never started
    proc = subprocess.run(
        [sys.executable, "-m", "neuroscribe", stage, json.dumps(args)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert (proc.returncode, proc.stderr) == (2, message)
    assert not list(tmp_path.iterdir())


def test_stage_arguments_become_the_records_the_function_takes() -> None:
    from neuroscribe.config import LayerSpec, TargetSpec

    function = cli.stage_function(cli.CORE_STAGES["merge"])
    target = {
        "name": "net",
        "spec": "python:neuroscribe.demo.cnn:tiny_cnn",
        "weights": None,
        "transform": {"resize": 64, "crop": 64, "mean": [0.5] * 3, "std": [0.5] * 3},
        "layers": [{"name": "fc", "neurons": "all", "pooling": "avg", "tokens": "cls"}],
    }
    kwargs = cli.bind(
        "merge",
        function,
        {
            "shards": ["a.h5"],
            "target": target,
            "layer": target["layers"][0],
            "out": "o",
            "top_k": 3,
        },
    )
    assert isinstance(kwargs["target"], TargetSpec) and isinstance(kwargs["layer"], LayerSpec)
    assert kwargs["target"].layer("fc") == kwargs["layer"] and kwargs["shards"] == ["a.h5"]


def test_a_stage_whose_types_cannot_be_resolved_is_refused() -> None:
    def stage(target: NotImportedSpec) -> None:  # noqa: F821
        pass

    with pytest.raises(cli.StageArgumentError, match=r"stage 'x': the annotations of .*stage"):
        cli.bind("x", stage, {"target": {}})


# -- the final table --------------------------------------------------------------------------


def test_each_method_adds_its_rows_and_its_details_table(plugin: Path, tmp_path: Path) -> None:
    from neuroscribe.describe import write_descriptions

    key = {"model": "m", "layer": "conv"}
    exemplars = tmp_path / "exemplars.parquet"
    pd.DataFrame(
        [
            key
            | {"neuron": n, "rank": r, "image_id": f"i{n}{r}", "row": r, "box": None}
            | {"activation": 1.0 - r / 10}
            for n in (0, 1)
            for r in (0, 1, 2)
        ]
    ).to_parquet(exemplars)
    labels = tmp_path / "frequent_label.parquet"
    pd.DataFrame(
        [
            key | {"neuron": 0, "caption": "a red square", "count": 2, "error": None},
            key | {"neuron": 1, "caption": None, "count": 1, "error": "no caption is shared"},
        ]
    ).to_parquet(labels)
    out = tmp_path / "descriptions.parquet"
    details = {"parquet": tmp_path / "frequent.parquet", "csv": tmp_path / "frequent.csv"}
    write_descriptions(
        [exemplars],
        {"topk": {}, "frequent": {"frequent_label": [labels]}},
        {"m": "python:x:y"},
        ["topk", "frequent"],
        out,
        tmp_path / "descriptions.csv",
        {"frequent": details},
    )
    table = pd.read_parquet(out).set_index(["method", "neuron"])
    assert table.loc[("frequent", 0), "label"] == "a red square"
    assert table.loc[("frequent", 1), "status"] == "failed"
    assert list(table.loc[("topk", 0), "exemplar_ids"]) == ["i00", "i01", "i02"]
    assert pd.isna(table.loc[("topk", 1), "label"])
    own = pd.read_parquet(details["parquet"])
    assert list(own.columns) == ["model", "layer", "neuron", "count"]
    assert list(own["count"]) == [2, 1]
    assert (
        len(pd.read_csv(details["csv"])) == 2
        and len(pd.read_csv(tmp_path / "descriptions.csv")) == 4
    )


# -- the plug-in through the workflow ---------------------------------------------------------


@pytest.mark.slow
def test_a_plugin_method_runs_through_the_workflow(tmp_path: Path) -> None:
    """No file of neuroscribe changes: the method is on PYTHONPATH with its entry point."""
    site = install_plugin(tmp_path / "site")
    # whole images only, so each exemplar's caption is its image's annotation
    cfg = small_demo(methods=["topk", "frequent"], frequent={"min_count": 1}, crops=False)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = workflow_env()
    env["PYTHONPATH"] = f"{site}:{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(site)
    proc = run_snakemake(tmp_path, config, env=env)
    results = tmp_path / "results" / "demo"
    table = pd.read_parquet(results / "descriptions.parquet")
    assert set(table["method"]) == {"topk", "frequent"}
    frequent = table[table.method == "frequent"].set_index(["layer", "neuron"])
    assert len(frequent) == 32 + 7
    # each label is the caption most of its exemplars share, as the demo world annotates them
    world = results / "probe" / "demo" / "world"
    annotations = pd.read_parquet(world / "annotations.parquet")
    caption_of = dict(zip(annotations["relpath"], annotations["caption"], strict=True))
    manifest = pd.read_parquet(results / "probe" / "manifest.parquet")
    relpath = {
        i: str(Path(p).relative_to((world / "images").resolve()))
        for i, p in zip(manifest["image_id"], manifest["path"], strict=True)
    }
    details = pd.read_parquet(results / "descriptions" / "frequent.parquet")
    assert len(details) == len(frequent)
    for _, row in frequent.iterrows():
        captions = [caption_of[relpath[i]] for i in row["exemplar_ids"]]
        best, count = Counter(captions).most_common(1)[0]  # ties: the higher-ranked first
        assert (row["status"], row["label"], row["score"]) == ("ok", best, count)
    assert "frequent: 39 of 39 neurons described" in proc.stderr
    # the report shows its labels and, as it has no `report` hook, its details rows as a table
    page = (results / "report" / "neurons" / "shapenet" / "fc" / "3.html").read_text()
    assert "<h2>frequent</h2>" in page
    label = frequent.loc[("fc", 3), "label"]
    assert f'<td class="label">{label}</td>' in page and "<th>count</th>" in page
