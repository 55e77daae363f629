"""A content-addressed store of synthesised images, shared by all jobs of a run.

An image's key is the hash of everything that determines its pixels (synthesizer id with its
model, steps and size; prompt; seed), so a concept proposed for several neurons, chunks or
layers is drawn once, and a rerun draws nothing it already has. Files are written under a
temporary name and renamed, so a killed job never leaves a half-written image under a key.

Jobs running at the same time (the chunks of a layer share many concepts) claim each image before
drawing it, one batch at a time, with a file created exclusively beside it. A job skips images
another job has claimed, draws the rest, and then waits for those. A claim left by a killed job is
taken over: at once when its process is gone from this host or it was an earlier run of this SLURM
job (requeued), otherwise once it is older than `stale_after`. A claim taken over by mistake costs
only a second drawing of the same pixels; no lock is ever needed for correctness.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from PIL import Image

from neuroscribe.cache import cache_key
from neuroscribe.io import atomic_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageRequest:
    concept: str
    prompt: str
    seed: int


class Drawer(Protocol):
    """A synthesizer that draws a batch of requests (one image each), in request order."""

    @property
    def id(self) -> str: ...

    def draw(self, requests: Sequence[ImageRequest]) -> list[Image.Image]: ...


class ImageStore:
    def __init__(
        self, root: str | Path, stale_after: float = 600.0, poll: float = 0.5, writers: int = 4
    ) -> None:
        self.root = Path(root)
        self.stale_after = stale_after
        self.poll = poll
        self.writers = writers

    def key(self, drawer_id: str, request: ImageRequest) -> str:
        return cache_key({"synthesizer": drawer_id, "prompt": request.prompt, "seed": request.seed})

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.png"

    def ensure(
        self, drawer: Drawer, requests: Sequence[ImageRequest], batch_size: int = 16
    ) -> tuple[list[Path], int]:
        """The image file of every request, drawing only the missing ones; returns (paths in
        request order, images drawn). Images are encoded and written by a few threads while the
        next batch is drawn (PNG encoding of a 512 px image takes about as long as a one-step
        model draws it); at most two batches wait to be written."""
        keys = [self.key(drawer.id, r) for r in requests]
        queue: deque[tuple[str, ImageRequest]] = deque()
        for k, r in dict(zip(keys, requests, strict=True)).items():
            if not self.path(k).exists():
                queue.append((k, r))
        missing, drawn = len(queue), 0
        waiting: list[tuple[str, ImageRequest]] = []
        with ThreadPoolExecutor(self.writers, thread_name_prefix="imagestore") as pool:
            writes: deque[Future[None]] = deque()
            while queue or waiting:
                batch = self._claim_batch(queue, waiting, batch_size)
                if batch:
                    images = self._draw(drawer, batch)
                    writes += [pool.submit(self._store, k, im) for k, im in images]
                    drawn += len(batch)
                    while len(writes) > 2 * batch_size:
                        writes.popleft().result()
                elif waiting:  # only images other jobs are drawing are left
                    time.sleep(self.poll)
                    queue.extend(waiting)
                    waiting.clear()
            for write in writes:
                write.result()  # an encoding error fails the job here
        if missing > drawn:
            log.info("image store: %d images drawn by other jobs meanwhile", missing - drawn)
        return [self.path(k) for k in keys], drawn

    def _claim_batch(
        self,
        queue: deque[tuple[str, ImageRequest]],
        waiting: list[tuple[str, ImageRequest]],
        size: int,
    ) -> list[tuple[str, ImageRequest]]:
        """Up to `size` queued images this job now holds claims on; images claimed by other
        jobs go to `waiting`, images that appeared meanwhile are dropped."""
        batch: list[tuple[str, ImageRequest]] = []
        while queue and len(batch) < size:
            key, request = queue.popleft()
            if self.path(key).exists():
                continue
            if not self._claim(key):
                waiting.append((key, request))
            elif self.path(key).exists():  # stored and released between the check and the claim
                self.claim_path(key).unlink(missing_ok=True)
            else:
                batch.append((key, request))
        return batch

    def _draw(
        self, drawer: Drawer, batch: list[tuple[str, ImageRequest]]
    ) -> list[tuple[str, Image.Image]]:
        try:
            images = drawer.draw([r for _, r in batch])
            if len(images) != len(batch):
                raise RuntimeError(
                    f"synthesizer {drawer.id} returned {len(images)} images for {len(batch)} prompts"
                )
        except BaseException:
            for k, _ in batch:
                self.claim_path(k).unlink(missing_ok=True)
            raise
        return [(k, image) for (k, _), image in zip(batch, images, strict=True)]

    def _store(self, key: str, image: Image.Image) -> None:
        try:
            with atomic_path(self.path(key)) as tmp:
                image.convert("RGB").save(tmp, format="PNG")
        finally:
            self.claim_path(key).unlink(missing_ok=True)

    def claim_path(self, key: str) -> Path:
        return self.path(key).with_suffix(".claim")

    def _claim(self, key: str) -> bool:
        path = self.claim_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._stale(path):
                    return False
                path.unlink(missing_ok=True)  # a dead job's claim: take it over
                continue
            with os.fdopen(fd, "w") as f:
                f.write(_holder())
            return True
        return False  # another job took the stale claim over first

    def _stale(self, claim: Path) -> bool:
        try:
            holder, age = claim.read_text(), time.time() - claim.stat().st_mtime
        except FileNotFoundError:
            return True  # released meanwhile: claim it
        host, pid, job = [*holder.split(), "", "", ""][:3]
        if host == socket.gethostname() and pid.isdigit():
            # this process never meets its own claims (an `ensure` call asks for a key once
            # and releases all its claims before returning): the pid was reused after a death
            mine_or_dead = int(pid) == os.getpid() or not _alive(int(pid))
            return mine_or_dead or age > self.stale_after
        if job and job == os.environ.get("SLURM_JOB_ID"):
            return True  # written by an earlier run of this (requeued) job on another node
        return age > self.stale_after


def _holder() -> str:
    return f"{socket.gethostname()} {os.getpid()} {os.environ.get('SLURM_JOB_ID', '')}\n"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True
