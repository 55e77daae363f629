"""Class names of a target's output layer, read from the target itself where it has them.

torchvision weight enums carry `meta["categories"]`, timm models the label names of the
dataset they were trained on, Hugging Face configs `id2label`. A `python:` target takes them
from the file named by its `classes` key (one class per line; synonyms after the name,
separated by commas), or from a `class_names` attribute of its factory (the demo CNN's shapes).
Anything else has no class names: its output layer gets no known-concept metric, and no error.
"""

from __future__ import annotations

import logging
from pathlib import Path

from neuroscribe.config import ConfigError, TargetSpec

log = logging.getLogger(__name__)

Names = list[list[str]]  # per class: its name, then its synonyms


def read_class_file(path: str | Path, width: int | None = None) -> Names:
    """A class file: one class per line, `name[, synonym...]`; its length must be the layer's
    width when that is given."""
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    names = [[part.strip() for part in line.split(",") if part.strip()] for line in lines if line]
    if width is not None and len(names) != width:
        raise ConfigError(
            f"class file {path} has {len(names)} classes but the output layer has {width} "
            "neurons; give one line per output neuron, in order"
        )
    return names


def _torchvision(target: TargetSpec) -> list[str] | None:
    import torchvision

    if target.weights is None:
        return None
    weights = torchvision.models.get_model_weights(target.ref)[target.weights]
    return list(weights.meta.get("categories") or []) or None


def _timm(target: TargetSpec) -> list[str] | None:
    import timm
    from timm.data import ImageNetInfo, infer_imagenet_subset

    model = timm.create_model(target.ref, pretrained=False)
    subset = infer_imagenet_subset(model)
    return list(ImageNetInfo(subset).label_names()) if subset else None


def _hf(target: TargetSpec) -> list[str] | None:
    import transformers

    config = transformers.AutoConfig.from_pretrained(target.ref)
    labels = getattr(config, "id2label", None) or {}
    names = [labels[i] for i in sorted(labels)]
    # a config without real labels has the placeholders LABEL_0, LABEL_1, ...
    if not names or all(n == f"LABEL_{i}" for i, n in enumerate(names)):
        return None
    return names


def _python(target: TargetSpec) -> list[str] | None:
    from neuroscribe.models import _import_factory

    names = getattr(_import_factory(target.ref), "class_names", None)
    return list(names) if names else None


def class_names(target: TargetSpec, classes_file: str | None, width: int) -> Names | None:
    """The output layer's class names (each with its synonyms), or None where the target has
    none or they do not match the layer's width."""
    if classes_file:
        return read_class_file(classes_file, width)
    reader = {"torchvision": _torchvision, "timm": _timm, "hf": _hf, "python": _python}.get(
        target.kind
    )
    try:
        found = reader(target) if reader else None
    except Exception as err:  # no names is a normal answer; say why, and go on without them
        log.warning("no class names for %s: %s", target.spec, err)
        return None
    if found is None:
        return None
    if len(found) != width:
        log.warning(
            "%s names %d classes but its output layer has %d neurons: no known-concept metric",
            target.spec,
            len(found),
            width,
        )
        return None
    # "great white shark, white shark" style names carry their synonyms after commas
    return [[p.strip() for p in name.split(",") if p.strip()] for name in found]


def check_class_files(config: dict, output_layers: dict, layer_sizes: dict) -> None:
    """At parse time: each `targets[].classes` file exists and has one line per neuron of its
    target's output layer (when that layer is described)."""
    for target in config["targets"]:
        path = target.get("classes")
        if not path:
            continue
        where = f"config key 'targets[{target['name']}].classes'"
        if not Path(path).is_file():
            raise ConfigError(f"{where}: class file {path} does not exist")
        layer = output_layers.get(target["name"])
        width = layer_sizes.get(target["name"], {}).get(layer) if layer else None
        try:
            read_class_file(path, width)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
