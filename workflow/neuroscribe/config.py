"""Config validation (JSON schema, with every registered method's section) and the typed records built from it."""

from __future__ import annotations

import copy
import difflib
import functools
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import jsonschema

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schemas" / "config.schema.yaml"
FILELIST_SUFFIXES = (".csv", ".parquet")


NO_CONFIG = (
    "no config given: pass one with --configfile, e.g. `snakemake --profile profiles/local "
    "--configfile config/demo.yaml` for the built-in demo, or your own file (start from "
    "config/config.yaml; put site settings in an overlay: --configfile config/config.yaml "
    "site.yaml)"
)


class ConfigError(ValueError):
    """A config value is wrong; the message names the key, what is allowed and how to fix it."""


@dataclass(frozen=True)
class Transform:
    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass(frozen=True)
class LayerSpec:
    name: str
    neurons: str | dict[str, int]
    pooling: str
    tokens: str


@dataclass(frozen=True)
class TargetSpec:
    name: str
    spec: str
    weights: str | None
    transform: Transform
    layers: tuple[LayerSpec, ...]
    train: dict[str, Any] | None = None  # the demo training's arguments (spurious: a dict)

    @property
    def kind(self) -> str:
        return self.spec.split(":", 1)[0]

    @property
    def ref(self) -> str:
        return self.spec.split(":", 1)[1]

    def layer(self, name: str) -> LayerSpec:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def weights_files(self) -> list[Path]:
        """The weights file, when `weights` names one (not a torchvision weights enum)."""
        if self.weights is None or not Path(self.weights).is_file():
            return []
        return [Path(self.weights)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TargetSpec:
        transform = data["transform"]
        return cls(
            name=data["name"],
            spec=data["spec"],
            weights=data.get("weights"),
            transform=Transform(
                resize=transform["resize"],
                crop=transform["crop"],
                mean=tuple(transform["mean"]),
                std=tuple(transform["std"]),
            ),
            layers=tuple(LayerSpec(**layer) for layer in data["layers"]),
            train=data.get("train"),
        )


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    type: str
    path: str | None = None
    labels: str = "none"
    path_column: str = "path"
    label_column: str = "label"
    n_images: int = 240
    image_size: int = 64
    seed: int = 0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DatasetSpec:
        return cls(**data)


# rules of the workflow itself: a method's stage may not take one of their names
CORE_STAGES = (
    "manifest",
    "train",
    "activations",
    "merge",
    "exemplars",
    "describe",
    "evaluate",
    "evaluation",
    "plan",
)


def _check_moved(config: dict[str, Any]) -> None:
    """Keys of older configs that moved into a method's section say where they live now."""
    from neuroscribe import methods

    for name in methods.registered():
        for old, now in methods.get(name).moved_keys.items():
            node: Any = config
            for part in old.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node is not None:
                raise ConfigError(
                    f"config key '{old}' has moved: it is now '{now}' (settings that only the "
                    f"`{name}` method uses live in its own section); move it there"
                )


def config_schema() -> dict[str, Any]:
    """The config schema with every registered method: its name among the allowed `methods`,
    its section (its own schema) and its stages' `resources` entries with their defaults."""
    from neuroscribe import methods

    schema = copy.deepcopy(_base_schema())
    props = schema["properties"]
    names = list(methods.registered())
    props["methods"]["items"]["enum"] = names
    seen = dict.fromkeys(CORE_STAGES, "the workflow")
    for name in names:
        method = methods.get(name)
        if name in props:
            raise ConfigError(f"method {name!r} is named like the config key '{name}'; rename it")
        if method.config_schema is not None:
            section = _read_yaml(method.config_schema)
            # a subschema naming its own dialect would be checked by a plain validator, one
            # that fills in no defaults
            section.pop("$schema", None)
            props[name] = section | {"default": section.get("default", {})}
        for stage in (*method.stages, *method.jobs):
            if stage.name in seen:
                raise ConfigError(
                    f"method {name!r} has a stage {stage.name!r}, a name {seen[stage.name]} "
                    "already uses; rename the stage"
                )
            seen[stage.name] = f"method {name!r}"
            props["resources"]["properties"][stage.name] = {
                "type": "object",
                "additionalProperties": False,
                "default": {},
                "properties": {
                    key: {"$ref": f"#/$defs/{key}", "default": stage.resources.get(key)}
                    for key in ("mem_mb", "runtime", "cpus", "gpus")
                },
            }
    return schema


@functools.cache
def _base_schema() -> dict[str, Any]:
    return _read_yaml(SCHEMA_PATH)


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(Path(path).read_text())


def _validator(schema: dict[str, Any]) -> Any:
    """A validator that fills in defaults as it descends (the jsonschema FAQ's recipe, which
    `snakemake.utils.validate` also uses; that one takes a schema file, not a composed schema)."""
    base = jsonschema.Draft202012Validator
    check_properties = base.VALIDATORS["properties"]

    def set_defaults(validator: Any, properties: Any, instance: Any, sub: Any) -> Any:
        for name, prop in properties.items():
            if "default" in prop and isinstance(instance, dict):
                instance.setdefault(name, copy.deepcopy(prop["default"]))
        yield from check_properties(validator, properties, instance, sub)

    return jsonschema.validators.extend(base, {"properties": set_defaults})(schema)


def validate_config(config: dict[str, Any], check_paths: bool = True) -> dict[str, Any]:
    """Validate `config` in place against the schema (filling defaults), then check what a
    schema cannot (unique names, existing paths). Raises ConfigError with a readable message.
    Values are never rewritten: what is derived from them is `derive`'s job."""
    if not config:
        raise ConfigError(NO_CONFIG)
    _check_moved(config)
    try:
        _validator(config_schema()).validate(config)
    except jsonschema.ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None
    _check_semantics(config, check_paths)
    return config


@dataclass(frozen=True)
class Derived:
    """What the workflow derives from a validated config (never written back into it)."""

    llm_model: str | None  # `llm.model`, or the backend's default model
    llm_on_head: bool  # LLM API calls run where snakemake runs, not on compute nodes

    def llm(self, config: dict[str, Any]) -> dict[str, Any]:
        """The `llm` section a job gets: the model filled in; where it runs left out, because
        moving a job must not rerun it."""
        section = {k: v for k, v in config["llm"].items() if k != "run_on"}
        return section | {"model": self.llm_model}


# role settings that change how fast a job runs or how often it retries, never what it writes:
# a stage's settings leave them out, so changing them reruns nothing
PERFORMANCE_KEYS = frozenset(
    {"batch_size", "max_concurrency", "max_attempts", "timeout_s", "run_on"}
)


def result_settings_of(section: dict[str, Any]) -> dict[str, Any]:
    """A role's config section without its performance settings (`PERFORMANCE_KEYS`)."""
    return {k: v for k, v in section.items() if k not in PERFORMANCE_KEYS}


def derive(config: dict[str, Any]) -> Derived:
    llm = config["llm"]
    defaults = _base_schema()["properties"]["llm"]["properties"]["model"]["x-backend-defaults"]
    run_on = llm["run_on"]
    if run_on == "auto":
        run_on = "head" if llm["backend"] == "openai" else "compute"
    return Derived(
        llm_model=llm["model"] if llm["model"] is not None else defaults.get(llm["backend"]),
        llm_on_head=run_on == "head",
    )


def run_name(config: dict[str, Any]) -> str:
    """The run's folder name under results/: `run`, or `run-preset` when a preset is layered on,
    so a preset's results never overwrite those of the settings it is compared with."""
    preset = config.get("preset")
    return f"{config['run']}-{preset}" if preset else config["run"]


def targets_from_config(config: dict[str, Any]) -> list[TargetSpec]:
    """Typed targets with per-layer pooling/tokens/neurons resolved from the target defaults."""
    targets = []
    for raw in config["targets"]:
        layers = []
        for layer in raw["layers"]:
            entry = {"name": layer} if isinstance(layer, str) else layer
            layers.append(
                LayerSpec(
                    name=entry["name"],
                    neurons=entry.get("neurons", "all"),
                    pooling=entry.get("pooling", raw["pooling"]),
                    tokens=entry.get("tokens", raw["tokens"]),
                )
            )
        targets.append(TargetSpec.from_dict({**raw, "layers": [asdict(layer) for layer in layers]}))
    return targets


def datasets_from_config(config: dict[str, Any]) -> list[DatasetSpec]:
    return [DatasetSpec.from_dict(d) for d in config["probe"]["datasets"]]


# -- messages ---------------------------------------------------------------------------------


def _where(path: Any) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _description(err: jsonschema.ValidationError) -> str | None:
    node: jsonschema.ValidationError | None = err
    while node is not None:
        if "description" in node.schema:
            return " ".join(str(node.schema["description"]).split())
        node = node.parent
    return None


def format_validation_error(err: jsonschema.ValidationError) -> str:
    """Turn a jsonschema error into one line naming the key, the bad value and what is allowed."""
    if err.validator in ("anyOf", "oneOf"):
        # report the failure inside the alternative meant for this kind of value (an object
        # with a misspelt key, a malformed range string), not "matches none of the alternatives"
        relevant = [e for e in err.context or [] if e.validator != "type"]
        if relevant:
            return format_validation_error(jsonschema.exceptions.best_match(relevant))
    where = _where(err.absolute_path)
    key = f"config key '{where}'" if where else "config"
    validator = err.validator
    if validator == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
        unknown = sorted(set(err.instance) - set(allowed))
        bad = unknown[0]
        close = difflib.get_close_matches(bad, allowed, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return (
            f"{'config' if not where else f'config section {where!r}'}: unknown key '{bad}'{hint}; "
            f"allowed keys: {', '.join(allowed)}"
        )
    if validator == "required":
        missing = [k for k in err.validator_value if k not in err.instance]
        section = f"config section '{where}'" if where else "config"
        return f"{section}: missing required key '{missing[0]}'"
    if validator == "enum":
        allowed = ", ".join(str(v) for v in err.validator_value)
        return f"{key}: {err.instance!r} is not allowed; allowed values: {allowed}"
    if validator == "type":
        expected = err.validator_value
        expected = " or ".join(expected) if isinstance(expected, list) else expected
        return f"{key}: expected {expected}, got {err.instance!r}"
    if validator in ("pattern", "anyOf", "oneOf"):
        desc = _description(err)
        return f"{key}: {err.instance!r} is not valid" + (f"; expected {desc}" if desc else "")
    if validator in ("minItems", "maxItems"):
        lo, hi = err.schema.get("minItems"), err.schema.get("maxItems")
        want = (
            f"exactly {lo}"
            if lo == hi
            else (f"at least {lo}" if validator == "minItems" else f"at most {hi}")
        )
        return f"{key}: {err.instance!r} has {len(err.instance)} item(s); expected {want}"
    return f"{key}: {err.message}"


# -- checks a schema cannot express ------------------------------------------------------------


def _unique(names: list[str], what: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ConfigError(f"{what} '{name}' appears twice; give each a distinct name")
        seen.add(name)


def _check_semantics(config: dict[str, Any], check_paths: bool) -> None:
    _unique([t["name"] for t in config["targets"]], "target name")
    for i, target in enumerate(config["targets"]):
        layer_names = [x if isinstance(x, str) else x["name"] for x in target["layers"]]
        _unique(layer_names, f"targets[{i}]: layer")
        tf = target["transform"]
        if tf["crop"] > tf["resize"]:
            raise ConfigError(
                f"config key 'targets[{i}].transform.crop': {tf['crop']} is larger than "
                f"transform.resize ({tf['resize']}); the centre crop must fit in the resized image"
            )
        kind = target["spec"].split(":", 1)[0]
        weights = target.get("weights")
        if "train" in target and (kind != "python" or weights):
            raise ConfigError(
                f"config key 'targets[{i}].train': only a python: target without weights can be "
                "trained by the workflow (the trained weights become its weights)"
            )
        if kind == "hf" and weights:
            raise ConfigError(
                f"config key 'targets[{i}].weights': hf targets take their weights from the hub id "
                f"or folder in spec; remove weights ({weights!r})"
            )
        weights_is_file = kind == "python" or (kind == "timm" and weights != "pretrained")
        if check_paths and weights and weights_is_file and not Path(weights).is_file():
            raise ConfigError(
                f"config key 'targets[{i}].weights': file {weights!r} does not exist"
                + ("; use `pretrained` for timm's own weights" if kind == "timm" else "")
            )
        if check_paths and weights and weights_is_file:
            # imported here: weights.py imports this module
            from neuroscribe.weights import sniff_weights

            if (problem := sniff_weights(weights)) is not None:
                raise ConfigError(f"config key 'targets[{i}].weights': {problem}")
    datasets = config["probe"]["datasets"]
    _unique([d["name"] for d in datasets], "probe dataset name")
    for i, ds in enumerate(datasets):
        where = f"config key 'probe.datasets[{i}].path'"
        if ds["type"] == "filelist" and not ds["path"].endswith(FILELIST_SUFFIXES):
            raise ConfigError(f"{where}: {ds['path']!r} is not a .csv or .parquet file list")
        if not check_paths or ds["type"] == "demo":
            continue
        path = Path(ds["path"])
        if ds["type"] == "folder" and not path.is_dir():
            raise ConfigError(
                f"{where}: folder {ds['path']!r} of dataset '{ds['name']}' does not exist; "
                "set it to your image folder in the config file"
            )
        if ds["type"] == "filelist" and not path.is_file():
            raise ConfigError(
                f"{where}: file list {ds['path']!r} of dataset '{ds['name']}' does not exist"
            )
    calibration = config["plan"]["calibration"]
    if check_paths and calibration and not Path(calibration).is_file():
        raise ConfigError(
            f"config key 'plan.calibration': file {calibration!r} does not exist; it is the "
            "calibration.json that `python benchmarks/gpu_suite.py --out DIR` writes in DIR"
        )
    _check_roles(config, check_paths)


def looks_like_path(ref: str) -> bool:
    """A model given as a local path (not a hub id), even before the path exists."""
    return ref.startswith(("/", "./", "../", "~"))


def _check_roles(config: dict[str, Any], check_paths: bool) -> None:
    from neuroscribe import methods

    llm = config["llm"]
    if llm["run_on"] == "head" and llm["backend"] == "local":
        raise ConfigError(
            "config key 'llm.run_on': `head` would run the local chat model on the machine "
            "running snakemake (a login node); use `compute`, or serve the model (e.g. vLLM) "
            "and use backend `openai`"
        )
    enabled = methods.enabled(config)
    used = {role for method in enabled for role in method.roles}
    captioner = config["captioner"]
    if "captioner" in used and captioner["backend"] == "annotations":
        plain = [d["name"] for d in config["probe"]["datasets"] if d["type"] != "demo"]
        if plain:
            raise ConfigError(
                "config key 'captioner.backend': `annotations` needs probe datasets that ship "
                f"captions, and {plain} do not (only demo datasets do); use `blip`"
            )
    check_model_folders(
        {
            "captioner.model": (
                captioner["model"]
                if "captioner" in used and captioner["backend"] == "blip"
                else None
            ),
            "llm.model": (
                derive(config).llm_model if "llm" in used and llm["backend"] == "local" else None
            ),
        },
        check_paths,
    )
    for method in enabled:
        if method.check_config is not None:
            method.check_config(config, check_paths)


def check_model_folders(folders: dict[str, str | None], check_paths: bool) -> None:
    """Each role model given as a local path must be an existing folder ({config key: model})."""
    for key, model in folders.items():
        if (
            check_paths
            and model
            and looks_like_path(model)
            and not Path(model).expanduser().is_dir()
        ):
            raise ConfigError(f"config key '{key}': folder {model!r} does not exist")
