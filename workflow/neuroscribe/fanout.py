"""The fan-out known when the workflow is parsed: shards of images, layers, chunks of neurons."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from neuroscribe.config import (
    ConfigError,
    DatasetSpec,
    TargetSpec,
    datasets_from_config,
    run_name,
    targets_from_config,
    validate_config,
)
from neuroscribe.inspection import check_layers, inspect_target, output_layer
from neuroscribe.paths import RunPaths
from neuroscribe.probe import survey_probe

# On a cluster each chunk is two jobs: `propose` (exemplars and the stages that read them
# directly) and `select` (the stages after); profiles/slurm packs several chunks into one job
# per group. Each method's stages name their group.
EXEMPLARS_GROUP = "propose"


def chunk_groups(config: dict[str, Any]) -> dict[str, str]:
    """The cluster job group of every per-chunk stage (exemplars and the methods' stages)."""
    from neuroscribe import methods

    groups = {"exemplars": EXEMPLARS_GROUP}
    for name, stage in methods.all_stages(config).items():
        if not stage.per_layer:  # a layer's job belongs to no chunk's group
            groups[name] = stage.group
    return groups


_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def select_neurons(neurons: str | dict[str, int], size: int, where: str) -> list[int]:
    """Sorted neuron indices for `all`, a range list like "0-63,100", or {sample, seed}."""
    if neurons == "all":
        return list(range(size))
    if isinstance(neurons, dict):
        n = neurons["sample"]
        if n > size:
            raise ConfigError(f"{where}: sample of {n} neurons asked, but the layer has {size}")
        rng = np.random.default_rng(neurons.get("seed", 0))
        return sorted(int(i) for i in rng.choice(size, size=n, replace=False))
    chosen: set[int] = set()
    for part in neurons.split(","):
        match = _RANGE.match(part)
        assert match is not None  # the schema pattern already checked the syntax
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) is not None else lo
        if lo > hi:
            raise ConfigError(f"{where}: range '{part.strip()}' is reversed; write it low-high")
        if hi >= size:
            raise ConfigError(
                f"{where}: neuron {hi} is out of range; the layer has {size} neurons (0-{size - 1})"
            )
        chosen.update(range(lo, hi + 1))
    return sorted(chosen)


@dataclass(frozen=True)
class Chunk:
    model: str
    layer: str
    index: int
    neurons: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"{self.index:04d}"


@dataclass
class Layout:
    run: str
    results: str
    paths: RunPaths
    targets: dict[str, TargetSpec]
    datasets: list[DatasetSpec]
    layer_sizes: dict[str, dict[str, int]]
    chunks: dict[tuple[str, str], list[Chunk]]
    # probe files found when parsing, those with an image extension, and a fingerprint of them
    # (names, sizes, mtimes) that reruns the manifest when one changes (probe.survey_probe)
    n_candidates: int
    n_image_files: int
    probe_fingerprint: str
    n_shards: int
    output_layers: dict[str, str | None]
    # layers whose output is a spatial map [C, H, W], the only ones with attention crops
    spatial_layers: dict[str, set[str]]

    def chunk(self, model: str, layer: str, name: str) -> Chunk:
        return self.chunks[(model, layer)][int(name)]

    def all_chunks(self) -> list[Chunk]:
        return [c for chunks in self.chunks.values() for c in chunks]


def build_layout(config: dict[str, Any], results_root: str | Path = "results") -> Layout:
    """Validate the config and work out every job the DAG will hold, without heavy work:
    layer shapes come from a cached inspection of the model, image counts from a file listing."""
    validate_config(config)
    results = f"{Path(results_root).as_posix()}/{run_name(config)}"
    paths = RunPaths(results)
    targets = {
        t.name: replace(t, weights=paths.trained_weights(t.name)) if t.train else t
        for t in targets_from_config(config)
    }
    layer_sizes: dict[str, dict[str, int]] = {}
    chunks: dict[tuple[str, str], list[Chunk]] = {}
    output_layers: dict[str, str | None] = {}
    spatial_layers: dict[str, set[str]] = {}
    size = config["chunk_size"]
    for ti, target in enumerate(targets.values()):
        modules = inspect_target(target, paths.inspect)
        sizes = check_layers(target, modules)
        output_layers[target.name] = output_layer(modules)
        layer_sizes[target.name] = sizes
        spatial_layers[target.name] = {
            name for name in sizes if len(modules[name]["shape"] or []) == 3
        }
        for li, layer in enumerate(target.layers):
            where = f"config key 'targets[{ti}].layers[{li}].neurons' (layer {layer.name})"
            selected = select_neurons(layer.neurons, sizes[layer.name], where)
            chunks[(target.name, layer.name)] = [
                Chunk(target.name, layer.name, i, tuple(selected[s : s + size]))
                for i, s in enumerate(range(0, len(selected), size))
            ]
    if config["evaluation"]["enabled"]:
        from neuroscribe.evaluation.checks import check_evaluation

        check_evaluation(config, output_layers, layer_sizes)
    datasets = datasets_from_config(config)
    survey = survey_probe(datasets)
    if survey.files == 0:
        names = ", ".join(f"{d.name} ({d.path})" for d in datasets)
        raise ConfigError(
            f"the probe set is empty: no files in {names}; check probe.datasets paths"
        )
    layout = Layout(
        run=run_name(config),
        results=results,
        paths=paths,
        targets=targets,
        datasets=datasets,
        layer_sizes=layer_sizes,
        chunks=chunks,
        n_candidates=survey.files,
        n_image_files=survey.image_files,
        probe_fingerprint=survey.fingerprint,
        n_shards=math.ceil(survey.files / config["shard_size"]),
        output_layers=output_layers,
        spatial_layers=spatial_layers,
    )
    from neuroscribe import methods

    for method in methods.enabled(config):
        if method.check_layout is not None:
            method.check_layout(layout, config)
    return layout
