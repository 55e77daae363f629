"""A content-addressed store of synthesised images, shared by all jobs of a run.

An image's key is the hash of everything that determines its pixels (synthesizer id with its
model, steps and size; prompt; seed), so a concept proposed for several neurons, chunks or
layers is drawn once, and a rerun draws nothing it already has. Files are written under a
temporary name and renamed, so a killed job never leaves a half-written image under a key.

Jobs running at the same time (the chunks of a layer share many concepts) claim each image before
drawing it, one batch at a time, with a file beside it naming its holder (host, pid, SLURM job).
A claim is written whole to a temporary file and then hard-linked under its name, which fails if
the claim exists, so no job ever sees a claim empty or half-written, and a failed write (a full
disk) leaves nothing behind and fails the job. A job skips images another job has claimed, draws
the rest, and then waits for those, logging what it waits for. A claim left by a killed job is
taken over: at once when it is empty or garbled, when its process is gone from this host or it was
an earlier run of this SLURM job (requeued), otherwise once it is older than `stale_after`. A claim
taken over by mistake costs only a second drawing of the same pixels; no lock is ever needed for
correctness.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections import Counter, deque
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


@dataclass(frozen=True)
class Holder:
    """Who holds a claim: the text of a claim file is "host pid slurm_job"."""

    host: str
    pid: int
    job: str  # SLURM job id; "" outside SLURM

    @classmethod
    def mine(cls) -> Holder:
        return cls(socket.gethostname(), os.getpid(), os.environ.get("SLURM_JOB_ID", ""))

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        """The holder a claim names, or None for an empty or garbled claim."""
        fields = text.split()
        if len(fields) not in (2, 3) or not fields[1].isdigit():
            return None
        return cls(fields[0], int(fields[1]), fields[2] if len(fields) == 3 else "")

    def text(self) -> str:
        return f"{self.host} {self.pid} {self.job}\n"

    def __str__(self) -> str:
        return f"{self.host} pid {self.pid}" + (f" SLURM job {self.job}" if self.job else "")


class ImageStore:
    def __init__(
        self,
        root: str | Path,
        stale_after: float = 600.0,
        poll: float = 0.5,
        writers: int = 4,
        report_every: float = 30.0,
    ) -> None:
        self.root = Path(root)
        self.stale_after = stale_after
        self.poll = poll
        self.writers = writers
        self.report_every = report_every  # seconds between log lines while waiting on claims

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
        report_due = 0.0  # monotonic time of the next "waiting for" log line
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
                    report_due = self._report_waiting(waiting, report_due)
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
        try:
            while queue and len(batch) < size:
                key, request = queue.popleft()
                if self.path(key).exists():
                    continue
                if not self._claim(key):
                    waiting.append((key, request))
                elif self.path(key).exists():  # stored and released between check and claim
                    self.claim_path(key).unlink(missing_ok=True)
                else:
                    batch.append((key, request))
        except BaseException:  # a claim could not be written: release this batch's claims
            for k, _ in batch:
                self.claim_path(k).unlink(missing_ok=True)
            raise
        return batch

    def _report_waiting(self, waiting: list[tuple[str, ImageRequest]], due: float) -> float:
        """Log which images this job waits for and who holds them, if `due`; the next due time.
        Once per `report_every`, not per poll, so a long wait is visible without flooding."""
        now = time.monotonic()
        if now < due:
            return due
        claims = [self.claim_path(k) for k, _ in waiting]
        holders = Counter(_describe_holder(c) for c in claims)
        named = "; ".join(f"{h} ({n})" for h, n in holders.most_common(3))
        if len(holders) > 3:
            named += f"; {len(holders) - 3} other holders"
        log.info(
            "image store: waiting for %d images other jobs are drawing, held by %s (e.g. %s); "
            "a claim older than %.0f s is taken over",
            len(waiting),
            named,
            claims[0],
            self.stale_after,
        )
        return now + self.report_every

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
        """Whether this job now holds the claim on `key`; raises OSError if it cannot be written."""
        path = self.claim_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            # checked before writing, so polling a held claim writes nothing
            if path.exists():
                if not self._stale(path):
                    return False
                path.unlink(missing_ok=True)  # a dead job's claim: take it over
            if _publish(path, Holder.mine().text()):
                return True
        return False  # another job took the stale claim over first

    def _stale(self, claim: Path) -> bool:
        try:
            text, age = claim.read_bytes(), time.time() - claim.stat().st_mtime
        except FileNotFoundError:
            return True  # released meanwhile: claim it
        holder = Holder.parse(text.decode(errors="replace"))
        if holder is None:
            # claims appear whole (`_publish`): an empty or garbled one is a failed write's
            return True
        if holder.host == socket.gethostname():
            # this process never meets its own claims (an `ensure` call asks for a key once
            # and releases all its claims before returning): the pid was reused after a death
            mine_or_dead = holder.pid == os.getpid() or not _alive(holder.pid)
            return mine_or_dead or age > self.stale_after
        if holder.job and holder.job == os.environ.get("SLURM_JOB_ID"):
            return True  # written by an earlier run of this (requeued) job on another node
        return age > self.stale_after


def _publish(claim: Path, text: str) -> bool:
    """Create `claim` holding `text`, or return False if it exists. The text goes to a unique
    temporary file that is hard-linked under the claim's name: a link is atomic and fails if the
    name exists (also on NFS), so a claim is never seen half-written, and a failed write leaves
    neither claim nor temporary file. Write errors (a full disk) are raised, naming the claim."""
    tmp = claim.with_name(f".{claim.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        _write_new(tmp, text)
        try:
            os.link(tmp, claim)
        except FileExistsError:
            # NFS may resend a link the server already made: then the claim is ours
            return os.stat(tmp).st_nlink == 2
        return True
    except OSError as e:
        raise OSError(
            e.errno, f"image store: cannot write the claim {claim}: {e.strerror or e}"
        ) from e
    finally:
        tmp.unlink(missing_ok=True)


def _write_new(path: Path, text: str) -> None:
    """Write `text` to `path`, which must not exist yet (os.write, so errors are not buffered)."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        data = text.encode()
        while data:
            data = data[os.write(fd, data) :]
    finally:
        os.close(fd)


def _describe_holder(claim: Path) -> str:
    try:
        text = claim.read_bytes().decode(errors="replace")
    except FileNotFoundError:
        return "nobody (released just now)"
    return str(Holder.parse(text) or f"an unreadable claim {text[:40]!r}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True
