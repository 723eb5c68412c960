"""Resuming a scoring job: what the output already holds, and what a killed run left behind.

A file is skipped when a part already holds a row for the same path, the same content
(``sha256``), the same ``model_version`` and the same ``engine`` (a file that could not even be
read is matched by path). A change of engine (torch -> openvino) counts as another model: its
numbers differ in the last bits, so its rows are written beside the first engine's, never mixed
into them. So a killed run, rerun, ends with exactly the rows of one clean run; a file whose content
changed is scored again and :func:`cvlib.inference.output.compact_parts` drops the superseded row.

Before any of that, a file is not even read when its size and mtime are those recorded (in a
small index beside the output, :func:`scored_index_path`) when its row was made, and the output
still holds that row: an unchanged re-run of a 100k-file job costs a ``stat`` per file, not a
read and a hash (issue 15; the same rule re-ingestion uses).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cvlib.files.parquet import write_table_atomic
from cvlib.inference.output import DEFAULT_ENGINE, read_part

__all__ = ["clean_stale_temps", "read_done", "scored_index_path", "stat_paths", "unchanged_scored", "write_stat_table"]


def read_done(
    sources: Iterable[str | os.PathLike[str]], model_version: str, paths: Iterable[str] | None = None, engine: str = DEFAULT_ENGINE
) -> dict[str, str | None]:
    """path -> sha256 of the rows already written for ``model_version`` by ``engine`` (None where
    the file could not be read), restricted to ``paths`` when given."""
    wanted = None if paths is None else set(paths)
    done: dict[str, str | None] = {}
    for src in sources:
        try:
            t = read_part(src, ["path", "sha256", "model_version", "engine"])
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
            raise RuntimeError(f"{src} is not a readable predictions part ({exc}); delete it and rerun: its files are scored again") from exc
        columns = (t.column(c).to_pylist() for c in ("path", "sha256", "model_version", "engine"))
        for path, sha, version, by in zip(*columns, strict=True):
            if version == model_version and (by or DEFAULT_ENGINE) == engine and (wanted is None or path in wanted):
                done[path] = sha
    return done


def clean_stale_temps(parts_dir: str | os.PathLike[str]) -> int:
    """Remove temporary part files a killed run left behind (``.part-*.tmp``); call it only when
    no other run writes to the same output."""
    parts_dir = Path(parts_dir)
    removed = 0
    if parts_dir.is_dir():
        for tmp in parts_dir.glob(".part-*.tmp"):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


# --------------------------------------------------------------------------- unchanged files, unread


SCORED_INDEX_SCHEMA = pa.schema([("path", pa.string()), ("bytes", pa.int64()), ("mtime_ns", pa.int64()), ("model_version", pa.string())])


def scored_index_path(layout) -> Path:
    """Where an output keeps the (path, size, mtime) of its rows between runs: in the dataset's
    hidden work folder, or hidden beside a single file (whose staging folder is removed)."""
    if layout.single_file:
        return layout.target.with_name(f".{layout.target.name}.scored-index.parquet")
    return layout.work_dir / "scored-index.parquet"


def stat_paths(root: str | os.PathLike[str], paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(size, mtime_ns) of every path under ``root``, -1 where it cannot be stat'ed: taken before
    scoring, so a file that changes while it is scored does not match next time."""
    size = np.full(len(paths), -1, dtype=np.int64)
    mtime = np.full(len(paths), -1, dtype=np.int64)
    base = os.fspath(root)
    for i, rel in enumerate(paths):
        try:
            st = os.stat(os.path.join(base, rel))
        except OSError:
            continue
        size[i], mtime[i] = st.st_size, st.st_mtime_ns
    return size, mtime


def write_stat_table(path: str | os.PathLike[str], paths: Sequence[str], size: np.ndarray, mtime: np.ndarray, model_version: str) -> Path:
    """The (path, size, mtime_ns) of one job's files, for :func:`unchanged_scored` next time."""
    table = pa.table(
        {"path": pa.array(list(paths), pa.string()), "bytes": pa.array(size, pa.int64()), "mtime_ns": pa.array(mtime, pa.int64()),
         "model_version": pa.array([model_version] * len(paths), pa.string())},
        schema=SCORED_INDEX_SCHEMA,
    )  # fmt: skip
    return write_table_atomic(table, path)


def unchanged_scored(
    index: str | os.PathLike[str], sources: Iterable[str | os.PathLike[str]], model_version: str,
    paths: Sequence[str], size: np.ndarray, mtime: np.ndarray, engine: str = DEFAULT_ENGINE,
) -> np.ndarray:  # fmt: skip
    """A mask over ``paths``: files the output already holds a row for (``model_version`` by
    ``engine``) and whose size and mtime are those recorded in ``index`` when that row was made. They need not be read
    again: an unchanged re-run costs a ``stat`` per file instead of a read and a hash. The same
    rule as re-ingestion (:mod:`cvlib.data.ingest`): a file rewritten with the same size inside
    the file system's mtime granularity is taken as unchanged."""
    keep = np.zeros(len(paths), dtype=bool)
    if not Path(index).is_file() or not len(paths):
        return keep
    try:
        table = pq.read_table(index, columns=SCORED_INDEX_SCHEMA.names)
    except Exception:  # noqa: BLE001 - a damaged index only costs a full read
        return keep
    table = table.filter(pc.equal(table.column("model_version"), model_version))
    recorded = pd.DataFrame({"bytes": table.column("bytes").to_numpy(), "mtime_ns": table.column("mtime_ns").to_numpy()},
                            index=pd.Index(table.column("path").to_numpy(zero_copy_only=False), dtype=object))  # fmt: skip
    recorded = recorded[~recorded.index.duplicated(keep="last")]
    want = pd.Index(list(paths), dtype=object)  # object: hash lookups without Arrow scalars per value
    found = recorded.reindex(want)
    keep = (found["bytes"].to_numpy() == size) & (found["mtime_ns"].to_numpy() == mtime) & (size >= 0)
    if keep.any():  # only files the output still holds a row for (it may have been deleted)
        rows = read_done(sources, model_version, (p for p, k in zip(paths, keep, strict=True) if k), engine)
        keep &= want.isin(list(rows))
    return np.asarray(keep, dtype=bool)
