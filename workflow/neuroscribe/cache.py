"""A persistent key-value cache on disk, shared by all jobs of a run, on any shared filesystem.

Keys are derived from the full request (model id, inputs, parameters) as canonical JSON, so the
same request is answered from disk in any later job: a resumed job never pays twice for an LLM
reply or recomputes a caption.

Every process appends to a segment file of its own (one JSON line per entry, flushed as soon as
it is written) and reads all segments when it opens the cache. Each file has one writer and
nothing takes a lock, so it is safe across nodes on NFS, Lustre or GPFS, where SQLite's locking
is not. A line cut short by a kill has no newline and is never read.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import uuid
from pathlib import Path
from typing import Any, TextIO


def cache_key(request: Any) -> str:
    """sha256 of the request as canonical JSON (sorted keys, no whitespace)."""
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _whole_lines(segment: Path) -> list[bytes]:
    data = segment.read_bytes()
    return data[: data.rfind(b"\n") + 1].splitlines()


class DiskCache:
    """`get(key)` / `put(key, value)` of JSON values in the folder `path/namespace/`.

    What other processes wrote is read when the cache is opened; what this one writes is on disk
    when `put` returns, so a job killed a moment later has still saved what it paid for. One
    instance may be shared by the threads of a process (e.g. concurrent LLM requests).
    """

    def __init__(self, path: str | Path, namespace: str) -> None:
        self.folder = Path(path) / namespace
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._entries: dict[str, Any] = {}
        self._writer: TextIO | None = None
        for segment in sorted(self.folder.glob("*.jsonl")):
            for line in _whole_lines(segment):
                entry = json.loads(line)
                self._entries[entry["k"]] = entry["v"]

    def get(self, key: str) -> Any | None:
        with self._lock:
            return self._entries.get(key)

    def put(self, key: str, value: Any) -> None:
        line = json.dumps({"k": key, "v": value}, ensure_ascii=False) + "\n"
        with self._lock:
            if self._writer is None:
                name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
                self._writer = open(self.folder / name, "a", encoding="utf-8")  # noqa: SIM115
            self._writer.write(line)
            self._writer.flush()  # in the kernel: survives the process being killed
            self._entries[key] = value

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def close(self) -> None:
        with self._lock:
            if self._writer is not None:
                os.fsync(self._writer.fileno())  # and on the disk: survives the node
                self._writer.close()
                self._writer = None

    def __enter__(self) -> DiskCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
