"""Failed neurons are never silent: each is recorded with its error, and a chunk where too many
failed fails its job, so a run that produced mostly nothing does not end green."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

SHOWN_ERRORS = 5


class TooManyFailed(RuntimeError):
    """More than `max_failed_fraction` of a chunk's neurons failed."""


@dataclass(frozen=True)
class Failure:
    neuron: int
    error: str


def check_failures(
    what: str, failures: Sequence[Failure], total: int, max_fraction: float, rerun_hint: str
) -> None:
    """Log every failure; raise TooManyFailed when their share of `total` neurons is above
    `max_fraction`. `rerun_hint` tells what the next run does about them."""
    for failure in failures:
        log.warning("%s: neuron %d failed: %s", what, failure.neuron, failure.error)
    if not failures or len(failures) <= max_fraction * total:
        return
    shown = "; ".join(f"neuron {f.neuron}: {f.error}" for f in failures[:SHOWN_ERRORS])
    more = f" (and {len(failures) - SHOWN_ERRORS} more)" if len(failures) > SHOWN_ERRORS else ""
    raise TooManyFailed(
        f"{what}: {len(failures)} of {total} neurons failed, more than max_failed_fraction "
        f"({max_fraction:g}) allows. {rerun_hint} Fix the cause and run again, or raise "
        f"max_failed_fraction in the config to accept more failed neurons. Errors: "
        f"{shown}{more}"
    )
