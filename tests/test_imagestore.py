"""`ImageStore` shared by jobs running at the same time: each image is drawn by one job, the
others wait for it, and claims left by killed jobs are taken over."""

from __future__ import annotations

import errno
import json
import logging
import multiprocessing
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from PIL import Image

from neuroscribe.backends.synthesizers import PROMPT_TEMPLATE
from neuroscribe.demo.renderer import ProceduralSynthesizer
from neuroscribe.imagestore import ImageRequest, ImageStore

CONCEPTS = ["red circle", "blue square", "green star", "striped triangle", "dotted cross"]


def requests(seeds: range) -> list[ImageRequest]:
    return [ImageRequest(c, PROMPT_TEMPLATE.format(concept=c), s) for s in seeds for c in CONCEPTS]


class Recording:
    """The procedural synthesizer, slowed down so that jobs overlap, noting what it draws."""

    def __init__(self, log: Path | None = None, delay: float = 0.0) -> None:
        self.inner = ProceduralSynthesizer(32)
        self.log, self.delay, self.drawn = log, delay, []

    @property
    def id(self) -> str:
        return self.inner.id

    def draw(self, batch: Sequence[ImageRequest]) -> list[Image.Image]:
        time.sleep(self.delay)
        self.drawn += [(r.concept, r.seed) for r in batch]
        if self.log:
            self.log.write_text(json.dumps(self.drawn))
        return self.inner.draw(batch)


def _job(args: tuple[str, int, int, str]) -> int:
    root, first, last, log = args
    _, drawn = ImageStore(root, poll=0.02).ensure(
        Recording(Path(log), delay=0.05), requests(range(first, last)), batch_size=4
    )
    return drawn


def test_concurrent_jobs_draw_each_image_once(tmp_path: Path) -> None:
    root = tmp_path / "images"
    jobs = [
        (str(root), 0, 8, str(tmp_path / "a.json")),
        (str(root), 4, 12, str(tmp_path / "b.json")),
    ]
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        drawn = pool.map(_job, jobs)
    a, b = (json.loads(Path(job[3]).read_text()) for job in jobs)
    assert sorted(map(tuple, a + b)) == sorted({(c, s) for c in CONCEPTS for s in range(12)})
    assert sum(drawn) == 60 < 80  # 20 requests shared by the two jobs, each drawn once
    assert a and b  # both jobs drew
    paths, again = ImageStore(root).ensure(Recording(), requests(range(12)))
    assert again == 0 and all(p.exists() for p in paths)
    assert not list(root.rglob("*.claim"))


def _claimed(store: ImageStore, request: ImageRequest, holder: str, age: float = 0.0) -> Path:
    claim = store.claim_path(store.key(ProceduralSynthesizer(32).id, request))
    claim.parent.mkdir(parents=True, exist_ok=True)
    claim.write_text(holder)
    os.utime(claim, (time.time() - age, time.time() - age))
    return claim


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize(
    ("holder", "age", "slurm_job"),
    [
        ("{host} {dead_pid} \n", 0.0, None),  # its process on this host is gone
        ("node-7 4242 \n", 120.0, None),  # another node, older than stale_after
        ("node-7 4242 777\n", 0.0, "777"),  # an earlier run of this requeued SLURM job
    ],
    ids=["dead-process", "old-claim", "requeued-job"],
)
def test_claims_of_dead_jobs_are_taken_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, holder: str, age: float, slurm_job: str | None
) -> None:
    if slurm_job:
        monkeypatch.setenv("SLURM_JOB_ID", slurm_job)
    store = ImageStore(tmp_path, stale_after=60.0, poll=0.01)
    (request,) = requests(range(1))[:1]
    holder = holder.format(host=socket.gethostname(), dead_pid=_dead_pid())
    claim = _claimed(store, request, holder, age)
    drawer = Recording()
    start = time.perf_counter()
    (path,), drawn = store.ensure(drawer, [request])
    assert drawn == 1 and path.exists() and not claim.exists()
    assert time.perf_counter() - start < 5  # taken over, not waited out


@pytest.mark.parametrize(
    "holder", ["", "\x00\x00\x00", "not a claim\n"], ids=["empty", "nul", "garbled"]
)
def test_empty_or_garbled_claims_are_taken_over_at_once(tmp_path: Path, holder: str) -> None:
    store = ImageStore(tmp_path, stale_after=10.0, poll=0.01)  # a wait fails the test in 10 s
    (request,) = requests(range(1))[:1]
    claim = _claimed(store, request, holder)  # fresh: a full disk left it as the job wrote it
    start = time.perf_counter()
    (path,), drawn = store.ensure(Recording(), [request])
    assert drawn == 1 and path.exists() and not claim.exists()
    assert time.perf_counter() - start < 5


def _fail_on_call(call: int, real: Callable[..., object]) -> Callable[..., object]:
    """`real`, raising ENOSPC (a full disk) on its `call`-th use."""
    calls = 0

    def fake(*args: object) -> object:
        nonlocal calls
        calls += 1
        if calls == call:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args)

    return fake


@pytest.mark.parametrize("step", ["write", "link"])
def test_a_claim_that_cannot_be_written_fails_the_job_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    store = ImageStore(tmp_path, poll=0.01)
    wanted = requests(range(1))
    # the disk fills while the third claim of the batch is written (a real full disk cannot be
    # made in a test, so the OS call fails as it would)
    monkeypatch.setattr(os, step, _fail_on_call(3, getattr(os, step)))
    with pytest.raises(OSError, match=r"cannot write the claim .*\.claim") as failed:
        store.ensure(Recording(), wanted)
    assert failed.value.errno == errno.ENOSPC
    assert not list(tmp_path.rglob("*.claim"))  # its own first two claims were released too
    assert not list(tmp_path.rglob(".*.tmp-*"))
    monkeypatch.undo()  # space freed: the next job draws everything without waiting
    start = time.perf_counter()
    _, drawn = store.ensure(Recording(), wanted)
    assert drawn == len(wanted) and time.perf_counter() - start < 5


@pytest.mark.parametrize("report_every", [30.0, 0.1])
def test_waiting_on_claims_is_logged_naming_the_holder(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, report_every: float
) -> None:
    store = ImageStore(tmp_path, stale_after=60.0, poll=0.01, report_every=report_every)
    (shared,) = requests(range(1))[:1]
    claim = _claimed(store, shared, "node-7 4242 777\n")

    def other_job_finishes() -> None:
        time.sleep(0.35)
        (image,) = ProceduralSynthesizer(32).draw([shared])
        image.save(claim.with_suffix(".png"))
        claim.unlink()

    other = threading.Thread(target=other_job_finishes)
    other.start()
    start = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="neuroscribe.imagestore"):
        store.ensure(Recording(), [shared])
    waited = time.perf_counter() - start
    other.join()
    lines = [r.getMessage() for r in caplog.records if "waiting for" in r.getMessage()]
    assert lines, "the job waited silently"
    assert "waiting for 1 images" in lines[0] and "node-7 pid 4242 SLURM job 777 (1)" in lines[0]
    assert str(claim) in lines[0]
    # once at the start of the wait and then every `report_every`, not at every 10 ms poll
    assert len(lines) <= waited / report_every + 1
    assert len(lines) >= (2 if waited > 2 * report_every else 1)


def test_a_live_claim_is_waited_for_not_redrawn(tmp_path: Path) -> None:
    store = ImageStore(tmp_path, stale_after=60.0, poll=0.01)
    shared, own = requests(range(1))[:2]
    claim = _claimed(store, shared, "node-7 4242 \n")  # another node's job drawing it now

    def other_job_finishes() -> None:
        time.sleep(0.3)
        (image,) = ProceduralSynthesizer(32).draw([shared])
        image.save(claim.with_suffix(".png"))  # stores the image ...
        claim.unlink()  # ... and then releases its claim, as `ensure` does

    other = threading.Thread(target=other_job_finishes)
    drawer = Recording()
    other.start()
    paths, drawn = store.ensure(drawer, [shared, own])
    other.join()
    assert drawn == 1 and drawer.drawn == [(own.concept, own.seed)]  # its own image only
    assert all(p.exists() for p in paths)


class Failing(Recording):
    def __init__(self, on_call: int, broken_image: bool = False) -> None:
        super().__init__()
        self.on_call, self.broken_image, self.calls = on_call, broken_image, 0

    def draw(self, batch: Sequence[ImageRequest]) -> list[Image.Image]:
        self.calls += 1
        images = super().draw(batch)
        if self.calls == self.on_call:
            if not self.broken_image:
                raise RuntimeError("CUDA out of memory")
            images[0].convert = None  # type: ignore[method-assign]  # fails in a writer thread
        return images


@pytest.mark.parametrize("broken_image", [False, True], ids=["draw-fails", "write-fails"])
def test_a_failure_releases_the_claims_and_keeps_what_was_stored(
    tmp_path: Path, broken_image: bool
) -> None:
    store = ImageStore(tmp_path)
    wanted = requests(range(2))  # 10 images, batches of 4: the second batch fails
    with pytest.raises((RuntimeError, TypeError)):
        store.ensure(Failing(on_call=2, broken_image=broken_image), wanted, batch_size=4)
    assert not list(tmp_path.rglob("*.claim"))
    assert not list(tmp_path.rglob(".*.tmp-*"))
    stored = len(list(tmp_path.rglob("*.png")))
    # a failed draw stops the job after the first batch; a failed write only loses that image
    assert stored == (9 if broken_image else 4)
    _, drawn = store.ensure(Recording(), wanted, batch_size=4)
    assert drawn == 10 - stored
