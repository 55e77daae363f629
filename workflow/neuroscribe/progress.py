"""A chunk job's progress record: the rows of the neurons it has finished, kept beside its output
so a job that is killed or preempted resumes where it stopped instead of starting over.

The record is a hidden folder next to the output (`.0003.progress/` for `0003.parquet`) holding
one Parquet part per group of finished neurons, each written atomically. It belongs to one set
of job arguments and input files: a record left by other settings or by older inputs is
discarded, never reused. It is removed once the output is written.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from neuroscribe.cache import cache_key
from neuroscribe.io import read_json, write_json
from neuroscribe.tables import to_arrow, write_arrow

log = logging.getLogger(__name__)

KEY_FILE = "key.json"


@dataclass(frozen=True)
class Resumed:
    """What a chunk job took from its record and what it computed."""

    neurons: int
    from_record: int
    computed: int


def _file_digest(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fingerprint(args: dict[str, Any], inputs: Sequence[str | Path]) -> str:
    # contents, not times: an upstream job that ran again and wrote the same table (a rerun
    # after preemption) keeps the record; different contents void it
    files = {str(p): _file_digest(p) for p in inputs}
    return cache_key({"args": args, "inputs": files})


@dataclass(frozen=True)
class ProgressRecord:
    folder: Path
    key: str

    @classmethod
    def beside(
        cls, out: str | Path, args: dict[str, Any], inputs: Sequence[str | Path]
    ) -> ProgressRecord:
        """The record of the job writing `out` with these arguments and input files."""
        out = Path(out)
        return cls(out.with_name(f".{out.stem}.progress"), _fingerprint(args, inputs))

    def open(self) -> None:
        """Start or continue the record; one from other arguments or inputs is discarded."""
        key_file = self.folder / KEY_FILE
        if self.folder.exists():
            old = read_json(key_file) if key_file.exists() else None
            if old == self.key:
                return
            log.info("progress record %s is from other settings or inputs: discarded", self.folder)
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True)
        write_json(self.key, key_file)

    def parts(self) -> dict[int, pa.Table]:
        """Saved parts by their index."""
        return {
            int(p.stem.removeprefix("part-")): pq.read_table(p)
            for p in sorted(self.folder.glob("part-*.parquet"))
        }

    def save(self, index: int, table: pa.Table) -> None:
        write_arrow(table, self.folder / f"part-{index:05d}.parquet")

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def rows_in_parts(
    neurons: Sequence[int],
    every: int,
    record: ProgressRecord,
    compute: Callable[[list[int]], pd.DataFrame],
    schema: str,
) -> tuple[pa.Table, Resumed]:
    """Compute `compute(part)` for consecutive parts of `every` neurons, saving each to the record
    before the next, and skipping the parts a previous attempt saved; returns all rows in neuron
    order, each part checked against table schema `schema`."""
    record.open()
    saved = record.parts()
    parts = [list(neurons[i : i + every]) for i in range(0, len(neurons), every)]
    done = sum(len(parts[i]) for i in saved if i < len(parts))
    log.info(
        "progress: %d of %d neurons from the progress record, %d to compute",
        done,
        len(neurons),
        len(neurons) - done,
    )
    tables = []
    for index, part in enumerate(parts):
        if index not in saved:
            saved[index] = to_arrow(compute(part), schema)
            record.save(index, saved[index])
            log.info("progress: part %d of %d saved (%d neurons)", index + 1, len(parts), len(part))
        tables.append(saved[index])
    return pa.concat_tables(tables), Resumed(len(neurons), done, len(neurons) - done)


def write_from_record(table: pa.Table, out: str | Path, record: ProgressRecord) -> None:
    """Write the finished output atomically, then drop the record it was built from."""
    write_arrow(table, out)
    record.remove()


def finish_chunk(
    out: str | Path,
    args: dict[str, Any],
    inputs: Sequence[str | Path],
    neurons: Sequence[int],
    every: int,
    compute: Callable[[list[int]], pd.DataFrame],
    schema: str,
    check: Callable[[pa.Table], None] | None = None,
) -> Resumed:
    """A resumable chunk job's table: the rows of `neurons`, `every` at a time, from the progress
    record beside `out` (that of these `args`, plus `every`, and `inputs` files) and
    `compute(part)` for the parts it lacks (see `rows_in_parts`); `check(table)` may still fail
    the job with the record kept; then `out` is written and the record dropped."""
    record = ProgressRecord.beside(out, args | {"save_every": every}, inputs)
    table, resumed = rows_in_parts(neurons, every, record, compute, schema)
    if check is not None:
        check(table)
    write_from_record(table, out, record)
    return resumed
