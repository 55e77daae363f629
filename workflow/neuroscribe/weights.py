"""Weights files of target models (python: and timm: targets with a file).

Three steps, from cheap to thorough, so a bad file fails before any GPU job:
- `sniff_weights`: the first bytes only, at config validation (every `snakemake -n` runs it);
- `check_weights`: the `check_weights` rule, on the machine running snakemake: reads the tensors'
  names and shapes safely and compares them with the model built on the meta device;
- `load_state_dict_file`: the one loader every job uses. Nothing is ever unpickled beyond tensors.

torch is imported inside the functions: config validation imports this module at parse time.
"""

from __future__ import annotations

import logging
import math
import pickletools
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from neuroscribe.config import ConfigError, TargetSpec
from neuroscribe.io import write_json

if TYPE_CHECKING:
    import torch

SAVE_HINT = "Save the weights with torch.save(model.state_dict(), path) or as a .safetensors file."
TORCH_ZIP = "torch-zip"
TORCH_PICKLE = "torch-pickle"
SAFETENSORS = "safetensors"
# how many missing/unexpected keys or shape mismatches a message lists before "and N more"
SHOWN = 5
# the first pickles of torch's legacy format: magic number, protocol, sys info, data, storage keys
LEGACY_PICKLES = 5
_STRING_OPS = {
    "STRING",
    "BINSTRING",
    "SHORT_BINSTRING",
    "UNICODE",
    "BINUNICODE",
    "SHORT_BINUNICODE",
    "BINUNICODE8",
}

log = logging.getLogger(__name__)


class WeightsError(ConfigError):
    """A configured weights file cannot be used: unsafe, unreadable, or for another model."""


# -- the sniff: first bytes only --------------------------------------------------------------


def sniff_format(head: bytes, size: int) -> str | None:
    """The weights format the first bytes announce (None if none): a torch zip archive, a legacy
    torch pickle, or a safetensors file (8-byte little-endian header length, then JSON)."""
    if head.startswith(b"PK\x03\x04"):
        return TORCH_ZIP
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return TORCH_PICKLE
    if len(head) >= 9:
        header_len = int.from_bytes(head[:8], "little")
        if 0 < header_len <= size - 8 and head[8:9] == b"{":
            return SAFETENSORS
    return None


def _looks_like(head: bytes) -> str:
    """What a file that is not weights looks like, for the error message."""
    if not head:
        return "it is empty"
    lowered = head[:512].lower()
    if b"<html" in lowered or b"<!doctype html" in lowered:
        return "it is an HTML page, e.g. an error page saved by a failed download"
    text = head[:200].decode("utf-8", errors="replace")
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if first and "\ufffd" not in first and first.isprintable():
        return f"it starts with {first[:40]!r}"
    return f"it starts with the bytes {head[:8].hex(' ')}"


def _sniff(path: Path) -> tuple[str | None, str | None]:
    """(format, None) for a weights file, else (None, what is wrong), from its first bytes."""
    with path.open("rb") as f:
        head = f.read(4096)
    fmt = sniff_format(head, path.stat().st_size)
    if fmt is not None:
        return fmt, None
    return None, (
        f"file {str(path)!r} is not a PyTorch or safetensors weights file ({_looks_like(head)})"
    )


def sniff_weights(path: str | Path) -> str | None:
    """None if `path` starts like a PyTorch or safetensors weights file, else what is wrong.
    Reads a few bytes and imports nothing, so every dry run can afford it."""
    return _sniff(Path(path))[1]


def configured_weights_file(target: TargetSpec) -> str | None:
    """The weights file the config names for a target: python: and timm: targets with a file.
    None for torchvision weights enums, timm `pretrained`, hf: targets (the hub id holds the
    weights) and targets the workflow trains (their weights are a workflow output)."""
    if target.train or not target.weights or target.kind not in ("python", "timm"):
        return None
    if target.kind == "timm" and target.weights == "pretrained":
        return None
    return target.weights


# -- safe loading -----------------------------------------------------------------------------


def _pickle_globals(stream: IO[bytes], max_pickles: int) -> list[str]:
    """`module.name` of every global the pickles at `stream` refer to, read with pickletools:
    nothing is unpickled, so nothing in the file runs."""
    names: list[str] = []
    for _ in range(max_pickles):
        memo: dict[int, Any] = {}
        pushed: list[Any] = []  # recent stack pushes: STACK_GLOBAL takes the last two strings
        try:
            for op, arg, _pos in pickletools.genops(stream):
                if op.name == "GLOBAL":
                    names.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(pushed) >= 2:
                    names.append(f"{pushed[-2]}.{pushed[-1]}")
                elif op.name == "MEMOIZE":
                    memo[len(memo)] = pushed[-1] if pushed else None
                elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[int(arg)] = pushed[-1] if pushed else None
                if op.name in _STRING_OPS:
                    pushed.append(arg)
                elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                    pushed.append(memo.get(int(arg)))
                elif op.name not in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT", "FRAME", "PROTO"):
                    pushed.append(None)
        except ValueError:
            break  # past the last pickle (raw tensor bytes, or the end of the file)
    return names


def _unsafe_globals(path: Path, fmt: str) -> list[str]:
    """The globals in a torch file that torch's weights-only unpickler refuses."""
    import torch

    if fmt == TORCH_ZIP:
        try:
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        except Exception:
            with zipfile.ZipFile(path) as archive:
                pkl = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                if pkl is None:
                    return []
                with archive.open(pkl) as stream:
                    found = _pickle_globals(stream, 1)
    else:
        with path.open("rb") as stream:
            found = _pickle_globals(stream, LEGACY_PICKLES)
    # tensors are rebuilt by torch's own functions and plain containers: both are allowed
    safe = {"collections.OrderedDict", "builtins.set", "builtins.bytearray", "_codecs.encode"}
    return [n for n in dict.fromkeys(found) if n not in safe and not n.startswith("torch.")]


def _torch_reason(exc: Exception) -> str:
    """torch's own reason, without its advice (which suggests weights_only=False)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    kept = [
        line
        for line in lines
        if "weights_only" not in line
        and "weights only" not in line.lower()
        and not line.startswith("Check the documentation")
    ]
    return (kept[-1] if kept else type(exc).__name__)[:200]


def _torch_load(path: Path, fmt: str) -> Any:
    import pickle

    import torch

    try:
        # mmap: a check of a multi-GB file reads only the tensors' headers; the legacy format
        # cannot be mapped
        return torch.load(path, map_location="cpu", weights_only=True, mmap=fmt == TORCH_ZIP)
    except pickle.UnpicklingError as exc:
        unsafe = _unsafe_globals(path, fmt)
        if unsafe:
            shown = ", ".join(repr(n) for n in unsafe[:SHOWN])
            more = f" and {len(unsafe) - SHOWN} more" if len(unsafe) > SHOWN else ""
            message = (
                f"weights file {str(path)!r} holds Python objects other than tensors "
                f"({shown}{more}); neuroscribe only loads tensors, because unpickling other "
                f"objects can run code. {SAVE_HINT}"
            )
        else:
            message = (
                f"weights file {str(path)!r} is not a plain file of tensors "
                f"({_torch_reason(exc)}). {SAVE_HINT}"
            )
        # from None: torch's own message advises weights_only=False, which would run the file
        raise WeightsError(message) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise WeightsError(
            f"weights file {str(path)!r} is damaged or incomplete ({_torch_reason(exc)}); "
            "copy or save it again"
        ) from exc


def _as_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state_dict inside what a file held: itself, or under 'state_dict' (Lightning)."""
    import torch

    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise WeightsError(
            f"weights file {str(path)!r} holds a {type(obj).__name__}, not a state_dict "
            f"(a dict of tensor names to tensors). {SAVE_HINT}"
        )
    others = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if others:
        shown = ", ".join(repr(k) for k in others[:SHOWN])
        # a training checkpoint keeps the state_dict under a key of its own choosing
        inner = [
            repr(k)
            for k, v in obj.items()
            if isinstance(v, Mapping) and v and all(isinstance(t, torch.Tensor) for t in v.values())
        ]
        hint = f"; its entry {inner[0]} looks like the state_dict: save that alone" if inner else ""
        raise WeightsError(
            f"weights file {str(path)!r} is a dict whose entries {shown}"
            f"{f' and {len(others) - SHOWN} more' if len(others) > SHOWN else ''} are not tensors, "
            f"so not a state_dict (a training checkpoint?){hint}. {SAVE_HINT}"
        )
    return dict(obj)


def _format_of(path: Path) -> str:
    fmt, problem = _sniff(path)
    if fmt is None:
        raise WeightsError(str(problem))
    return fmt


def _damaged_safetensors(path: Path, exc: Exception) -> WeightsError:
    return WeightsError(
        f"weights file {str(path)!r} is a damaged or incomplete safetensors file ({exc}); "
        "copy or save it again"
    )


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict from a torch file (weights_only: tensors and plain containers only) or a
    .safetensors file, on the CPU. The format is read from the file, not its name."""
    path = Path(path)
    fmt = _format_of(path)
    if fmt == SAFETENSORS:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except SafetensorError as exc:
            raise _damaged_safetensors(path, exc) from exc
    return _as_state_dict(_torch_load(path, fmt), path)


def file_shapes(path: str | Path) -> tuple[str, dict[str, tuple[int, ...]]]:
    """The format and the tensor shapes of a weights file, without reading the tensors' data
    where the format allows (safetensors header; torch zip files are memory-mapped)."""
    path = Path(path)
    fmt = _format_of(path)
    if fmt == SAFETENSORS:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return fmt, {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        except SafetensorError as exc:
            raise _damaged_safetensors(path, exc) from exc
    state = _as_state_dict(_torch_load(path, fmt), path)
    return fmt, {k: tuple(v.shape) for k, v in state.items()}


# -- does it fit the model --------------------------------------------------------------------


def _listed(items: list[str]) -> str:
    more = f", and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return ", ".join(items[:SHOWN]) + more


def fit_problems(
    expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]]
) -> list[str]:
    """What keeps a file's tensors from loading into a model (strict load_state_dict), in words."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [
        f"{k} (file {list(found[k])}, model {list(shape)})"
        for k, shape in expected.items()
        if k in found and tuple(found[k]) != tuple(shape)
    ]
    problems = []
    if missing:
        problems.append(
            f"{len(missing)} tensor(s) of the model missing from the file: {_listed(missing)}"
        )
    if unexpected:
        problems.append(
            f"{len(unexpected)} tensor(s) the model does not have: {_listed(unexpected)}"
        )
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es): {_listed(wrong)}")
    if unexpected and all(k.startswith("module.") for k in unexpected):
        stripped = {k.removeprefix("module."): v for k, v in found.items()}
        if set(stripped) == set(expected):
            problems.append(
                "every name starts with 'module.': the file was saved from a DataParallel/DDP "
                "wrapper; save model.module.state_dict() instead"
            )
    return problems


def fit_error(path: str | Path, spec: str, problems: list[str]) -> WeightsError:
    wrapped = any("DataParallel" in p for p in problems)
    advice = (
        ""
        if wrapped
        else (" Check that the target's spec names the architecture the weights were saved from.")
    )
    return WeightsError(
        f"weights file {str(path)!r} does not fit the model {spec}: {'; '.join(problems)}.{advice}"
    )


def model_shapes(target: TargetSpec) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors the target's model expects, from the architecture built
    on the meta device (no memory, no weights)."""
    import torch

    from neuroscribe.models import build_target

    with torch.device("meta"):
        module = build_target(target, load_weights=False).module
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@dataclass(frozen=True)
class WeightsRecord:
    """What the check_weights rule found; later jobs take it as an input, so they wait for it."""

    target: str
    spec: str
    weights: str
    format: str
    tensors: int
    parameters: int
    bytes: int


def check_weights(target: TargetSpec, path: str | Path, out: str | Path) -> WeightsRecord:
    """Read a weights file safely, check it fits the target's model, write the record to `out`."""
    path = Path(path)
    fmt, found = file_shapes(path)
    problems = fit_problems(model_shapes(target), found)
    if problems:
        raise fit_error(path, target.spec, problems)
    record = WeightsRecord(
        target=target.name,
        spec=target.spec,
        weights=str(path),
        format=fmt,
        tensors=len(found),
        parameters=sum(math.prod(s) for s in found.values()),
        bytes=path.stat().st_size,
    )
    write_json(asdict(record), out)
    log.info(
        "%s: %s (%s, %d tensors, %s values) fits %s",
        record.target,
        record.weights,
        record.format,
        record.tensors,
        f"{record.parameters:,}",
        record.spec,
    )
    return record
