"""The method registry: every description method declares its stages, outputs, rows and plan here.

A method is a package (built in: `neuroscribe.methods.<name>`) exposing a `Method`. Built-in
methods are listed in BUILTIN; a method outside this package registers itself through the
entry-point group `neuroscribe.methods` of its own distribution:

    [project.entry-points."neuroscribe.methods"]
    mymethod = "mypackage.mymethod:METHOD"

The workflow (rules, fan-out, plan, final table, CLI) reads this registry and names no method.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    from neuroscribe.fanout import Layout

ENTRY_POINT_GROUP = "neuroscribe.methods"
# name -> "module:attribute" of each method shipped with neuroscribe
BUILTIN = {
    "topk": "neuroscribe.methods.topk:METHOD",
    "dnd": "neuroscribe.methods.dnd:METHOD",
    "clipdissect": "neuroscribe.methods.clipdissect:METHOD",
    "tellme": "neuroscribe.methods.tellme:METHOD",
    "texplain": "neuroscribe.methods.texplain:METHOD",
}
KEY = ["model", "layer", "neuron"]


def _never(config: dict[str, Any]) -> bool:
    return False


@dataclass(frozen=True)
class Stage:
    """One job per chunk of neurons of a method: rule `name` writes `{results}/{name}/{model}/
    {layer}/{chunk}.parquet` by calling `function` ("module:function") with the rule's arguments;
    or, with `per_layer`, one job per layer writing `{results}/{name}/{model}/{layer}.parquet`
    (for a method whose result for one neuron depends on the layer's other neurons)."""

    name: str
    function: str
    # the cluster job group: `propose` (with the exemplars) or `select` (after them)
    group: str
    # resources.<name> defaults (mem_mb, runtime, cpus), overridable in the config
    resources: dict[str, int]
    # whether the configured backend runs a model on a GPU in this stage (device aside)
    uses_gpu: Callable[[dict[str, Any]], bool] = _never
    # calls the `llm` role's API: runs on the head node when the nodes cannot reach it
    calls_llm_api: bool = False
    # one job per (model, layer) instead of per chunk; not part of a chunk's job group
    per_layer: bool = False


@dataclass(frozen=True)
class RowInputs:
    """What a method's `rows` gets: the exemplar rows every method shares (one per neuron, with
    the exemplar columns and `models` naming the target) and its stages' chunk files."""

    exemplars: pd.DataFrame
    files: dict[str, list[str]]
    models: dict[str, str]


@dataclass(frozen=True)
class MethodRows:
    """A method's part of the final table: `rows` with the shared columns (see
    descriptions.schema.yaml) and, for a method with details, its own table keyed by
    (model, layer, neuron)."""

    rows: pd.DataFrame
    details: pd.DataFrame | None = None


@dataclass(frozen=True)
class ReportInputs:
    """What a method's `report` gets for one layer: its details rows of that layer (None for a
    method without a details table) and its stages' files of that layer, by stage."""

    model: str
    layer: str
    details: pd.DataFrame | None
    files: dict[str, list[str]]
    # sampled sentences or captions to show per neuron (report.sentences)
    sentences: int


@dataclass(frozen=True)
class ReportPart:
    """A method's part of each neuron page of a layer: `template` (a Jinja file) is rendered
    with `part` = `neurons[neuron]`. Templates can `{% import "macros.html.j2" as m %}` and
    call `thumb(path)` for an image's thumbnail; every value is escaped."""

    template: Path
    neurons: dict[int, dict[str, Any]]


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    # builds the method's rows of the final table from its chunk files
    rows: Callable[[RowInputs], MethodRows]
    stages: tuple[Stage, ...] = ()
    # roles it uses (captioner, llm, ...): their settings change its results
    roles: tuple[str, ...] = ()
    # its rules file (Snakemake), included when the method is enabled
    rules: Path | None = None
    # JSON schema of its config section (the key is its name), defaults filled from it
    config_schema: Path | None = None
    # JSON schema of its details table (descriptions/{name}.parquet), if it has one
    details_schema: Path | None = None
    # config checks a schema cannot express: (config, check_paths) -> None, raises ConfigError
    check_config: Callable[[dict[str, Any], bool], None] | None = None
    # its plan estimates: (layout, config) -> {"estimates": {...}, "layers": {(model, layer): {...}}}
    plan: Callable[[Layout, dict[str, Any]], dict[str, Any]] | None = None
    # its lines of the plan summary: (its estimates) -> lines
    format_plan: Callable[[dict[str, Any]], list[str]] | None = None
    # what finished jobs tell the plan: (plan, results) -> plan
    observe: Callable[[dict[str, Any], str], dict[str, Any]] | None = None
    # the config settings that change what a stage writes: (stage, config) -> JSON-able
    settings: Callable[[str, dict[str, Any]], Any] | None = None
    # models to download before a run: (config) -> [prefetch.ModelRef]
    models: Callable[[dict[str, Any]], list[Any]] | None = None
    # keys of older configs that now live in its section: {"llm.candidates": "dnd.candidates"}
    moved_keys: dict[str, str] = field(default_factory=dict)
    # checks that need the models' layers (parse time, after the layers are known):
    # (layout, config) -> None, raises ConfigError
    check_layout: Callable[[Layout, dict[str, Any]], None] | None = None
    # it scores on held-out probe images: the merge holds `evaluation.holdout` of them out even
    # with evaluation off
    needs_holdout: bool = False
    # jobs its rules run besides its stages (once per run or per target; `group` unused): their
    # CLI names, functions, resources and GPU use
    jobs: tuple[Stage, ...] = ()
    # what its rules write besides its stages' tables, so the default target asks for them
    # (and rebuilds a deleted one): (layout, config) -> paths
    outputs: Callable[[Layout, dict[str, Any]], list[str]] | None = None
    # its part of each neuron page of the report: (inputs of one layer) -> ReportPart; without
    # it the page shows its details row as a table
    report: Callable[[ReportInputs], ReportPart] | None = None

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)


class UnknownMethod(KeyError):
    pass


class MethodLoadError(ImportError):
    """A registered method cannot be loaded; every run would fail on it, so it says which."""


def _load(name: str, ref: str) -> Method:
    module, _, attribute = ref.partition(":")
    try:
        method = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as err:
        raise MethodLoadError(
            f"method {name!r} is registered as {ref!r} but cannot be loaded ({err}); fix or "
            f"uninstall the package that registers it (entry-point group {ENTRY_POINT_GROUP!r})"
        ) from err
    if not isinstance(method, Method):
        raise MethodLoadError(f"method {name!r}: {ref} is not a neuroscribe.methods.Method")
    return method


@functools.cache
def registered() -> dict[str, str]:
    """Every known method's name and "module:attribute": built-ins, then entry points."""
    found = dict(BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in BUILTIN:
            raise ValueError(
                f"entry point {ep.value!r} registers method {ep.name!r}, a built-in method's "
                "name; give it another name"
            )
        found[ep.name] = ep.value
    return found


@functools.cache
def get(name: str) -> Method:
    refs = registered()
    if name not in refs:
        raise UnknownMethod(name)
    method = _load(name, refs[name])
    if method.name != name:
        raise ValueError(f"{refs[name]} is registered as {name!r} but names itself {method.name!r}")
    return method


def enabled(config: dict[str, Any]) -> list[Method]:
    """The config's methods, in its order."""
    return [get(name) for name in config["methods"]]


def holdout(config: dict[str, Any]) -> float:
    """The share of probe images held out from every method: `evaluation.holdout` with
    evaluation on or an enabled method that scores on held-out images, else 0."""
    evaluation = config["evaluation"]
    needed = evaluation["enabled"] or any(m.needs_holdout for m in enabled(config))
    return evaluation["holdout"] if needed else 0.0


def all_stages(config: dict[str, Any]) -> dict[str, Stage]:
    """Every per-chunk stage of the enabled methods, by name."""
    return {s.name: s for m in enabled(config) for s in m.stages}


def all_jobs(config: dict[str, Any]) -> dict[str, Stage]:
    """Every stage and other job of the enabled methods, by name."""
    return {s.name: s for m in enabled(config) for s in (*m.stages, *m.jobs)}


def stage_owner(config: dict[str, Any], stage: str) -> Method:
    for method in enabled(config):
        if any(s.name == stage for s in method.stages):
            return method
    raise KeyError(stage)
