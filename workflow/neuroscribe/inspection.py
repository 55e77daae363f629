"""Model inspection for planning: each module's output shape, cached, and the layer checks.

Imports no torch unless the cache misses, so parsing the workflow (every dry run, and every
cluster job, which re-parses the Snakefile) stays fast.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

from neuroscribe.config import ConfigError, TargetSpec
from neuroscribe.io import atomic_path
from neuroscribe.layers import LayerError, closest_first

log = logging.getLogger(__name__)

INSPECT_VERSION = 1


def _inspect_key(target: TargetSpec) -> str:
    parts: dict[str, Any] = {
        "v": INSPECT_VERSION,
        "spec": target.spec,
        "weights": target.weights if target.kind == "torchvision" else None,
        "crop": target.transform.crop,
    }
    if target.kind == "python":
        module_ref = target.ref.rpartition(":")[0]
        path = Path(module_ref) if module_ref.endswith(".py") else None
        if path is None:
            spec = importlib.util.find_spec(module_ref)
            path = Path(spec.origin) if spec and spec.origin else None
        if path is not None and path.exists():
            stat = path.stat()
            parts["source"] = [str(path.resolve()), stat.st_mtime_ns, stat.st_size]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def inspect_target(target: TargetSpec, cache_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Output shape (without batch) and call count of every module, for a dummy input.

    Runs on the meta device (no memory, no compute) when the model allows it, else on the CPU
    with random weights; cached per (spec, input size), so parsing the workflow stays cheap.
    """
    key = _inspect_key(target)
    cache = Path(cache_dir) / f"{target.name}.json"
    if cache.exists():
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return cached["modules"]
    from neuroscribe.models import record_shapes  # torch is imported only on a cache miss

    try:
        modules = record_shapes(target, "meta")
    except ConfigError:
        raise
    except Exception as exc:
        log.info("meta-device inspection of %s failed (%s); inspecting on CPU", target.spec, exc)
        modules = record_shapes(target, "cpu")
    try:
        with atomic_path(cache) as tmp:
            tmp.write_text(json.dumps({"key": key, "spec": target.spec, "modules": modules}))
    except OSError as err:
        # the first write of a run: a read-only or full results folder shows here, before any job
        raise ConfigError(
            f"cannot write {cache} ({err.strerror or err}): neuroscribe keeps everything under "
            "results/{run}/ in the working directory; run where you can write, or pick another "
            "working directory with snakemake's --directory"
        ) from None
    return modules


def neuron_count(shape: list[int] | None) -> int | None:
    """Neurons of a layer output: channels of [C], [C,H,W] or the last axis of tokens [T,C]."""
    if shape is None or len(shape) not in (1, 2, 3):
        return None
    return shape[-1] if len(shape) == 2 else shape[0]


def check_layers(target: TargetSpec, modules: dict[str, dict[str, Any]]) -> dict[str, int]:
    """Neuron count per requested layer; a wrong name fails listing the valid ones, closest first."""
    describable = {n: m for n, m in modules.items() if neuron_count(m["shape"]) and m["calls"] == 1}
    sizes = {}
    for layer in target.layers:
        info = modules.get(layer.name)
        if info is None:
            ranked = closest_first(layer.name, list(describable))
            shown = ranked[:40]
            more = f" … and {len(ranked) - len(shown)} more" if len(ranked) > len(shown) else ""
            raise LayerError(
                f"target '{target.name}' ({target.spec}) has no layer '{layer.name}'. "
                f"Valid layer names, closest first: {', '.join(shown)}{more}"
            )
        if info["calls"] != 1:
            raise LayerError(
                f"target '{target.name}': layer '{layer.name}' runs {info['calls']} times per forward "
                "pass (a shared or unused module), so its activation is ambiguous; pick a module that "
                "runs once, e.g. its parent block"
            )
        count = neuron_count(info["shape"])
        if count is None:
            raise LayerError(
                f"target '{target.name}': layer '{layer.name}' outputs shape {info['shape']}; "
                "neuroscribe describes outputs shaped [C], [C, H, W] or tokens [T, C]"
            )
        sizes[layer.name] = count
    return sizes


def output_layer(modules: dict[str, dict[str, Any]]) -> str | None:
    """The class-score layer: the last module (in definition order) run once with a vector output."""
    vectors = [
        n for n, m in modules.items() if m["calls"] == 1 and m["shape"] and len(m["shape"]) == 1
    ]
    return vectors[-1] if vectors else None
