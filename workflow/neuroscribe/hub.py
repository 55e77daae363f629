"""One clear error when a job cannot get a model: not in the local cache, and no way to download it.

Every role loads its model inside `fetching(model_id, role)`. Compute nodes of many clusters have
no internet; instead of a raw URLError/OSError traceback, the job then says which model is
missing, where the cache is, and to run the `prefetch` target on the login node. Any other error
(a typo in a local path, a repository that does not exist, a broken file) passes through as is.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

# Exception classes (by name, so the HTTP stack's version does not matter: httpx, httpx2,
# requests, urllib) that mean "could not reach the server" or "not cached, and offline".
_UNREACHABLE = {
    "LocalEntryNotFoundError",
    "OfflineModeIsEnabled",
    "ConnectError",
    "ConnectTimeout",
    "TimeoutException",
    "URLError",
    "gaierror",
}
# the model exists nowhere the caller can see: a different problem, reported as is
_NOT_FOUND = {"RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError"}
# a Hugging Face repository id: `name` or `org/name`
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class ModelNotCached(RuntimeError):
    """A model is not in the local cache and this machine cannot download it."""


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    node: BaseException | None = exc
    while node is not None and node not in seen:
        seen.append(node)
        node = node.__cause__ or node.__context__
    return seen


def _names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def _unreachable(exc: BaseException) -> bool:
    return bool(_names(exc) & _UNREACHABLE) or isinstance(exc, (ConnectionError, TimeoutError))


def hf_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def torch_cache_dir() -> str:
    import torch

    return str(torch.hub.get_dir())


def _never_fetched(model_id: str) -> bool:
    """True if the Hugging Face cache has nothing of `model_id`: no ref and no snapshot. Some
    loaders (transformers' image processors) turn a failed download into a bare OSError; for
    a hub id this tells it apart from a broken file in a cached model."""
    if not _HUB_ID.fullmatch(model_id) or Path(model_id).expanduser().exists():
        return False
    folder = Path(hf_cache_dir()) / f"models--{model_id.replace('/', '--')}"
    return not any((folder / "refs").glob("*")) and not any((folder / "snapshots").glob("*"))


def _short(exc: BaseException) -> str:
    """The first line of an error, cut to its first sentence when long."""
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    text = text or type(exc).__name__
    if len(text) > 120 and ". " in text:
        text = text[: text.index(". ")]
    return text if len(text) <= 200 else text[:197] + "..."


def not_cached_message(model_id: str, role: str, cache: str, cause: str) -> str:
    return (
        f"model {model_id!r} ({role}) is not in the local cache ({cache}) and could not be "
        f"downloaded from this node: {cause}. Compute nodes often have no internet: run "
        "`snakemake prefetch --configfile <your config>` on the login node first (it downloads "
        "every model the config names), then run again."
    )


def torch_home() -> str:
    """TORCH_HOME as torch.hub uses it: the variable, or the folder above its hub cache."""
    return os.environ.get("TORCH_HOME") or str(Path(torch_cache_dir()).parent)


def _cache_line(torch_hub: bool) -> str:
    if torch_hub:
        return f"TORCH_HOME={torch_home()}"
    from huggingface_hub import constants

    return f"HF_HOME={constants.HF_HOME}"


def _cause(chain: list[BaseException], offline_hf: bool) -> str:
    unreachable = [e for e in chain if _unreachable(e)]
    if offline_hf and not any(_names(e) & {"URLError"} for e in unreachable):
        return "HF_HUB_OFFLINE is set, so nothing is downloaded"
    # the deepest cause is the network's own words (e.g. "Name or service not known")
    return _short(unreachable[-1] if unreachable else chain[0])


def translate(exc: BaseException, model_id: str, role: str) -> ModelNotCached | None:
    """The ModelNotCached error `exc` stands for, or None if it is some other problem."""
    if Path(model_id).expanduser().exists():
        return None  # a local folder or file: nothing to download
    chain = _chain(exc)
    if any(_names(e) & _NOT_FOUND for e in chain):
        return None
    hits = [e for e in chain if _unreachable(e)]
    # transformers raises a plain OSError (not PermissionError & co.) for a file it could not get
    bare_os_error = type(exc) is OSError
    if not hits and not (bare_os_error and _never_fetched(model_id)):
        return None
    torch_hub = any("URLError" in _names(e) for e in hits)
    offline_hf = not torch_hub and _hf_offline()
    return ModelNotCached(
        not_cached_message(model_id, role, _cache_line(torch_hub), _cause(chain, offline_hf))
    )


def _hf_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


@contextlib.contextmanager
def fetching(model_id: str, role: str) -> Iterator[None]:
    """Load a model inside this block; a failure to get it from cache or network becomes one
    clear ModelNotCached error naming the model, its role, the cache and the `prefetch` target."""
    try:
        yield
    except Exception as exc:
        translated = translate(exc, model_id, role)
        if translated is None:
            raise
        raise translated from exc
