"""Where and in what precision a job computes: the config's `device` and `dtype` resolved."""

from __future__ import annotations

import functools
import logging

import torch

from neuroscribe.gpuhours import GPU_LOG_LINE

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """`auto` is CUDA when this node has it; `cuda` on a node without it is an error."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("config device is 'cuda' but this node has no CUDA device")
    resolved = torch.device(device)
    if resolved.type == "cuda":
        _announce(resolved.index or 0)
    return resolved


@functools.cache
def _announce(index: int) -> None:
    # once per job, however many models it loads
    log.info("%s %s", GPU_LOG_LINE, torch.cuda.get_device_name(index))


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is float16 on CUDA (V100s have no bfloat16) and float32 on the CPU."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)
