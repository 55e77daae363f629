"""Target models: build from a spec, inspect layer shapes cheaply, hook layers and pool outputs."""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib
import importlib.util
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neuroscribe.config import ConfigError, LayerSpec, TargetSpec
from neuroscribe.hub import fetching
from neuroscribe.layers import LayerError, closest_first
from neuroscribe.weights import fit_error, fit_problems, load_state_dict_file

log = logging.getLogger(__name__)


@dataclass
class LoadedTarget:
    """A target model ready to run: `call(x)` hides the calling convention (HF takes pixel_values)."""

    module: nn.Module
    call: Callable[[torch.Tensor], Any]


# -- building ---------------------------------------------------------------------------------


def _import_factory(ref: str) -> Callable[[], nn.Module]:
    module_ref, sep, factory_name = ref.rpartition(":")
    if not sep or not module_ref or not factory_name:
        raise ConfigError(
            f"python target 'python:{ref}' must be python:MODULE:FACTORY or python:FILE.py:FACTORY"
        )
    if module_ref.endswith(".py"):
        path = Path(module_ref)
        if not path.is_file():
            raise ConfigError(f"python target: file {module_ref!r} does not exist")
        name = f"neuroscribe_user_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]}"
        module = sys.modules.get(name)
        if module is None:
            spec = importlib.util.spec_from_file_location(name, path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_ref)
        except ImportError as exc:
            raise ConfigError(f"python target: cannot import module {module_ref!r}: {exc}") from exc
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise ConfigError(f"python target: {module_ref!r} has no callable {factory_name!r}")
    return factory


def _torchvision_weights(name: str, weights: str | None) -> Any:
    import torchvision

    if weights is None:
        return None
    enum = torchvision.models.get_model_weights(name)
    if weights == "DEFAULT":
        return enum.DEFAULT
    valid = [w.name for w in enum]
    if weights not in valid:
        raise ConfigError(
            f"torchvision model {name!r} has no weights {weights!r}; "
            f"valid: {', '.join([*valid, 'DEFAULT'])}"
        )
    return enum[weights]


def _load_state_dict(model: nn.Module, path: str, spec: str) -> None:
    """Load a torch or .safetensors weights file: tensors only (weights.load_state_dict_file)."""
    state = load_state_dict_file(path)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = fit_problems(expected, {k: tuple(v.shape) for k, v in state.items()})
    if problems:
        raise fit_error(path, spec, problems)
    model.load_state_dict(state)


def build_target(target: TargetSpec, load_weights: bool = True) -> LoadedTarget:
    """Build the target model on the current default device, in eval mode.

    With load_weights=False only the architecture is built (enough to know layer shapes).
    """
    kind, ref = target.kind, target.ref
    if kind == "torchvision":
        import torchvision

        if ref not in torchvision.models.list_models():
            close = difflib.get_close_matches(ref, torchvision.models.list_models(), n=5)
            raise ConfigError(
                f"torchvision has no model {ref!r}"
                + (f"; closest: {', '.join(close)}" if close else "")
            )
        weights = _torchvision_weights(ref, target.weights)
        if load_weights:
            with fetching(f"torchvision:{ref} {target.weights}", "target"):
                model = torchvision.models.get_model(ref, weights=weights)
        else:
            kwargs = {"num_classes": len(weights.meta["categories"])} if weights else {}
            model = torchvision.models.get_model(ref, weights=None, **kwargs)
        return LoadedTarget(model.eval(), model)
    if kind == "timm":
        import timm

        if not timm.is_model(ref):
            close = difflib.get_close_matches(ref, timm.list_models(), n=5)
            raise ConfigError(
                f"timm has no model {ref!r}" + (f"; closest: {', '.join(close)}" if close else "")
            )
        pretrained = load_weights and target.weights == "pretrained"
        with fetching(f"timm:{ref} pretrained", "target"):
            model = timm.create_model(ref, pretrained=pretrained)
        if load_weights and target.weights and target.weights != "pretrained":
            _load_state_dict(model, target.weights, target.spec)
        return LoadedTarget(model.eval(), model)
    if kind == "hf":
        import transformers

        with fetching(ref, "target"):
            config = transformers.AutoConfig.from_pretrained(ref)
            archs = getattr(config, "architectures", None) or []
            auto = (
                transformers.AutoModelForImageClassification
                if any(a.endswith("ForImageClassification") for a in archs)
                else transformers.AutoModel
            )
            model = auto.from_pretrained(ref) if load_weights else auto.from_config(config)
        model.eval()
        return LoadedTarget(model, lambda x: model(pixel_values=x))
    if kind == "python":
        model = _import_factory(ref)()
        if not isinstance(model, nn.Module):
            raise ConfigError(
                f"python target {ref!r}: the factory returned {type(model).__name__}, not a torch.nn.Module"
            )
        if load_weights and target.weights:
            _load_state_dict(model, target.weights, target.spec)
        return LoadedTarget(model.eval(), model)
    raise ConfigError(f"unknown target kind {kind!r}")


# -- inspection -------------------------------------------------------------------------------


def first_tensor(output: Any) -> torch.Tensor | None:
    """The tensor a module produced: itself, or the first tensor of a tuple / ModelOutput."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    return None


def record_shapes(target: TargetSpec, device: str) -> dict[str, dict[str, Any]]:
    with torch.device(device):
        loaded = build_target(target, load_weights=False)
        modules = dict(loaded.module.named_modules())
        found: dict[str, dict[str, Any]] = {}

        def hook(name: str) -> Callable[..., None]:
            def record(_module: nn.Module, _inputs: Any, output: Any) -> None:
                entry = found.setdefault(name, {"shape": None, "calls": 0})
                entry["calls"] += 1
                tensor = first_tensor(output)
                entry["shape"] = list(tensor.shape[1:]) if tensor is not None else None

            return record

        handles = [m.register_forward_hook(hook(n)) for n, m in modules.items() if n]
        try:
            crop = target.transform.crop
            with torch.no_grad():
                loaded.call(torch.zeros(1, 3, crop, crop))
        finally:
            for handle in handles:
                handle.remove()
    # modules never called in forward (e.g. unused heads) are listed without a shape
    return {n: found.get(n, {"shape": None, "calls": 0}) for n in modules if n}


# -- running with hooks -----------------------------------------------------------------------


def pool(output: torch.Tensor, layer: LayerSpec) -> torch.Tensor:
    """[B, C, H, W] → spatial avg/max; [B, T, C] → CLS token or token mean; [B, C] as is."""
    if output.ndim == 2:
        return output
    if output.ndim == 4:
        return output.mean((2, 3)) if layer.pooling == "avg" else output.amax((2, 3))
    if output.ndim == 3:
        return output[:, 0] if layer.tokens == "cls" else output.mean(1)
    raise LayerError(f"layer '{layer.name}' output has {output.ndim} dims; cannot pool")


class _AllLayersSeen(Exception):
    """Raised from the last hook so layers after the deepest requested one are not computed."""


class LayerRecorder:
    """Hooks the requested layers; `run(x)` returns their pooled outputs [B, C] in one forward pass
    (or, with pooled=False, the raw outputs, e.g. spatial maps [B, C, H, W])."""

    def __init__(self, target: LoadedTarget, layers: list[LayerSpec], pooled: bool = True) -> None:
        self.target = target
        self.layers = layers
        self.pooled = pooled
        self._out: dict[str, torch.Tensor] = {}
        modules = dict(target.module.named_modules())
        missing = [layer.name for layer in layers if layer.name not in modules]
        if missing:
            raise LayerError(
                f"the model has no layers {missing}; valid: {', '.join(closest_first(missing[0], list(modules)[1:]))}"
            )
        self._handles = [
            modules[layer.name].register_forward_hook(self._hook(layer)) for layer in layers
        ]

    def _hook(self, layer: LayerSpec) -> Callable[..., None]:
        def capture(_module: nn.Module, _inputs: Any, output: Any) -> None:
            tensor = first_tensor(output)
            if tensor is None:
                raise LayerError(f"layer '{layer.name}' returned no tensor")
            self._out[layer.name] = pool(tensor, layer) if self.pooled else tensor
            if len(self._out) == len(self.layers):
                raise _AllLayersSeen

        return capture

    def run(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self._out = {}
        with contextlib.suppress(_AllLayersSeen):
            self.target.call(x)
        missing = [layer.name for layer in self.layers if layer.name not in self._out]
        if missing:
            raise LayerError(f"layers {missing} did not run in the forward pass")
        return self._out

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
