"""`snakemake prefetch`: download every model a config names into the local caches, on the
machine running snakemake (a login node), so jobs on compute nodes without internet find them.

Hugging Face models go to HF_HOME (huggingface_hub's cache, the one transformers, diffusers and
timm read); torchvision and URL-hosted timm weights to TORCH_HOME (torch.hub's cache). Each model
is fetched with the library call its loader uses, so a job then finds exactly the files it reads.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from neuroscribe.config import TargetSpec, looks_like_path
from neuroscribe.hub import hf_cache_dir, torch_cache_dir, torch_home

log = logging.getLogger(__name__)

HF = "hf"  # a transformers model: a snapshot of the files from_pretrained reads
DIFFUSERS = "diffusers"  # a diffusers pipeline: the files DiffusionPipeline.download selects
TORCHVISION = "torchvision"  # a torchvision weights enum: its .pth in TORCH_HOME
TIMM = "timm"  # timm's pretrained weights: from the Hugging Face Hub or a URL
LOCAL = "local"  # a folder or file on disk: nothing to download

# files of other frameworks, never read by transformers with PyTorch
FOREIGN_FILES = [
    "*.h5",
    "*.msgpack",
    "*.onnx",
    "*.onnx_data",
    "*.tflite",
    "*.ot",
    "*.gguf",
    "*.mlmodel",
    "onnx/*",
    "openvino/*",
    "coreml/*",
]
# with safetensors weights in a repo, transformers never reads its pickled copies
PICKLED_WEIGHTS = ["*.bin", "*.pt", "*.pth", "*.ckpt"]
# timm's own rule (timm.models._hub): a .safetensors twin of a .bin is read first
SAFE_TWINS = {
    "pytorch_model.bin": "model.safetensors",
    "open_clip_pytorch_model.bin": "open_clip_model.safetensors",
}


@dataclass(frozen=True)
class ModelRef:
    """One model a config names: which role uses it, its id, and how it is fetched."""

    role: str
    model: str
    source: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class Outcome:
    ref: ModelRef
    status: str  # downloaded | already cached | skipped (local folder) | failed
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.status == "failed"


class PrefetchError(RuntimeError):
    """Some models could not be downloaded."""


def _is_local(model: str) -> bool:
    return looks_like_path(model) or Path(model).expanduser().exists()


def hub_or_local(role: str, model: str, source: str) -> ModelRef:
    return ModelRef(role, model, LOCAL if _is_local(model) else source)


def _target_ref(target: TargetSpec) -> ModelRef | None:
    role = f"target {target.name}"
    if target.kind == "torchvision" and target.weights:
        return ModelRef(role, f"{target.ref}:{target.weights}", TORCHVISION)
    if target.kind == "timm" and target.weights == "pretrained":
        return ModelRef(role, target.ref, TIMM)
    if target.kind == "hf":
        return hub_or_local(role, target.ref, HF)
    if target.weights and not target.train and target.kind in ("timm", "python"):
        return ModelRef(role, target.weights, LOCAL)
    return None  # no weights, or weights the workflow trains itself


def models_to_fetch(config: dict[str, Any], targets: Iterable[TargetSpec]) -> list[ModelRef]:
    """Every model a validated config names, in the roles its enabled methods actually use."""
    from neuroscribe import methods
    from neuroscribe.config import derive

    refs = [ref for t in targets if (ref := _target_ref(t)) is not None]
    enabled = methods.enabled(config)
    used = {role for method in enabled for role in method.roles}
    if "captioner" in used and config["captioner"]["backend"] == "blip":
        refs.append(hub_or_local("captioner", config["captioner"]["model"], HF))
    if "llm" in used and config["llm"]["backend"] == "local":
        refs.append(hub_or_local("llm", derive(config).llm_model, HF))
    for method in enabled:
        if method.models is not None:
            refs += method.models(config)
    return refs + _evaluation_refs(config["evaluation"])


def _evaluation_refs(evaluation: dict[str, Any]) -> list[ModelRef]:
    """The evaluation's simulator, text model and CLIP text model, when it is on."""
    if not evaluation["enabled"]:
        return []
    refs = []
    if evaluation["simulator"]["backend"] == "clip":
        refs.append(hub_or_local("evaluation simulator", evaluation["simulator"]["model"], HF))
    if evaluation["text_model"]:
        refs.append(hub_or_local("evaluation text model", evaluation["text_model"], HF))
    if evaluation["clip_model"] and evaluation["clip_model"] != evaluation["simulator"]["model"]:
        refs.append(hub_or_local("evaluation CLIP text", evaluation["clip_model"], HF))
    return refs


# -- fetching ---------------------------------------------------------------------------------


def _repo_bytes(repo_id: str) -> int:
    """Bytes of a repository's blobs in the Hugging Face cache (0 when absent)."""
    blobs = Path(hf_cache_dir()) / f"models--{repo_id.replace('/', '--')}" / "blobs"
    return sum(f.stat().st_size for f in blobs.glob("*") if f.is_file()) if blobs.is_dir() else 0


def _fetch_hf(repo_id: str) -> None:
    from huggingface_hub import HfApi, snapshot_download

    files = [s.rfilename for s in HfApi().model_info(repo_id).siblings or []]
    ignore = list(FOREIGN_FILES)
    if any(f.endswith(".safetensors") for f in files):
        ignore += PICKLED_WEIGHTS
    snapshot_download(repo_id, ignore_patterns=ignore)


def _fetch_diffusers(repo_id: str) -> None:
    import diffusers

    diffusers.DiffusionPipeline.download(repo_id)


def _download_url(url: str) -> int:
    """torch.hub's download into TORCH_HOME/hub/checkpoints: bytes downloaded (0: cached)."""
    import torch

    dest = Path(torch_cache_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
    if dest.is_file():
        return 0
    dest.parent.mkdir(parents=True, exist_ok=True)
    # torchvision's file names carry a prefix of their sha256, which torch.hub checks
    match = torch.hub.HASH_REGEX.search(dest.name)
    torch.hub.download_url_to_file(url, str(dest), match.group(1) if match else None, False)
    return dest.stat().st_size


def _fetch_torchvision(model: str) -> int:
    from neuroscribe.models import _torchvision_weights

    name, _, weights = model.partition(":")
    return _download_url(_torchvision_weights(name, weights).url)


def _fetch_timm(name: str) -> int:
    """timm's pretrained weights, from where timm reads them (timm.models._builder): the
    Hugging Face Hub when the model has a hub id, else its URL; bytes downloaded."""
    import timm.models
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        raise ValueError(f"timm has no pretrained weights for {name!r}")
    if cfg.hf_hub_id:
        repo_id, _, revision = cfg.hf_hub_id.partition("@")
        filename = cfg.hf_hub_filename or "pytorch_model.bin"
        before = _repo_bytes(repo_id)
        candidates = [SAFE_TWINS[filename], filename] if filename in SAFE_TWINS else [filename]
        for i, candidate in enumerate(candidates):
            try:
                hf_hub_download(repo_id, candidate, revision=revision or None)
                break
            except EntryNotFoundError:
                if i == len(candidates) - 1:
                    raise
        return _repo_bytes(repo_id) - before
    if cfg.url:
        return _download_url(cfg.url)
    raise ValueError(f"timm's pretrained config of {name!r} names no hub id and no URL")


def _fetch_hub(ref: ModelRef) -> int:
    before = _repo_bytes(ref.model)
    (_fetch_hf if ref.source == HF else _fetch_diffusers)(ref.model)
    return _repo_bytes(ref.model) - before


FETCHERS = {
    HF: _fetch_hub,
    DIFFUSERS: _fetch_hub,
    TORCHVISION: lambda ref: _fetch_torchvision(ref.model),
    TIMM: lambda ref: _fetch_timm(ref.model),
}


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def fetch(ref: ModelRef) -> Outcome:
    """Download one model into its cache (files already there are not downloaded again)."""
    if ref.source == LOCAL:
        kind = "folder" if Path(ref.model).expanduser().is_dir() else "file"
        return Outcome(ref, f"skipped (local {kind})")
    try:
        added = FETCHERS[ref.source](ref)
        return Outcome(ref, "downloaded", _size(added)) if added else Outcome(ref, "already cached")
    except Exception as exc:  # one model failing must not stop the others
        log.exception("prefetch of %s (%s) failed", ref.model, ref.role)
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        return Outcome(ref, "failed", f"{type(exc).__name__}: {first[:300]}")


def cache_summary() -> str:
    from huggingface_hub import constants

    return (
        f"Hugging Face cache: {hf_cache_dir()} (HF_HOME={constants.HF_HOME}); "
        f"torch cache: {torch_cache_dir()} (TORCH_HOME={torch_home()})"
    )


def outcome_line(outcome: Outcome) -> str:
    detail = f" ({outcome.detail})" if outcome.detail else ""
    return f"  {outcome.status:<24} {outcome.ref.role:<20} {outcome.ref.model}{detail}"


def run_prefetch(refs: list[ModelRef]) -> list[Outcome]:
    """Fetch every model, print one line per model and a summary; PrefetchError if any failed."""
    from huggingface_hub import constants

    print(cache_summary(), flush=True)
    outcomes = []
    for ref in refs:
        outcome = fetch(ref)
        outcomes.append(outcome)
        print(outcome_line(outcome), flush=True)
    failed = [o for o in outcomes if o.failed]
    print(
        f"{len(outcomes) - len(failed)} of {len(outcomes)} models ready"
        + (f", {len(failed)} failed" if failed else ""),
        flush=True,
    )
    if failed:
        hint = (
            "; HF_HUB_OFFLINE is set, which forbids downloads: unset it for prefetch"
            if constants.is_offline_mode()
            else "; check the model ids and this machine's internet access (HF_ENDPOINT, proxy)"
        )
        raise PrefetchError(
            f"could not download {', '.join(repr(o.ref.model) for o in failed)}{hint}"
        )
    return outcomes
