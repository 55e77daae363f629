"""`python -m neuroscribe STAGE JSON`: the one call each Snakemake rule makes into the package.

The JSON object holds the stage's arguments (paths, specs, settings), so a job can be re-run by
hand from the command `snakemake -p` prints.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import importlib
import inspect
import json
import logging
import sys
import traceback
import types
import typing
from collections.abc import Callable
from typing import Any

from neuroscribe.redaction import RedactingFilter, redact, secret_values

# The workflow's own stages, as "module:function"; each method's stages come from the registry.
# A stage's module is imported only when it runs: a light job (manifest, merge, table) then
# never pays for importing torch, which is most of a small job's start-up time.
CORE_STAGES = {
    "render-demo": "neuroscribe.demo.world:render_world",
    "train": "neuroscribe.demo.cnn:train_target",
    "manifest": "neuroscribe.probe:build_manifest",
    "activations": "neuroscribe.activations:extract_shard",
    "merge": "neuroscribe.merge:merge_layer",
    "exemplars": "neuroscribe.exemplars:chunk_exemplars",
    "describe": "neuroscribe.describe:write_descriptions",
    "evaluate-layer": "neuroscribe.evaluation.stage:evaluate_layer",
    "evaluate-summary": "neuroscribe.evaluation.stage:summarise",
    "evaluate-shortcuts": "neuroscribe.demo.shortcuts:write_checks",
    "report": "neuroscribe.report.build:build_report",
    "plan": "neuroscribe.plan:run_plan",
    "check-weights": "neuroscribe.weights:check_weights",
    "prefetch": "neuroscribe.prefetch:run_prefetch",
}


class StageArgumentError(TypeError):
    """The JSON arguments do not fit the stage function: a key is unknown or missing."""


def stages() -> dict[str, str]:
    """Every stage `python -m neuroscribe` runs: the workflow's, then each method's."""
    from neuroscribe import methods

    found = dict(CORE_STAGES)
    for name in methods.registered():
        method = methods.get(name)
        found |= {s.name: s.function for s in (*method.stages, *method.jobs)}
    return found


def stage_function(ref: str) -> Callable[..., Any]:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def _record(hint: Any) -> type | None:
    """The dataclass a parameter's type names (X, X | None), if any."""
    options = (
        typing.get_args(hint)
        if typing.get_origin(hint) in (typing.Union, types.UnionType)
        else (hint,)
    )
    found = [o for o in options if dataclasses.is_dataclass(o)]
    return found[0] if found else None


def _convert(hint: Any, value: Any) -> Any:
    """JSON values into the records the function takes (TargetSpec, lists of LayerSpec...)."""
    record = _record(hint)
    if record is not None and isinstance(value, dict):
        from_dict = getattr(record, "from_dict", None)
        return from_dict(value) if from_dict else record(**value)
    if typing.get_origin(hint) in (list, tuple, collections.abc.Sequence) and isinstance(
        value, list
    ):
        (item, *_) = typing.get_args(hint) or (Any,)
        return [_convert(item, v) for v in value]
    return value


def bind(stage: str, function: Callable[..., Any], args: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments for `function`, converted; StageArgumentError names the stage and
    the key when one is unknown or missing (checked before the stage loads anything)."""
    signature = inspect.signature(function)
    params = signature.parameters
    unknown = sorted(set(args) - set(params))
    if unknown:
        raise StageArgumentError(
            f"stage {stage!r}: unknown argument {unknown[0]!r}; it takes {', '.join(params)}"
        )
    missing = [name for name, p in params.items() if p.default is p.empty and name not in args]
    if missing:
        raise StageArgumentError(f"stage {stage!r}: missing argument {missing[0]!r}")
    try:
        hints = typing.get_type_hints(function)
    except NameError as err:
        # without the types, a spec would reach the function as a plain dict
        raise StageArgumentError(
            f"stage {stage!r}: the annotations of {function.__qualname__} name a type its module "
            f"does not import at run time ({err}); import it at the module's top level"
        ) from err
    return {key: _convert(hints.get(key, Any), value) for key, value in args.items()}


def check_config(paths: list[str]) -> int:
    """`neuroscribe check-config FILE...`: the files as --configfile layers them, checked."""
    from neuroscribe.config import ConfigError
    from neuroscribe.configfiles import check_config_files

    try:
        print(check_config_files(paths))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["check-config"] and len(argv) > 1:
        return check_config(argv[1:])
    # the workflow's own stages are found without loading the registry: its methods' modules
    # import pandas and pyarrow, which a light job (merge, manifest) otherwise never pays for
    ref = (CORE_STAGES.get(argv[0]) or stages().get(argv[0])) if len(argv) == 2 else None
    if ref is None:
        print(
            f"usage: python -m neuroscribe {{{','.join(stages())}}} JSON_ARGUMENTS\n"
            "       python -m neuroscribe check-config CONFIG_FILE...",
            file=sys.stderr,
        )
        return 2
    stage, args = argv[0], json.loads(argv[1])
    # an API key must not reach the job log, even inside an error a server echoed back
    secrets = secret_values([(args.get("llm") or {}).get("api_key_env")])
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactingFilter(secrets))
    logging.basicConfig(
        level=logging.INFO,
        handlers=[handler],
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        function = stage_function(ref)
        kwargs = bind(stage, function, args)
    except StageArgumentError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        function(**kwargs)
    except Exception:
        print(redact(traceback.format_exc(), secrets), file=sys.stderr, end="")
        return 1
    return 0
