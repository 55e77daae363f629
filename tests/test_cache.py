"""The shared on-disk cache: canonical keys, persistence, concurrent writers, and kills."""

from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path

from neuroscribe.cache import DiskCache, cache_key


def test_keys_are_canonical() -> None:
    assert cache_key({"b": 1, "a": [1, 2]}) == cache_key({"a": [1, 2], "b": 1})
    assert cache_key({"a": 1}) != cache_key({"a": 2})


def test_values_persist_and_namespaces_are_separate(tmp_path: Path) -> None:
    with DiskCache(tmp_path / "cache", "llm") as cache:
        assert cache.get("k") is None
        cache.put("k", {"reply": "red circle", "tokens": [3, 4]})
    with (
        DiskCache(tmp_path / "cache", "llm") as cache,
        DiskCache(tmp_path / "cache", "captions") as other,
    ):
        assert cache.get("k") == {"reply": "red circle", "tokens": [3, 4]}
        assert other.get("k") is None and len(cache) == 1


def _writer(args: tuple[str, int]) -> None:
    path, worker = args
    with DiskCache(path, "ns") as cache:
        for i in range(50):
            cache.put(f"{worker}-{i}", i)


def test_concurrent_processes_write_safely(tmp_path: Path) -> None:
    path = str(tmp_path / "cache")
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        pool.map(_writer, [(path, w) for w in range(4)])
    with DiskCache(path, "ns") as cache:
        assert len(cache) == 200 and cache.get("3-49") == 49


def test_each_process_writes_its_own_segment(tmp_path: Path) -> None:
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        pool.map(_writer, [(str(tmp_path / "cache"), w) for w in range(4)])
    # one writer per file, no locks: what NFS needs across nodes
    assert len(list((tmp_path / "cache" / "ns").glob("*.jsonl"))) == 4


def _killed_mid_put(folder: str) -> None:
    cache = DiskCache(folder, "ns")
    cache.put("done", "paid for")
    # a reply too long for one write, cut off by SIGKILL while it is written
    assert cache._writer is not None
    cache._writer.write('{"k": "cut", "v": "' + "x" * 10_000)
    cache._writer.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_job_killed_while_writing_keeps_what_it_finished(tmp_path: Path) -> None:
    folder = str(tmp_path / "cache")
    proc = multiprocessing.get_context("spawn").Process(target=_killed_mid_put, args=(folder,))
    proc.start()
    proc.join()
    assert proc.exitcode == -signal.SIGKILL
    with DiskCache(folder, "ns") as cache:
        assert cache.get("done") == "paid for" and cache.get("cut") is None
        cache.put("next", 1)
    with DiskCache(folder, "ns") as cache:
        assert len(cache) == 2
