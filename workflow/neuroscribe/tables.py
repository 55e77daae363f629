"""Table schemas (workflow/schemas/*.schema.yaml, one JSON schema per row) checked on every write."""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from neuroscribe.io import atomic_path

SCHEMA_DIR = Path(__file__).resolve().parents[1] / "schemas"

_SCALARS = {
    "string": pa.string(),
    "integer": pa.int64(),
    "number": pa.float64(),
    "boolean": pa.bool_(),
}


class TableSchemaError(ValueError):
    """A table about to be written does not match its schema."""


@functools.cache
def load_schema(name: str | Path) -> dict[str, Any]:
    """Schema `name` of workflow/schemas/, or a schema file (a method's own tables)."""
    path = Path(name) if isinstance(name, Path) else SCHEMA_DIR / f"{name}.schema.yaml"
    return yaml.safe_load(path.read_text())


def read_tables(files: Sequence[str | Path], columns: list[str] | None = None) -> pd.DataFrame:
    """Chunk tables read and concatenated, in the order given."""
    return pd.concat([pd.read_parquet(p, columns=columns) for p in files], ignore_index=True)


def _arrow_type(prop: dict[str, Any]) -> tuple[pa.DataType, bool]:
    types = prop["type"] if isinstance(prop["type"], list) else [prop["type"]]
    nullable = "null" in types
    (kind,) = [t for t in types if t != "null"]
    if kind == "array":
        item, _ = _arrow_type(prop["items"])
        return pa.list_(item), nullable
    return _SCALARS[kind], nullable


def arrow_schema(name: str | Path, columns: Sequence[str] | None = None) -> pa.Schema:
    """The Arrow schema a table's row schema describes (column order as in the schema file),
    or that of `columns` of it."""
    schema = load_schema(name)
    fields = []
    for col, prop in schema["properties"].items():
        if columns is not None and col not in columns:
            continue
        dtype, nullable = _arrow_type(prop)
        fields.append(pa.field(col, dtype, nullable=nullable))
    return pa.schema(fields)


def to_arrow(df: pd.DataFrame, name: str | Path) -> pa.Table:
    """Convert and check: exact columns, types, no nulls where not allowed, enums, unique keys.

    A column the schema lists in `x-optional` may be left out: the table is then written
    without it (as tables written before it existed)."""
    schema = load_schema(name)
    optional = set(schema.get("x-optional", ()))
    expected = [c for c in schema["properties"] if c in df.columns or c not in optional]
    missing = [c for c in expected if c not in df.columns]
    extra = [c for c in df.columns if c not in expected]
    if missing or extra:
        raise TableSchemaError(
            f"table '{name}': columns do not match workflow/schemas/{name}.schema.yaml"
            + (f"; missing {missing}" if missing else "")
            + (f"; unexpected {extra}" if extra else "")
        )
    target = arrow_schema(name, expected)
    try:
        table = pa.Table.from_pandas(df[expected], schema=target, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise TableSchemaError(f"table '{name}': {exc}") from exc
    for field in target:
        column = table.column(field.name)
        if not field.nullable and column.null_count:
            raise TableSchemaError(
                f"table '{name}': column '{field.name}' has {column.null_count} nulls"
            )
        allowed = schema["properties"][field.name].get("enum")
        if allowed is not None and len(column):
            ok = pc.is_in(column, value_set=pa.array([a for a in allowed if a is not None]))
            bad = pc.invert(pc.fill_null(ok, not field.nullable))
            if pc.any(bad).as_py():
                value = pc.filter(column, bad)[0].as_py()
                raise TableSchemaError(
                    f"table '{name}': column '{field.name}' has {value!r}; allowed {allowed}"
                )
    key = schema.get("x-unique")
    if key and table.num_rows:
        counts = table.group_by(key).aggregate([([], "count_all")])
        dup = counts.filter(pc.greater(counts.column("count_all"), 1))
        if dup.num_rows:
            first = {k: dup.column(k)[0].as_py() for k in key}
            raise TableSchemaError(f"table '{name}': key {key} is not unique, e.g. {first}")
    return table


def write_table(df: pd.DataFrame, path: str | Path, name: str | Path) -> pa.Table:
    """Check `df` against schema `name` and write it as Parquet, atomically."""
    table = to_arrow(df, name)
    write_arrow(table, path)
    return table


def write_arrow(table: pa.Table, path: str | Path) -> None:
    """Write an already checked table as Parquet, atomically."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_csv(table: pa.Table, path: str | Path) -> None:
    """CSV twin of a table; list columns become JSON arrays so the file stays one row per record."""
    df = table.to_pandas()
    for field in table.schema:
        if pa.types.is_list(field.type):
            values = table.column(field.name).to_pylist()  # plain Python, nested lists included
            df[field.name] = [None if v is None else json.dumps(v) for v in values]
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
