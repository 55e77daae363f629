"""The report (neuroscribe.report), built from a small synthetic run that benchmarks/report.py
writes as the workflow would: pages, escaping of untrusted labels, thumbnails made once, images
that cannot be shown, the plan-against-spent figures; the layer page in headless Chromium. The
demo's own report is opened in Chromium by tests/test_workflow.py."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pandas as pd
from browser import broken_images, chrome, console_errors, needs_chromium, open_page, screenshot

from conftest import REPO
from neuroscribe.report import figures
from neuroscribe.report.build import build_report

# the benchmark's synthetic run, loaded by path (benchmarks/ is not a package)
_spec = importlib.util.spec_from_file_location("report_bench", REPO / "benchmarks" / "report.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

SCRIPT = "<script>alert(1)</script>"
ATTRIBUTE = '"><img src=x onerror=alert(2)>'


def _run(tmp_path: Path, **changes) -> dict:
    root = tmp_path / "results" / "synthetic"
    return bench.synthetic_run(root, neurons=12, probe_images=30, drawn_concepts=20, **changes)


def _report(stage: dict) -> Path:
    build_report(**stage)
    return Path(stage["out"]).parent


def _thumbs(report: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in (report / "thumbs").rglob("*.jpg")}


def test_every_page_is_written_and_links_to_files_that_exist(tmp_path: Path) -> None:
    report = _report(_run(tmp_path))
    layer = report / "layers" / "synthetic" / "layer4.html"
    pages = sorted((report / "neurons" / "synthetic" / "layer4").glob("*.html"))
    assert (report / "index.html").is_file() and layer.is_file()
    assert len(pages) == 12
    assert (report / "plots" / "synthetic" / "layer4.evaluation.png").stat().st_size > 1000
    assert (
        (report / "plots" / "synthetic" / "layer4.evaluation.svg").read_text().startswith("<?xml")
    )
    for page in [report / "index.html", layer, *pages]:
        html = page.read_text()
        assert "data:image" not in html  # thumbnails are files, never inlined
        for link in re.findall(r'(?:src|href)="([^"#:]+)"', html):
            assert (page.parent / link).resolve().is_file(), (page, link)
    neuron = pages[0].read_text()
    # the exemplars with their crop boxes, the histogram, and each method's part
    assert neuron.count('class="box"') == 4  # boxes on exemplars 0, 3, 6, 9
    assert "<svg" in neuron and 'class="mark"' in neuron
    assert "<h2>dnd</h2>" in neuron and "<h2>tellme</h2>" in neuron
    assert "drawn for" in neuron  # DnD's candidates with their images
    assert "simulation_r" in neuron  # the neuron's evaluation rows


def test_labels_that_are_html_render_as_text(tmp_path: Path) -> None:
    report = _report(_run(tmp_path, labels={3: SCRIPT, 4: ATTRIBUTE}))
    for neuron, label in ((3, SCRIPT), (4, ATTRIBUTE)):
        html = (report / "neurons" / "synthetic" / "layer4" / f"{neuron}.html").read_text()
        assert label not in html
        escaped = label.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        assert escaped.replace('"', "&#34;") in html
    # the layer page's data is a string in a script file, shown through textContent
    data = (report / "layers" / "synthetic" / "layer4.data.js").read_text()
    assert '"<script>alert(1)</script>"' in data
    assert ".innerHTML" not in (report / "static" / "layer.js").read_text()


def test_a_rebuild_with_one_more_method_makes_no_new_thumbnail(tmp_path: Path) -> None:
    report = _report(_run(tmp_path, methods=("dnd", "tellme")))
    before = _thumbs(report)
    page = report / "neurons" / "synthetic" / "layer4" / "0.html"
    assert before and "texplain" not in page.read_text()

    # TExplain's rows arrive: the pages show them, every thumbnail is reused untouched
    report = _report(_run(tmp_path))
    assert _thumbs(report) == before
    assert "<h2>texplain</h2>" in page.read_text()

    # nothing changed: no page is rewritten
    pages = {p: p.stat().st_mtime_ns for p in report.rglob("*.html") if p.name != "index.html"}
    report = _report(_run(tmp_path))
    assert {p: p.stat().st_mtime_ns for p in pages} == pages


def test_an_image_that_cannot_be_shown_is_named_on_the_index(tmp_path: Path) -> None:
    stage = _run(tmp_path)
    table = pd.read_parquet(stage["descriptions"])
    manifest = pd.read_parquet(stage["manifest"]).set_index("image_id")
    first = table["exemplar_ids"].iloc[0][0]
    Path(manifest.loc[first, "path"]).unlink()
    report = _report(stage)
    index = (report / "index.html").read_text()
    assert "Images not shown" in index and manifest.loc[first, "path"] in index
    assert "image missing" in (report / "neurons" / "synthetic" / "layer4" / "0.html").read_text()


def test_the_plan_and_what_was_spent(tmp_path: Path) -> None:
    plan = {
        "total_jobs": 12,
        "estimates": {
            "dnd": {
                "llm": {"requests": 40, "prompt_tokens": 9000, "completion_tokens": 800},
                "synthesis": {"images_at_most": 500, "observed": {"images": 120}},
            },
            "texplain": {"llm_requests": 7},
            "tellme": {"llm": {"requests": 0}, "observed": {"requests": 99}},
        },
    }
    figures_ = figures.plan_figures(plan)
    assert figures_ == {
        "jobs": 12,
        "llm": {
            "dnd": {"requests": 40, "prompt_tokens": 9000, "completion_tokens": 800},
            "texplain": {"requests": 7},
            "tellme": {"requests": 0},
        },
        "images_at_most": 500,
        "gpu_hours": None,
    }
    chunk = tmp_path / "concepts" / "m" / "l" / "0000.parquet"
    chunk.parent.mkdir(parents=True)
    pd.DataFrame(
        {
            "neuron": [0, 1],
            "llm_requests": [3, 0],
            "prompt_tokens": [700, 0],
            "completion_tokens": [90, 0],
        }
    ).to_parquet(chunk)
    bench_dir = tmp_path / "benchmarks"
    (bench_dir / "scores" / "m").mkdir(parents=True)
    header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    for i, seconds in enumerate((1800, 3600)):
        (bench_dir / "scores" / "m" / f"l{i}.tsv").write_text(
            header + f"{seconds}\t-\t500\t0\t0\t0\t0\t0\t0\t{seconds / 2}\n"
        )
    (bench_dir / "describe.tsv").write_text(header + "36\t-\t100\t0\t0\t0\t0\t0\t0\tNA\n")
    (tmp_path / "images" / "ab").mkdir(parents=True)
    for name in ("a.png", "b.png"):
        (tmp_path / "images" / "ab" / name).write_bytes(b"x")
    times = figures.rule_times(bench_dir, {"scores": 1})
    assert {t.rule: (t.jobs, t.hours, t.gpus) for t in times} == {
        "scores": (2, 1.5, 1),
        "describe": (1, 0.01, 0),
    }
    lines = {
        line.what: (line.planned, line.spent)
        for line in figures.plan_lines(
            figures_, {"dnd": {"concepts": [str(chunk)]}}, tmp_path / "images", times
        )
    }
    assert lines["jobs"] == (12, 3)
    assert lines["dnd: LLM requests"] == (40, 3)
    assert lines["dnd: LLM prompt tokens"] == (9000, 700)
    assert lines["texplain: LLM requests"] == (7, None)
    assert lines["images drawn"] == (500, 2)
    assert lines["GPU-hours"] == (None, 1.5)
    # with plan.calibration, the calibration's estimate is the planned figure, with its source
    calibrated = {"gpu_hours": 2.25, "not_estimated": ["scores"], "source": "calibration on H200"}
    (gpu_line,) = [
        line
        for line in figures.plan_lines(
            figures.plan_figures(plan, calibrated), {}, tmp_path / "images", times
        )
        if line.what == "GPU-hours"
    ]
    assert (gpu_line.planned, gpu_line.spent) == (2.25, 1.5)
    assert "planned: calibration on H200, without scores" in gpu_line.note


@needs_chromium
def test_the_layer_page_filters_by_word_and_shows_an_html_label_as_text(tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    stage = _run(tmp_path, labels={3: SCRIPT, 7: "zebra stripes"})
    stage["settings"] = stage["settings"] | {"page_size": 5}
    report = _report(stage)
    driver = chrome()
    try:
        open_page(driver, report / "layers" / "synthetic" / "layer4.html")
        rows = driver.find_elements(By.CSS_SELECTOR, "tr.neuron")
        assert len(rows) == 5  # one page of 5
        assert "12 of 12 neurons" in driver.find_element(By.ID, "count").text
        driver.find_element(By.ID, "filter").send_keys("zebra")
        rows = driver.find_elements(By.CSS_SELECTOR, "tr.neuron")
        assert [r.get_attribute("data-neuron") for r in rows] == ["7"]
        driver.find_element(By.ID, "filter").clear()
        driver.find_element(By.ID, "filter").send_keys("script alert")
        (row,) = driver.find_elements(By.CSS_SELECTOR, "tr.neuron")
        assert SCRIPT in row.text  # shown as text; an alert would have failed every call
        screenshot(driver, "synthetic-layer-filtered")
        assert console_errors(driver) == []
        open_page(driver, report / "neurons" / "synthetic" / "layer4" / "3.html")
        assert SCRIPT in driver.find_element(By.ID, "labels").text
        assert broken_images(driver) == [] and console_errors(driver) == []
    finally:
        driver.quit()
