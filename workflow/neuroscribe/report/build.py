"""The `report` stage: write results/{run}/report/ from the run's tables.

Layout of the report folder (every link relative, so it opens from `file://`):

    index.html                          the run: config, models, evaluation, plan against spent
    layers/{model}/{layer}.html         every neuron of a layer, sortable and filterable
    layers/{model}/{layer}.data.js      the layer's rows, rendered by static/layer.js in pages
    neurons/{model}/{layer}/{n}.html    one neuron: exemplars, histogram, every method's details
    plots/{model}/{layer}.evaluation.{png,svg}
    thumbs/                             content-addressed thumbnails (reused by every rebuild)
    static/                             the stylesheet and the layer page's script

A page whose text did not change is not rewritten, so a rebuild after one more method's rows
arrive rewrites the pages that show them and makes only the thumbnails it has not made before.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import h5py
import jinja2
import numpy as np
import pandas as pd
from markupsafe import Markup

from neuroscribe import methods
from neuroscribe.io import atomic_path
from neuroscribe.report import figures, plots, svg
from neuroscribe.report.thumbnails import ThumbnailStore

log = logging.getLogger(__name__)
KEY = ["model", "layer", "neuron"]
LIST_ITEMS = 12  # list values shown in a method's generic details table


def layer_page(model: str, layer: str) -> str:
    return f"layers/{model}/{layer}.html"


def layer_data(model: str, layer: str) -> str:
    return f"layers/{model}/{layer}.data.js"


def neuron_page(model: str, layer: str, neuron: int) -> str:
    return f"neurons/{model}/{layer}/{neuron}.html"


def plot_file(model: str, layer: str, fmt: str) -> str:
    return f"plots/{model}/{layer}.evaluation.{fmt}"


def number(value: Any, digits: int = 3) -> str:
    """A score as text: 3 significant digits, '–' for a missing one."""
    if value is None or isinstance(value, str):
        return "–" if value is None else value
    try:
        if not np.isfinite(value):
            return "–"
    except TypeError:
        return str(value)
    if float(value).is_integer() and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.{digits}g}"


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("neuroscribe.report", "templates"),
        # every string a template is given is escaped: labels and LLM replies are untrusted
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = number
    return env


@dataclass
class Writer:
    """Writes the report's files, skipping those whose content is unchanged."""

    root: Path
    written: int = 0
    unchanged: int = 0

    def text(self, relative: str, text: str) -> None:
        path = self.root / relative
        data = text.encode()
        if path.is_file() and path.read_bytes() == data:
            self.unchanged += 1
            return
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
        self.written += 1


@dataclass
class Images:
    """Probe images by id (path, width, height, from the manifest) and their thumbnails."""

    manifest: dict[str, tuple[str, int, int]]
    store: ThumbnailStore

    def exemplar(self, image_id: str, box: Any, activation: float) -> dict[str, Any]:
        found = self.manifest.get(image_id)
        entry: dict[str, Any] = {
            "id": image_id,
            "activation": activation,
            "thumb": None,
            "box": None,
        }
        if found is None:
            return entry
        path, width, height = found
        entry["thumb"] = self.store.thumb(path)
        if box is not None and len(box) == 4 and width and height:
            x0, y0, x1, y1 = (float(v) for v in box)
            entry["box"] = {
                "left": 100 * x0 / width,
                "top": 100 * y0 / height,
                "width": 100 * (x1 - x0) / width,
                "height": 100 * (y1 - y0) / height,
            }
        return entry


@dataclass
class LayerData:
    """What one layer's pages show."""

    model: str
    layer: str
    rows: pd.DataFrame  # the description rows of the layer
    activations: np.ndarray | None  # [images, neurons] over the probe set
    columns: dict[int, int]  # neuron -> column of `activations`
    evaluation: pd.DataFrame | None
    parts: dict[str, tuple[jinja2.Template, methods.ReportPart]] = field(default_factory=dict)
    generic: dict[str, dict[int, list[dict[str, Any]]]] = field(default_factory=dict)
    # the description and evaluation rows by neuron, as records (pandas per neuron is slow)
    records: dict[int, list[dict[str, Any]]] = field(init=False)
    scored: dict[int, list[dict[str, Any]]] = field(init=False)

    def __post_init__(self) -> None:
        self.records = _by_neuron(self.rows)
        self.scored = {}
        if self.evaluation is not None:
            self.scored = _by_neuron(self.evaluation.sort_values(["method", "metric"]))


def _by_neuron(table: pd.DataFrame) -> dict[int, list[dict[str, Any]]]:
    found: dict[int, list[dict[str, Any]]] = {}
    for record in table.to_dict("records"):
        found.setdefault(int(record["neuron"]), []).append(record)
    return found


def _manifest(path: str) -> dict[str, tuple[str, int, int]]:
    table = pd.read_parquet(path, columns=["image_id", "path", "width", "height"])
    return {
        str(r.image_id): (str(r.path), int(r.width), int(r.height))
        for r in table.itertuples(index=False)
    }


def _activations(path: str | None) -> tuple[np.ndarray | None, dict[int, int]]:
    if path is None or not Path(path).is_file():
        return None, {}
    with h5py.File(path, "r", locking=False) as f:  # NFS and Lustre refuse HDF5's locks
        neurons = f["neurons"][:].tolist()
        return f["activations"][:], {int(n): i for i, n in enumerate(neurons)}


def _details(paths: Mapping[str, str]) -> dict[str, pd.DataFrame]:
    return {m: pd.read_parquet(p) for m, p in paths.items() if Path(p).is_file()}


def _layer_files(files: Mapping[str, list[str]], model: str, layer: str) -> dict[str, list[str]]:
    """A method's stage files of one layer (chunk files `.../{model}/{layer}/{chunk}.parquet`
    or a per-layer file `.../{model}/{layer}.parquet`)."""
    chunk, single = f"/{model}/{layer}/", f"/{model}/{layer}.parquet"
    return {
        stage: [p for p in paths if chunk in p or p.endswith(single)]
        for stage, paths in files.items()
    }


def method_parts(
    env: jinja2.Environment,
    model: str,
    layer: str,
    details: dict[str, pd.DataFrame],
    stage_files: Mapping[str, Mapping[str, list[str]]],
    sentences: int,
) -> tuple[
    dict[str, tuple[jinja2.Template, methods.ReportPart]],
    dict[str, dict[int, list[dict[str, Any]]]],
]:
    """Each enabled method's part of the layer's neuron pages: its own (`Method.report`) or,
    for a method without one, its details rows shown as a table."""
    parts, generic = {}, {}
    for name in stage_files:
        method = methods.get(name)
        table = details.get(name)
        rows = None
        if table is not None:
            rows = table[(table["model"] == model) & (table["layer"] == layer)]
        if method.report is None:
            if rows is not None and len(rows):
                generic[name] = _by_neuron(rows)
            continue
        part = method.report(
            methods.ReportInputs(
                model=model,
                layer=layer,
                details=rows,
                files=_layer_files(stage_files[name], model, layer),
                sentences=sentences,
            )
        )
        parts[name] = (env.from_string(Path(part.template).read_text()), part)
    return parts, generic


def _generic_rows(records: list[dict[str, Any]]) -> list[list[tuple[str, str]]]:
    """A method's details rows of one neuron as (column, shortened value) pairs."""
    found = []
    for record in records:
        pairs = []
        for key, value in record.items():
            if key in KEY:
                continue
            if isinstance(value, list | tuple | np.ndarray):
                items = [number(v) if not isinstance(v, str) else v for v in list(value)]
                more = f" … ({len(items)} in all)" if len(items) > LIST_ITEMS else ""
                value = ", ".join(str(v) for v in items[:LIST_ITEMS]) + more
            else:
                value = number(value) if not isinstance(value, str) else value
            pairs.append((key, str(value)))
        found.append(pairs)
    return found


def _method_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "method": r["method"],
            "label": r["label"] if isinstance(r["label"], str) else None,
            "labels": [str(x) for x in r["labels"]],
            "score": r["score"],
            "score_kind": r["score_kind"] if isinstance(r["score_kind"], str) else "",
            "status": r["status"],
            "error": r["error"] if isinstance(r["error"], str) else "",
        }
        for r in rows
    ]


def neuron_context(
    data: LayerData, neuron: int, images: Images, previous: int | None, following: int | None
) -> dict[str, Any]:
    rows = data.records[neuron]
    first = rows[0]
    exemplars = [
        images.exemplar(str(i), b, float(a))
        for i, b, a in zip(
            first["exemplar_ids"],
            first["exemplar_boxes"],
            first["exemplar_activations"],
            strict=False,
        )
    ]
    hist = None
    if data.activations is not None and neuron in data.columns:
        hist = svg.histogram(
            data.activations[:, data.columns[neuron]], [e["activation"] for e in exemplars]
        )
    return {
        "root": "../../../",
        "model": data.model,
        "layer": data.layer,
        "neuron": neuron,
        "previous": previous,
        "next": following,
        "methods": _method_rows(rows),
        "exemplars": exemplars,
        "hist": hist,
        "evaluation": data.scored.get(neuron, []),
    }


def _part_html(
    data: LayerData, neuron: int, images: Images
) -> list[tuple[str, Markup | list[list[tuple[str, str]]]]]:
    sections: list[tuple[str, Any]] = []
    for name, (template, part) in data.parts.items():
        context = part.neurons.get(neuron)
        if context is None:
            continue
        # rendered with autoescaping on, so it is safe to place as it is
        html = template.render(part=context, thumb=lambda p: _thumb(images, p), root="../../../")
        sections.append((name, Markup(html)))
    for name, records in data.generic.items():
        found = _generic_rows(records.get(neuron, []))
        if found:
            sections.append((name, found))
    return sections


def _thumb(images: Images, path: str | None) -> str | None:
    return None if path is None else images.store.thumb(path)


def _layer_row(data: LayerData, neuron: int, thumb: str | None) -> dict[str, Any]:
    """One neuron of the layer page's data: its labels, scores and statuses by method."""
    labels = {
        r["method"]: [
            r["label"] if isinstance(r["label"], str) else "",
            None if pd.isna(r["score"]) else round(float(r["score"]), 4),
            r["status"],
        ]
        for r in data.records[neuron]
    }
    row: dict[str, Any] = {"n": neuron, "t": thumb, "m": labels}
    found = data.scored.get(neuron)
    if found is not None:
        row["e"] = {
            f"{r['method']} {r['metric']}": None
            if pd.isna(r["value"])
            else round(float(r["value"]), 3)
            for r in found
        }
    return row


def write_layer(
    env: jinja2.Environment, writer: Writer, data: LayerData, images: Images, page_size: int
) -> dict[str, Any]:
    """A layer's neuron pages, its data file and its page; returns its index entry."""
    order = sorted(data.records)
    template = env.get_template("neuron.html.j2")
    table = []
    for i, neuron in enumerate(order):
        previous = order[i - 1] if i else None
        following = order[i + 1] if i + 1 < len(order) else None
        context = neuron_context(data, neuron, images, previous, following)
        context["sections"] = _part_html(data, neuron, images)
        writer.text(neuron_page(data.model, data.layer, neuron), template.render(**context))
        first = next((e["thumb"] for e in context["exemplars"] if e["thumb"]), None)
        table.append(_layer_row(data, neuron, first))
    variants = list(dict.fromkeys(data.rows["method"]))
    payload = {
        "model": data.model,
        "layer": data.layer,
        "methods": variants,
        "pageSize": page_size,
        "neuronPage": f"../../neurons/{data.model}/{data.layer}/",
        "rows": table,
    }
    # a script, not JSON fetched at run time: browsers refuse fetch() on file:// pages
    writer.text(
        layer_data(data.model, data.layer),
        "window.NEUROSCRIBE_LAYER = " + json.dumps(payload, ensure_ascii=True) + ";\n",
    )
    writer.text(
        layer_page(data.model, data.layer),
        env.get_template("layer.html.j2").render(
            root="../../", model=data.model, layer=data.layer, neurons=len(order)
        ),
    )
    status = data.rows.groupby(["method", "status"]).size().unstack(fill_value=0)
    return {
        "model": data.model,
        "layer": data.layer,
        "page": layer_page(data.model, data.layer),
        "neurons": len(order),
        "status": {
            m: {s: int(status.loc[m, s]) for s in status.columns if status.loc[m, s]}
            for m in variants
        },
    }


def _copy_static(writer: Writer) -> None:
    for name in ("report.css", "layer.js"):
        source = resources.files("neuroscribe.report").joinpath("static", name)
        writer.text(f"static/{name}", source.read_text())


def _model_ids(table: pd.DataFrame) -> list[dict[str, Any]]:
    """Per target and method, every model its rows name (the table's `models` column)."""
    found = []
    for (model, method), value in (
        table.groupby(["model", "method"], sort=False)["models"].first().items()
    ):
        try:
            ids = json.loads(value)
        except (TypeError, json.JSONDecodeError):
            ids = {"models": str(value)}
        target = ids.pop("target", "") if isinstance(ids, dict) else ""
        found.append({"model": model, "method": method, "target": target, "roles": ids})
    return found


def build_report(
    descriptions: str,
    details: dict[str, str],
    manifest: str,
    layer_files: list[list[str]],
    stage_files: dict[str, dict[str, list[str]]],
    evaluation: dict[str, str] | None,
    summary: dict[str, Any],
    settings: dict[str, Any],
    plan: dict[str, Any] | None,
    gpus: dict[str, int],
    benchmarks: str,
    images: str,
    out: str,
) -> None:
    """The `report` stage: every page, thumbnail and plot; index.html last, when all is done.

    `summary` is what the index says of the config (`figures.config_summary`), `settings` the
    config's `report` section, `plan` the plan's figures (`figures.plan_figures`; None: the
    index shows what was spent only)."""
    root = Path(out).parent
    env = environment()
    writer = Writer(root)
    store = ThumbnailStore(root, settings["thumbnail_size"])
    pictures = Images(_manifest(manifest), store)
    table = pd.read_parquet(descriptions)
    tables = _details(details)
    neurons = scores = None
    if evaluation is not None:
        neurons = pd.read_parquet(evaluation["neurons"])
        scores = pd.read_parquet(evaluation["summary"])
    _copy_static(writer)

    files = {(m, layer): path for m, layer, path in layer_files}
    layers, plotted = [], []
    for (model, layer), rows in table.groupby(["model", "layer"], sort=False):
        parts, generic = method_parts(env, model, layer, tables, stage_files, settings["sentences"])
        matrix, columns = _activations(files.get((model, layer)))
        scored = None
        if neurons is not None:
            scored = neurons[(neurons["model"] == model) & (neurons["layer"] == layer)]
        data = LayerData(model, layer, rows, matrix, columns, scored, parts, generic)
        layers.append(write_layer(env, writer, data, pictures, settings["page_size"]))
        if scored is not None:  # every evaluated layer gets its plot (the rule declares it)
            png, svg_file = (plot_file(model, layer, f) for f in ("png", "svg"))
            plots.write_evaluation_plot(scored, f"{model} {layer}", root / png, root / svg_file)
            plotted.append({"model": model, "layer": layer, "png": png, "svg": svg_file})
        log.info("layer %s %s: %d neurons", model, layer, layers[-1]["neurons"])
    store.save()

    times = figures.rule_times(benchmarks, gpus)
    plan_lines = figures.plan_lines(plan, stage_files, images, times)
    index = env.get_template("index.html.j2").render(
        root="",
        config=summary,
        models=_model_ids(table),
        layers=layers,
        summary=[] if scores is None else scores.to_dict("records"),
        plots=plotted,
        plan=plan_lines,
        times=times,
        thumbnails_missing=store.missing,
    )
    with atomic_path(out) as tmp:
        tmp.write_text(index)
    log.info(
        "report: %d files written, %d unchanged; %d thumbnails made, %d reused; %s",
        writer.written,
        writer.unchanged,
        store.made,
        store.reused,
        out,
    )
