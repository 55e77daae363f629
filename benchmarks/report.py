"""The report at scale: a synthetic run of 2,048 neurons × 3 methods, built and opened in Chromium.

Writes a run's tables as the workflow would (description table, each method's details, DnD's
synthesis tables, the evaluation, the layer's activations, a probe set of real PNG files), then
builds the report with the `report` stage's own function and measures:

- build time and the report's size on disk (files, MB);
- a rebuild after one more method's rows arrive (pages rewritten, thumbnails made and reused);
- in headless Chromium (Debian's `chromium` + `chromium-driver`, through Selenium), the layer
  page's time to interactive (navigation start until its table is drawn) and the bytes
  transferred for that first view, served by `python -m http.server` on 127.0.0.1;
  also from `file://`.

    .venv/bin/python benchmarks/report.py                    # 2,048 neurons, 3 methods
    .venv/bin/python benchmarks/report.py --neurons 256      # smaller

Target: the layer page interactive in under 2 s, under 5 MB transferred for the first view.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

MODEL, LAYER = "synthetic", "layer4"
WORDS = [
    "red",
    "green",
    "blue",
    "yellow",
    "purple",
    "orange",
    "striped",
    "dotted",
    "checkered",
    "plain",
    "noisy",
    "gradient",
    "circle",
    "square",
    "triangle",
    "diamond",
    "cross",
    "star",
    "ring",
    "dog",
    "cat",
    "bird",
    "car",
    "wheel",
    "tree",
    "grass",
    "water",
    "sky",
    "building",
    "window",
    "face",
    "hand",
    "fur",
    "feather",
    "metal",
    "wood",
    "glass",
    "text",
    "stripes",
    "spots",
    "mesh",
]
METHODS = ("dnd", "tellme", "texplain")
VARIANT = {"dnd": "dnd", "tellme": "tellme-activations", "texplain": "texplain-exemplars"}


def _images(folder: Path, count: int, size: int, rng: np.random.Generator) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        image = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 255, 3)))
        draw = ImageDraw.Draw(image)
        for _ in range(3):
            x0, y0 = rng.integers(0, size // 2, 2)
            x1, y1 = x0 + rng.integers(8, size // 2), y0 + rng.integers(8, size // 2)
            draw.ellipse((x0, y0, x1, y1), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        path = folder / f"{i:05d}.png"
        image.save(path)
        paths.append(path)
    return paths


def _phrase(rng: np.random.Generator, words: int = 2) -> str:
    return " ".join(rng.choice(WORDS, size=words, replace=False))


def synthetic_run(
    root: Path,
    neurons: int = 2048,
    methods: tuple[str, ...] = METHODS,
    probe_images: int = 400,
    drawn_concepts: int = 300,
    labels: dict[int, str] | None = None,
    seed: int = 0,
) -> dict:
    """Write a run's tables under `root` (a results/{run} folder); return `build_report`'s
    arguments. `labels` overrides the label of some neurons in every method (e.g. a label
    that is an HTML tag, to test the escaping)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    size = 96
    probe = _images(root / "probe" / "images", probe_images, size, rng)
    ids = [f"{i:016x}" for i in range(probe_images)]
    pd.DataFrame(
        {
            "image_id": ids,
            "path": [str(p) for p in probe],
            "dataset": "synthetic",
            "label": None,
            "width": size,
            "height": size,
        }
    ).to_parquet(root / "probe" / "manifest.parquet")

    acts = rng.gamma(2.0, 1.0, size=(probe_images, neurons)).astype(np.float16)
    layer_file = root / "activations" / MODEL / f"{LAYER}.h5"
    layer_file.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(layer_file, "w") as f:
        f["activations"] = acts
        f["neurons"] = np.arange(neurons)

    concepts = sorted({_phrase(rng, int(rng.integers(1, 4))) for _ in range(drawn_concepts)})
    drawn = _images(root / "images", 3 * len(concepts), size, rng)
    synthesis = root / "synthesis" / MODEL / LAYER / "0000.parquet"
    synthesis.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(
        {
            "concept": concepts,
            "status": "ok",
            "images": [[str(p) for p in drawn[3 * i : 3 * i + 3]] for i in range(len(concepts))],
        }
    ).to_parquet(synthesis)

    models = json.dumps({"target": "torchvision:resnet50", "captioner": "blip", "llm": "gpt"})
    # one generator per method: a method's rows stay the same when another method is added
    own = {m: np.random.default_rng([seed, i]) for i, m in enumerate(METHODS)}
    rows, dnd, tellme, texplain, scored = [], [], [], [], []
    top = np.argsort(-acts.astype(np.float32), axis=0)[:10].T  # [neurons, 10]
    for n in range(neurons):
        exemplar_ids = [ids[i] for i in top[n]]
        boxes = [[8, 8, 60, 70] if k % 3 == 0 else None for k in range(10)]
        values = [float(acts[i, n]) for i in top[n]]
        for method in methods:
            rng = own[method]
            label = (labels or {}).get(n) or _phrase(rng)
            rows.append(
                {
                    "model": MODEL,
                    "layer": LAYER,
                    "neuron": n,
                    "method": VARIANT[method],
                    "status": "ok",
                    "error": None,
                    "label": label,
                    "labels": [label, _phrase(rng), _phrase(rng)],
                    "score": float(rng.normal()),
                    "score_kind": f"{method} score",
                    "exemplar_ids": exemplar_ids,
                    "exemplar_boxes": boxes,
                    "exemplar_activations": values,
                    "models": models,
                }
            )
            for metric in ("simulation_r", "truth_text_similarity"):
                scored.append(
                    {
                        "model": MODEL,
                        "layer": LAYER,
                        "neuron": n,
                        "method": VARIANT[method],
                        "metric": metric,
                        "value": float(rng.uniform(-0.2, 0.8)),
                        "shuffled": float(rng.uniform(-0.2, 0.2)),
                        "scorer": "synthetic",
                        "reason": None,
                        "truth": None,
                    }
                )
        key = {"model": MODEL, "layer": LAYER, "neuron": n}
        rng = own["dnd"]
        picked = [str(c) for c in rng.choice(concepts, 5, replace=False)]
        dnd.append(
            key
            | {
                "captions": [f"a photo of {_phrase(rng, 3)}" for _ in range(10)],
                "candidates": picked,
                "candidate_rank_scores": rng.uniform(10, 500, 5).tolist(),
                "candidate_similarities": rng.uniform(0.5, 1, 5).tolist(),
                "candidate_scores": rng.uniform(0, 5, 5).tolist(),
            }
        )
        rng = own["tellme"]
        tellme.append(
            key
            | {
                "variant": "activations",
                "score_reason": None,
                "candidates": [_phrase(rng) for _ in range(3)],
                "validation_r": rng.uniform(-0.2, 0.8, 3).tolist(),
                "test_r": rng.uniform(-0.2, 0.8, 3).tolist(),
                "chosen": 0.0,
                "actual": rng.uniform(0, 3, 50).tolist(),
                "predicted": rng.integers(0, 11, 50).astype(float).tolist(),
                "explainer": "openai:gpt",
                "simulator": "llm",
            }
        )
        rng = own["texplain"]
        words = [str(w) for w in rng.choice(WORDS, 10, replace=False)]
        texplain.append(
            key
            | {
                "mode": "exemplars",
                "words": words,
                "zscores": sorted(rng.uniform(0, 8, 10).tolist(), reverse=True),
                "counts": rng.integers(10, 300, 10).tolist(),
                "reference_counts": rng.integers(100, 3000, 10).tolist(),
                "images": 10,
                "sentences": 640,
                "examples": [f"a {_phrase(rng, 3)} on a table" for _ in range(10)],
            }
        )
    pd.DataFrame(rows).to_parquet(root / "descriptions.parquet")
    details = {}
    for method, table in (("dnd", dnd), ("tellme", tellme), ("texplain", texplain)):
        if method in methods:
            details[method] = str(root / "descriptions" / f"{method}.parquet")
            Path(details[method]).parent.mkdir(parents=True, exist_ok=True)
            pd.DataFrame(table).to_parquet(details[method])
    evaluation = root / "evaluation"
    evaluation.mkdir(exist_ok=True)
    scored_table = pd.DataFrame(scored)
    scored_table.to_parquet(evaluation / "neurons.parquet")
    summary = (
        scored_table.groupby(["model", "layer", "method", "metric"])
        .agg(mean=("value", "mean"), shuffled_mean=("shuffled", "mean"), neurons=("value", "size"))
        .reset_index()
        .assign(ci_low=lambda d: d["mean"] - 0.02, ci_high=lambda d: d["mean"] + 0.02, unscored=0)
    )
    summary["difference"] = summary["mean"] - summary["shuffled_mean"]
    summary.to_parquet(evaluation / "summary.parquet")
    return {
        "descriptions": str(root / "descriptions.parquet"),
        "details": details,
        "manifest": str(root / "probe" / "manifest.parquet"),
        "layer_files": [[MODEL, LAYER, str(layer_file)]],
        "stage_files": {
            m: ({"synthesis": [str(synthesis)]} if m == "dnd" else {}) for m in methods
        },
        "evaluation": {
            "neurons": str(evaluation / "neurons.parquet"),
            "summary": str(evaluation / "summary.parquet"),
        },
        "summary": {
            "run": "synthetic",
            "targets": [
                {"name": MODEL, "spec": "torchvision:resnet50", "weights": None, "layers": [LAYER]}
            ],
            "datasets": [{"name": "synthetic", "type": "folder", "path": "probe"}],
            "methods": list(methods),
            "roles": {"llm": {"backend": "openai", "model": "gpt"}},
            "chunk_size": 128,
            "top_k": 10,
        },
        "settings": {"thumbnail_size": 128, "page_size": 100, "sentences": 5},
        "plan": None,
        "gpus": {},
        "benchmarks": str(root / "benchmarks"),
        "images": str(root / "images"),
        "out": str(root / "report" / "index.html"),
    }


def folder_size(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def chrome():
    """Headless Chromium through Selenium and Debian's chromedriver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1300,1000"):
        options.add_argument(flag)
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(shutil.which("chromedriver") or "/usr/bin/chromedriver")
    return webdriver.Chrome(service=service, options=options)


def first_view(driver, url: str) -> dict:
    """Open `url`, wait for the layer table; navigation-to-ready time and bytes loaded."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get("about:blank")
    started = time.perf_counter()
    driver.get(url)
    WebDriverWait(driver, 30).until(
        lambda d: d.execute_script("return document.body.dataset.ready === 'true'")
    )
    wall = time.perf_counter() - started
    timing = driver.execute_script(
        """
        const nav = performance.getEntriesByType('navigation')[0];
        const res = performance.getEntriesByType('resource');
        return {ready: performance.now(),
                bytes: (nav.transferSize || 0) + res.reduce((s, r) => s + (r.transferSize || 0), 0),
                resources: res.length, rows: document.querySelectorAll('tr.neuron').length};
        """
    )
    return {"wall_s": wall, "ready_ms": timing["ready"], **timing}


def serve(folder: Path) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.05)
    return server, port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--neurons", type=int, default=2048)
    parser.add_argument("--images", type=int, default=400, help="probe images")
    parser.add_argument("--keep", type=Path, help="build here and keep it (default: a temp dir)")
    args = parser.parse_args()

    from neuroscribe.report.build import build_report

    tmp = Path(tempfile.mkdtemp(prefix="report-bench-"))
    root = args.keep or tmp / "results" / "synthetic"
    try:
        started = time.perf_counter()
        stage = synthetic_run(root, args.neurons, METHODS[:2], args.images)
        print(
            f"synthetic run: {args.neurons} neurons, {args.images} probe images, "
            f"written in {time.perf_counter() - started:.1f} s"
        )

        started = time.perf_counter()
        build_report(**stage)
        first = time.perf_counter() - started
        print(f"build, 2 methods: {first:.1f} s")

        # one more method's rows arrive
        stage = synthetic_run(root, args.neurons, METHODS, args.images)
        thumbs = {p: p.stat().st_mtime_ns for p in (root / "report" / "thumbs").rglob("*.jpg")}
        started = time.perf_counter()
        build_report(**stage)
        rebuild = time.perf_counter() - started
        kept = sum(p.stat().st_mtime_ns == t for p, t in thumbs.items())
        made = len(list((root / "report" / "thumbs").rglob("*.jpg"))) - len(thumbs)
        print(
            f"rebuild, 3 methods: {rebuild:.1f} s; thumbnails: {kept} of {len(thumbs)} "
            f"untouched, {made} new"
        )

        files, size = folder_size(root / "report")
        data = root / "report" / "layers" / MODEL / f"{LAYER}.data.js"
        print(
            f"report on disk: {files} files, {size / 1e6:.1f} MB "
            f"(layer data {data.stat().st_size / 1e6:.2f} MB)"
        )

        driver = chrome()
        server, port = serve(root / "report")
        try:
            page = f"layers/{MODEL}/{LAYER}.html"
            for name, url in (
                ("http, cold", f"http://127.0.0.1:{port}/{page}"),
                ("http, cached", f"http://127.0.0.1:{port}/{page}"),
                ("file://", (root / "report" / page).resolve().as_uri()),
            ):
                view = first_view(driver, url)
                print(
                    f"layer page ({name}): interactive after {view['ready_ms'] / 1000:.2f} s "
                    f"(wall {view['wall_s']:.2f} s), {view['rows']} rows drawn, "
                    f"{view['resources']} resources, {view['bytes'] / 1e6:.2f} MB transferred"
                )
        finally:
            driver.quit()
            server.terminate()
            server.wait(timeout=10)
    finally:
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
