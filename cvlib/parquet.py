"""Parquet writing that never leaves a half-written file under the final name."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def write_table_atomic(table: pa.Table, out: str | os.PathLike[str], metadata: dict[str, str] | None = None) -> Path:
    """Write to a temporary file in the same folder, fsync, then ``os.replace`` into place.

    A reader sees either the old file or the complete new one, never a torn write.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if metadata:
        merged = dict(table.schema.metadata or {})
        merged.update({k.encode(): (v if isinstance(v, str) else json.dumps(v)).encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(merged)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            pq.write_table(table, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
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
