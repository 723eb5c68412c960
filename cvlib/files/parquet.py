"""Parquet writing that never leaves a half-written file under the final name."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cvlib.files.atomic import atomic_write


def write_table_atomic(table: pa.Table, out: str | os.PathLike[str], metadata: dict[str, str] | None = None) -> Path:
    """Write a table atomically, with string key-value metadata (JSON for non-strings)."""
    out = Path(out)
    if metadata:
        merged = dict(table.schema.metadata or {})
        merged.update({k.encode(): (v if isinstance(v, str) else json.dumps(v)).encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(merged)
    with atomic_write(out) as f:
        pq.write_table(table, f)
    return out


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The key-value metadata of a Parquet file or of the first part of a dataset."""
    path = Path(path)
    if path.is_dir():
        parts = sorted(path.glob("*.parquet"))
        if not parts:
            return {}
        path = parts[0]
    meta = pq.read_schema(path).metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items() if not k.startswith(b"ARROW:") and k != b"pandas"}

