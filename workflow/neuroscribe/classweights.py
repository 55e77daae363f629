"""Effective weights of a layer's neurons to the model's classes, for weight-based explanations
(TeLLMe, Guertler & Luu 2023: an LLM explains a neuron from its weights to the output classes).

A layer has effective class weights when its output reaches the logits through a *linear path*:
global average pooling (a channel's pooled value is what the next Linear reads, so a channel's
weights are that Linear's column), flattening, dropout and identity (no-ops at inference),
ReLU (ignored, as in the reference code, which multiplies AlexNet's classifier weights across
its ReLUs) and Linear layers, whose weight matrices multiply: W_last @ ... @ W_first, biases
ignored. The path is found by tracing the model with torch.fx, or named in the config
(`tellme.weights.path`) when tracing cannot follow the model.

Torch-free to import: `check_weight_path` runs at parse time and imports torch only when its
cache misses, like `inspection`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import operator
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neuroscribe.config import ConfigError, TargetSpec
from neuroscribe.io import atomic_path
from neuroscribe.layers import LayerError

if TYPE_CHECKING:
    import numpy as np
    from torch import fx, nn

log = logging.getLogger(__name__)

CLASSWEIGHTS_VERSION = 1
CONFIG_KEY = "tellme.weights.path"
ALLOWED_MODULES = "Linear, ReLU, Dropout, Identity, Flatten, AdaptiveAvgPool2d(1)"
ALLOWED_PATH = (
    "global average pooling, flatten, dropout, identity, ReLU and Linear layers "
    "(a Linear's weights multiply; ReLU is ignored, as in TeLLMe)"
)


class WeightPathError(LayerError):
    """A layer has no linear path to the model's output, so its effective class weights are
    undefined (or the configured path is wrong); the message says what was found and the fix."""


@dataclass(frozen=True)
class WeightPath:
    """How a layer's neurons reach the classes.

    `steps` are what the path runs through after the layer, readable (e.g. "pool:
    AdaptiveAvgPool2d", "torch.flatten", "fc: Linear"); `linears` the Linear modules' names in
    forward order, whose weights multiply into the effective weights.
    """

    layer: str
    steps: tuple[str, ...]
    linears: tuple[str, ...]


# -- recognising the steps --------------------------------------------------------------------


def _is_global_size(size: Any) -> bool:
    return size == 1 or (isinstance(size, (tuple, list)) and list(size) == [1, 1])


def _is_spatial_dims(dims: Any) -> bool:
    return isinstance(dims, (tuple, list)) and sorted(dims) in ([2, 3], [-2, -1])


def _module_kind(module: nn.Module) -> tuple[str | None, str]:
    """(kind, why not) of a module on a path: kind is linear / ignore / flatten / pool, or None."""
    from torch import nn

    if isinstance(module, nn.Linear):
        return "linear", ""
    if isinstance(module, (nn.ReLU, nn.Identity, nn.modules.dropout._DropoutNd)):
        return "ignore", ""
    if isinstance(module, nn.Flatten):
        if module.start_dim == 1 and module.end_dim == -1:
            return "flatten", ""
        return None, f"flattens dims {module.start_dim}..{module.end_dim}, not all but the batch"
    if isinstance(module, nn.AdaptiveAvgPool2d):
        if _is_global_size(module.output_size):
            return "pool", ""
        return None, (
            f"output size {module.output_size} is not a global average pool: the path flattens a "
            "spatial map; per-channel weights are not defined"
        )
    return None, "not linear"


def _function_name(fn: Any) -> str:
    name = getattr(fn, "__name__", repr(fn))
    if fn in (operator.add, operator.iadd):
        return "+ (an addition, e.g. a residual connection)"
    module = getattr(fn, "__module__", None) or ""
    module = {"torch.nn.functional": "F", "_operator": "operator"}.get(module, module)
    return f"{module}.{name}" if module else name


def _label(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        module = modules.get(str(node.target))
        return f"{node.target}: {type(module).__name__}"
    if node.op == "call_function":
        return _function_name(node.target)
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "output":
        return "the model's output"
    return f"{node.op} {node.target}"


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _node_kind(
    node: fx.Node, source: fx.Node, modules: dict[str, nn.Module]
) -> tuple[str | None, str]:
    """(kind, why not) of a traced node that takes `source` (the path so far) as its data."""
    import torch
    import torch.nn.functional as F

    if node.op == "call_module":
        return _module_kind(modules[str(node.target)])
    if not node.args or node.args[0] is not source:
        return None, "does not take the path's tensor as its input"
    if node.op == "call_function":
        fn = node.target
        if fn in (F.relu, torch.relu, torch.relu_):
            return "ignore", ""
        if fn is F.dropout:
            return "ignore", ""
        if fn is torch.flatten:
            if _arg(node, 1, "start_dim", 0) == 1 and _arg(node, 2, "end_dim", -1) == -1:
                return "flatten", ""
            return None, "does not flatten all dims but the batch (use torch.flatten(x, 1))"
        if fn is F.adaptive_avg_pool2d:
            size = _arg(node, 1, "output_size", None)
            if _is_global_size(size):
                return "pool", ""
            return None, (
                f"output size {size} is not a global average pool: the path flattens a spatial "
                "map; per-channel weights are not defined"
            )
        if fn is torch.mean:
            if _is_spatial_dims(_arg(node, 1, "dim", None)):
                return "pool", ""
            return None, "is not a mean over the spatial dims (2, 3)"
        return None, "not linear"
    if node.op == "call_method":
        method = node.target
        if method in ("relu", "relu_"):
            return "ignore", ""
        if method == "flatten":
            if _arg(node, 1, "start_dim", 0) == 1 and _arg(node, 2, "end_dim", -1) == -1:
                return "flatten", ""
            return None, "does not flatten all dims but the batch (use x.flatten(1))"
        if method in ("view", "reshape"):
            shape = list(node.args[1:]) or list(node.kwargs.get("shape", ()))
            if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
                shape = list(shape[0])
            if len(shape) == 2 and shape[1] == -1:
                return "flatten", ""
            return None, "does not reshape to [N, -1]"
        if method == "mean":
            if _is_spatial_dims(_arg(node, 1, "dim", None)):
                return "pool", ""
            return None, "is not a mean over the spatial dims (2, 3)"
        return None, "not linear"
    return None, "not linear"


def _reads_shape(node: fx.Node) -> bool:
    """A user that only reads the size (x.size(0), x.shape, x.dim()), not the data."""
    if node.op == "call_method" and node.target in ("size", "dim"):
        return True
    return (
        node.op == "call_function"
        and node.target is getattr
        and len(node.args) > 1
        and node.args[1] in ("shape", "ndim")
    )


# -- finding the path -------------------------------------------------------------------------


def _candidates(modules: dict[str, nn.Module], layer: str) -> list[str]:
    """Modules defined after the layer (not inside it) that a named path may list."""
    names = list(modules)
    after = names[names.index(layer) + 1 :] if layer in modules else names
    return [
        n
        for n in after
        if n and not n.startswith(layer + ".") and _module_kind(modules[n])[0] is not None
    ]


def _candidates_text(modules: dict[str, nn.Module], layer: str) -> str:
    found = _candidates(modules, layer)
    shown = found[:40]
    more = f" … and {len(found) - len(shown)} more" if len(found) > len(shown) else ""
    return (
        f"modules after '{layer}' a path may name: {', '.join(shown)}{more}"
        if shown
        else f"no module after '{layer}' is one of {ALLOWED_MODULES}"
    )


def _so_far(layer: str, steps: list[str]) -> str:
    return " → ".join([layer, *steps])


def _named_path(modules: dict[str, nn.Module], layer: str, named: Sequence[str]) -> WeightPath:
    where = f"layer '{layer}': {CONFIG_KEY}"
    steps: list[str] = []
    linears: list[str] = []
    seen: set[str] = set()
    pooled = False
    for name in named:
        module = modules.get(name) if name else None
        if module is None:
            raise WeightPathError(
                f"{where} names '{name}', which is not a module of the model; "
                + _candidates_text(modules, layer)
            )
        if name == layer or name.startswith(layer + "."):
            raise WeightPathError(
                f"{where} names '{name}', which is the layer itself or inside it; name the "
                "modules after the layer, in forward order. " + _candidates_text(modules, layer)
            )
        if name in seen:
            raise WeightPathError(f"{where} names '{name}' twice")
        seen.add(name)
        kind, why = _module_kind(module)
        if kind is None:
            raise WeightPathError(
                f"{where} names '{name}', a {type(module).__name__} ({why}); a path may run "
                f"through {ALLOWED_MODULES} only. " + _candidates_text(modules, layer)
            )
        if kind == "pool" and (linears or pooled):
            raise WeightPathError(
                f"{where}: the global pool '{name}' comes after "
                + ("a Linear" if linears else "another pool")
                + "; a pool may only reduce the layer's spatial map, before the first Linear"
            )
        pooled = pooled or kind == "pool"
        steps.append(f"{name}: {type(module).__name__}")
        if kind == "linear":
            linears.append(name)
    if not linears:
        raise WeightPathError(
            f"{where} {list(named)} has no Linear layer, so there are no weights to the classes; "
            + _candidates_text(modules, layer)
        )
    path = WeightPath(layer, tuple(steps), tuple(linears))
    _check_shapes(modules, path, None)
    return path


class _Tracer:
    """torch.fx tracing that keeps the layer as one call (and traces through its ancestors)."""

    @staticmethod
    def trace(module: nn.Module, layer: str) -> fx.Graph:
        from torch import fx

        class Tracer(fx.Tracer):
            def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
                if qualname == layer:
                    return True
                if layer.startswith(qualname + "."):
                    return False
                return super().is_leaf_module(m, qualname)

        return Tracer().trace(module)


def _traced_path(module: nn.Module, modules: dict[str, nn.Module], layer: str) -> WeightPath:
    try:
        graph = _Tracer.trace(module, layer)
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise WeightPathError(
            f"layer '{layer}': tracing the model ({type(module).__name__}) with torch.fx failed "
            f"({type(exc).__name__}: {reason}), so its path to the output is unknown; name the "
            f"path in `{CONFIG_KEY}`: the modules after the layer, in forward order, e.g. "
            f"[pool, fc]. " + _candidates_text(modules, layer)
        ) from None
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == layer]
    if len(calls) != 1:
        raise WeightPathError(
            f"layer '{layer}' "
            + (
                f"is called {len(calls)} times in the traced forward pass"
                if calls
                else "is not called as a module in the traced forward pass"
            )
            + f", so its path to the output is ambiguous; name the path in `{CONFIG_KEY}`. "
            + _candidates_text(modules, layer)
        )
    fix = (
        f"effective class weights are defined only through {ALLOWED_PATH}: pick a layer whose "
        f"output reaches the classes that way, or name the path in `{CONFIG_KEY}` if tracing "
        "misread the model"
    )
    node, steps, linears, pooled = calls[0], [], [], False
    while True:
        users = [u for u in node.users if not _reads_shape(u)]
        if len(users) != 1:
            what = (
                "is not used further"
                if not users
                else f"feeds {len(users)} nodes ({', '.join(_label(u, modules) for u in users)}): "
                "the path to the output branches"
            )
            raise WeightPathError(
                f"layer '{layer}': no linear path to the output: {_so_far(layer, steps)} {what}; "
                + fix
            )
        user = users[0]
        if user.op == "output":
            break
        kind, why = _node_kind(user, node, modules)
        if kind == "pool" and (linears or pooled):
            kind, why = None, "a pool after " + ("a Linear" if linears else "another pool")
        if kind is None:
            raise WeightPathError(
                f"layer '{layer}': no linear path to the output: after {_so_far(layer, steps)} "
                f"comes {_label(user, modules)} ({why}); " + fix
            )
        pooled = pooled or kind == "pool"
        steps.append(_label(user, modules))
        if kind == "linear":
            linears.append(str(user.target))
        node = user
    if not steps:
        raise WeightPathError(
            f"layer '{layer}' is the model's output: its neurons are already the classes, so they "
            "have no weights to them; pick a layer before it"
        )
    if not linears:
        raise WeightPathError(
            f"layer '{layer}': its path to the output ({_so_far(layer, steps)}) has no Linear "
            "layer, so its neurons are (up to ReLU) the outputs themselves and have no weights to "
            "the classes; pick a layer before a Linear"
        )
    return WeightPath(layer, tuple(steps), tuple(linears))


def find_path(module: nn.Module, layer: str, named: Sequence[str] | None = None) -> WeightPath:
    """The linear path from `layer` to the model's output: traced with torch.fx, or, with
    `named` (config `tellme.weights.path`), the named modules after the layer in forward order.

    Raises WeightPathError when there is none (a convolution, residual addition, branch or
    softmax on the way; no Linear; the layer is the output) or tracing fails.
    """
    from neuroscribe.layers import closest_first

    modules = dict(module.named_modules())
    if not layer or layer not in modules:
        ranked = closest_first(layer, [n for n in modules if n])
        raise WeightPathError(
            f"the model has no layer '{layer}'; closest: {', '.join(ranked[:20])}"
        )
    if named is not None:
        return _named_path(modules, layer, list(named))
    return _traced_path(module, modules, layer)


# -- effective weights ------------------------------------------------------------------------


def _width(module: nn.Module) -> int | None:
    from torch import nn

    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return module.num_features
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    if isinstance(module, nn.LayerNorm) and module.normalized_shape:
        return module.normalized_shape[-1]
    return None


def layer_width(module: nn.Module, layer: str) -> int | None:
    """Neurons of a layer guessed from its modules: its own output width, or for a block that of
    its last-defined submodule with one (the last norm or conv of a ResNet stage); None when
    the layer has no such module (a ReLU, a pool)."""
    found = dict(module.named_modules()).get(layer)
    if found is None:
        return None
    for sub in reversed(list(found.modules())):
        width = _width(sub)
        if width:
            return int(width)
    return None


def _check_shapes(modules: dict[str, nn.Module], path: WeightPath, neurons: int | None) -> None:
    from torch import nn

    linears = []
    for name in path.linears:
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            raise WeightPathError(
                f"layer '{path.layer}': the path's Linear '{name}' is "
                + ("not a module of the model" if module is None else f"a {type(module).__name__}")
                + f"; the model changed since the path was found? Name the path in `{CONFIG_KEY}`"
            )
        linears.append((name, module))
    for (prev, a), (name, b) in itertools.pairwise(linears):
        if b.in_features != a.out_features:
            raise WeightPathError(
                f"layer '{path.layer}': on the path {_so_far(path.layer, list(path.steps))}, "
                f"'{name}' takes {b.in_features} features but '{prev}' gives {a.out_features}; "
                f"name the Linear layers of `{CONFIG_KEY}` in forward order"
            )
    first_name, first = linears[0]
    if neurons is not None and first.in_features != neurons:
        if first.in_features > neurons and first.in_features % neurons == 0:
            raise WeightPathError(
                f"layer '{path.layer}' has {neurons} neurons but '{first_name}' takes "
                f"{first.in_features} = {neurons} × {first.in_features // neurons} features: the "
                "path flattens a spatial map; per-channel weights are not defined. Pick a layer "
                "followed by a global average pool or a Linear"
            )
        raise WeightPathError(
            f"layer '{path.layer}' has {neurons} neurons but the path's first Linear "
            f"'{first_name}' takes {first.in_features} features; the path "
            f"({_so_far(path.layer, list(path.steps))}) does not start at this layer"
            + (f": fix `{CONFIG_KEY}`" if path.steps else "")
        )


def effective_weights(
    module: nn.Module, path: WeightPath, neurons: int | None = None
) -> np.ndarray:
    """float32 [classes, neurons]: W_last @ ... @ W_first of the path's Linear layers (biases and
    ReLU ignored), so row c holds every neuron's weight to class c.

    `neurons` (the layer's neuron count, e.g. from inspection) is checked against the first
    Linear's input; without it the count is guessed from the layer's modules (`layer_width`).
    """
    import numpy as np
    import torch

    modules = dict(module.named_modules())
    if neurons is None:
        neurons = layer_width(module, path.layer)
    _check_shapes(modules, path, neurons)
    linears = [modules[name] for name in path.linears]
    if any(linear.weight.is_meta for linear in linears):
        raise WeightPathError(
            f"layer '{path.layer}': the path's Linear weights are on the meta device (only the "
            "architecture was built); build the model with its weights to compute class weights"
        )
    with torch.no_grad():
        # from the class side: the class count is usually the smallest dimension
        result = linears[-1].weight.detach().float()
        for linear in reversed(linears[:-1]):
            result = result @ linear.weight.detach().to(result.device).float()
    return np.ascontiguousarray(result.cpu().numpy(), dtype=np.float32)


# -- parse time -------------------------------------------------------------------------------


class _LayerSeen(Exception):
    """Raised from the layer's hook: nothing after it needs computing to know its shape."""


def _layer_shape(loaded: Any, layer: str, crop: int) -> list[int] | None:
    import torch

    from neuroscribe.models import first_tensor

    seen: dict[str, list[int] | None] = {}

    def hook(_module: Any, _inputs: Any, output: Any) -> None:
        tensor = first_tensor(output)
        seen["shape"] = list(tensor.shape[1:]) if tensor is not None else None
        raise _LayerSeen

    handle = dict(loaded.module.named_modules())[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            loaded.call(torch.zeros(1, 3, crop, crop))
    except _LayerSeen:
        pass
    finally:
        handle.remove()
    return seen.get("shape")


def _probe(
    target: TargetSpec, layer: str, named: Sequence[str] | None, device: str
) -> tuple[WeightPath, int | None]:
    import torch

    from neuroscribe import models
    from neuroscribe.inspection import neuron_count

    with torch.device(device):
        loaded = models.build_target(target, load_weights=False)
        try:
            path = find_path(loaded.module, layer, named)
        except WeightPathError as err:
            raise WeightPathError(f"target '{target.name}' ({target.spec}): {err}") from None
        shape = _layer_shape(loaded, layer, target.transform.crop)
    neurons = neuron_count(shape)
    try:
        _check_shapes(dict(loaded.module.named_modules()), path, neurons)
    except WeightPathError as err:
        raise WeightPathError(f"target '{target.name}' ({target.spec}): {err}") from None
    return path, neurons


def _cache_key(target: TargetSpec, layer: str, named: Sequence[str] | None) -> str:
    from neuroscribe.inspection import _inspect_key

    parts = {
        "v": CLASSWEIGHTS_VERSION,
        "inspect": _inspect_key(target),
        "layer": layer,
        "named": list(named) if named is not None else None,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def cache_file(target: TargetSpec, layer: str, cache_dir: str | Path) -> Path:
    """Where `check_weight_path` keeps a layer's path: one JSON per (target, layer)."""
    return Path(cache_dir) / "weightpaths" / f"{target.name}.{layer}.json"


def check_weight_path(
    target: TargetSpec, layer: str, named: Sequence[str] | None, cache_dir: str | Path
) -> WeightPath:
    """The layer's path to the classes, checked at parse time on the architecture only (built
    on the meta device where the model allows it, else on the CPU with random weights), with the
    layer's neuron count checked against the first Linear; cached in `cache_dir` per (spec,
    input size, source, layer, named path), so a dry run stays cheap.

    Raises WeightPathError (a ConfigError) naming the target and layer.
    """
    key = _cache_key(target, layer, named)
    cache = cache_file(target, layer, cache_dir)
    if cache.exists():
        try:
            cached = json.loads(cache.read_text())
            if cached.get("key") == key:
                found = cached["path"]
                return WeightPath(found["layer"], tuple(found["steps"]), tuple(found["linears"]))
        except (ValueError, KeyError, TypeError):
            log.info("ignoring unreadable weight-path cache %s", cache)
    try:
        path, neurons = _probe(target, layer, named, "meta")
    except ConfigError:
        raise
    except Exception as exc:
        log.info("meta-device check of %s failed (%s); checking on CPU", target.spec, exc)
        path, neurons = _probe(target, layer, named, "cpu")
    record = {
        "key": key,
        "spec": target.spec,
        "named": list(named) if named is not None else None,
        "neurons": neurons,
        "path": asdict(path),
    }
    try:
        with atomic_path(cache) as tmp:
            tmp.write_text(json.dumps(record, indent=1))
    except OSError as err:
        raise ConfigError(
            f"cannot write {cache} ({err.strerror or err}): neuroscribe keeps everything under "
            "results/{run}/ in the working directory; run where you can write"
        ) from None
    return path
