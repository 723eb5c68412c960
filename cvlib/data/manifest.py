"""The manifest: one row per file found, with its verdict, its split and its class index.

:func:`records_to_manifest` makes every decision that depends on more than one file (label
conflicts, exact duplicates, near-duplicate groups, splits, class indices); the rest reads and
writes the Parquet file and names what training sees (its classes, its hash).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cvlib.data.near_duplicates import NEAR_DUPLICATE_DISTANCE, near_duplicate_groups
from cvlib.data.options import DataConfig
from cvlib.data.splits import assign_splits
from cvlib.data.verdicts import FileRecord, nfc
from cvlib.files.parquet import write_table_atomic

MANIFEST_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("label", pa.string()),
        ("label_idx", pa.int32()),
        ("sha256", pa.string()),
        ("bytes", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("format", pa.string()),
        ("mode", pa.string()),
        ("n_frames", pa.int32()),
        ("phash", pa.string()),  # 16 hex digits, null when not computed or not an image
        ("split", pa.string()),  # null for quarantined files
        ("given_split", pa.string()),  # the split its split folder gives (train/val/test); null: none
        ("status", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),  # the human-readable message behind ``reason``
        ("duplicate_of", pa.string()),
        ("near_duplicate_of", pa.string()),  # path of the near-duplicate group's key image
    ]
)


def _objects(values: Sequence[object]) -> np.ndarray:
    # Always an object array of str/None: np.array() on all-string values picks a fixed-width
    # string dtype, which would truncate the longer values the later steps write into it.
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _is_null(values: np.ndarray) -> np.ndarray:
    return pd.isna(values) if len(values) else np.zeros(0, dtype=bool)


@dataclass(slots=True)
class _Verdicts:
    """The manifest's columns, one entry per row in manifest order, while the group-level
    decisions are being made (each step rewrites some of them in place, array-wide)."""

    path: np.ndarray
    label: np.ndarray
    sha: np.ndarray
    phash: np.ndarray
    status: np.ndarray
    reason: np.ndarray
    detail: np.ndarray
    duplicate_of: np.ndarray
    near_duplicate_of: np.ndarray

    @classmethod
    def of(cls, cols: Mapping[str, np.ndarray]) -> _Verdicts:
        n = len(cols["path"])
        reason = _objects(cols["reason"])
        status = np.full(n, "quarantined", dtype=object)
        status[_is_null(reason)] = "ok"
        return cls(
            path=_objects(cols["path"]),
            label=_objects(cols["label"]),
            sha=_objects(cols["sha256"]),
            phash=_objects(cols["phash"]),
            status=status,
            reason=reason,
            detail=_objects(cols["detail"]),
            duplicate_of=np.full(n, None, dtype=object),
            near_duplicate_of=np.full(n, None, dtype=object),
        )


_RECORD_FIELDS = ("path", "label", "sha256", "bytes", "mtime_ns", "width", "height", "format", "mode", "n_frames",
                  "phash", "reason", "detail")  # fmt: skip


def records_to_manifest(
    records: Iterable[FileRecord],
    cfg: DataConfig,
    *,
    near_duplicate_distance: int | None = NEAR_DUPLICATE_DISTANCE,
    given_splits: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Turn per-file records into the manifest (see :func:`columns_to_manifest`).

    ``given_splits``: path -> split for files in split folders (see :mod:`cvlib.data.layout`).
    """
    records = sorted(records, key=lambda r: nfc(r.path))  # the manifest's row order
    cols: dict[str, np.ndarray] = {name: _objects([getattr(r, name) for r in records]) for name in _RECORD_FIELDS}
    for name in ("bytes", "mtime_ns"):
        cols[name] = cols[name].astype(np.int64)
    for name in ("width", "height", "n_frames"):
        cols[name] = np.array([-1 if v is None else v for v in cols[name]], dtype=np.int64)
    cols["given_split"] = _objects([(given_splits or {}).get(r.path) for r in records])
    return columns_to_manifest(cols, cfg, near_duplicate_distance=near_duplicate_distance, presorted=True)


def columns_to_manifest(
    cols: Mapping[str, np.ndarray],
    cfg: DataConfig,
    *,
    near_duplicate_distance: int | None = NEAR_DUPLICATE_DISTANCE,
    presorted: bool = False,
) -> pd.DataFrame:
    """Turn per-file records, given as columns (those of :class:`FileRecord` plus ``given_split``;
    ``width``/``height``/``n_frames`` as int64 with -1 for none), into the manifest: label
    conflicts, duplicates, near-duplicate groups, splits and class indices (everything that
    depends on more than one file). Array work throughout: a 100k-file folder costs a few
    group-bys, not 100k Python steps.

    ``near_duplicate_distance`` None: no near-duplicate grouping (each file's key is its hash).
    ``presorted``: the rows are already in NFC path order (the manifest's).
    """
    if not presorted:
        order = np.array(sorted(range(len(cols["path"])), key=lambda i: nfc(cols["path"][i])), dtype=np.int64)
        cols = {name: np.asarray(values)[order] for name, values in cols.items()}
    v = _Verdicts.of(cols)
    _mark_label_conflicts(v)
    _mark_exact_duplicates(v)
    key = v.sha.copy() if near_duplicate_distance is None else _group_near_duplicates(v, near_duplicate_distance)
    given = _objects(cols["given_split"])
    split = assign_splits(v.status, v.sha, key, cfg, given=given)
    return _frame(cols, v, split, given)


def _mark_label_conflicts(v: _Verdicts) -> None:
    """The same bytes under two labels: which one is right is unknowable, so neither is used."""
    ok = np.flatnonzero(v.status == "ok")
    if len(ok) == 0:
        return
    # Integer codes instead of string group-bys: a 100k-row folder costs two hash passes.
    sha, _ = pd.factorize(v.sha[ok])
    label, labels = pd.factorize(v.label[ok])
    pairs = np.unique(sha.astype(np.int64) * len(labels) + label)  # the distinct (content, label) pairs
    shared = np.bincount(pairs // len(labels), minlength=sha.max() + 1) > 1
    if not shared.any():
        return
    rows = ok[shared[sha]]
    names: dict[str, list[str]] = {}
    for i in rows:  # only the conflicting rows (few): a loop is fine
        names.setdefault(v.sha[i], []).append(v.label[i])
    v.status[rows] = "quarantined"
    v.reason[rows] = "label_conflict"
    for i in rows:
        v.detail[i] = "same content under classes " + ", ".join(repr(c) for c in sorted(set(names[v.sha[i]])))


def _mark_exact_duplicates(v: _Verdicts) -> None:
    """Exact duplicates inside a class: keep the first path in (manifest) order, point the rest at it."""
    ok = np.flatnonzero(v.status == "ok")
    if len(ok) == 0:
        return
    sha, _ = pd.factorize(v.sha[ok])
    _, first = np.unique(sha, return_index=True)  # first[c]: the first row (in ``ok``) with content c
    again = np.ones(len(ok), dtype=bool)
    again[first] = False
    if not again.any():
        return
    rows = ok[again]
    v.status[rows], v.reason[rows] = "duplicate", "exact_duplicate"
    v.duplicate_of[rows] = v.path[ok[first[sha[again]]]]


def _phash_values(hexes: np.ndarray) -> np.ndarray:
    """16-hex-digit strings to uint64, in one conversion when they all have 16 digits."""
    joined = "".join(hexes)
    if len(joined) == 16 * len(hexes):
        try:
            return np.frombuffer(bytes.fromhex(joined), dtype=">u8").astype(np.uint64)
        except ValueError:
            pass
    return np.array([int(h, 16) for h in hexes], dtype=np.uint64)


def _sortable(hexes: np.ndarray) -> np.ndarray:
    """Hex digests as fixed-width bytes (same order, compared by memcmp: several times faster to
    sort than Python strings); codes in sorted order for anything else."""
    try:
        return hexes.astype(np.bytes_)
    except (UnicodeEncodeError, TypeError, ValueError):
        return pd.factorize(hexes, sort=True)[0]


def _group_near_duplicates(v: _Verdicts, distance: int) -> np.ndarray:
    """The split key of every row: its content hash, or for a near-duplicate group the smallest
    hash in it, so every member of the group lands in the same split (a re-encoded copy in val
    of a train image would measure memory, not generalisation). Sets ``near_duplicate_of``."""
    key = v.sha.copy()
    rows = np.flatnonzero((v.status == "ok") & ~_is_null(v.phash))
    if len(rows) < 2:
        return key
    groups = near_duplicate_groups(_phash_values(v.phash[rows]), distance)
    sha = _sortable(v.sha[rows])
    # Members by group, then hash, then row: a group's first is its leader (its smallest hash,
    # then the first path in manifest (NFC) order).
    order = np.lexsort((rows, sha, groups))
    group, sha, row = groups[order], sha[order], rows[order]
    starts = np.r_[True, group[1:] != group[:-1]]
    new_hash = starts | np.r_[True, sha[1:] != sha[:-1]]
    at = np.cumsum(starts) - 1  # each member's group, numbered in order
    leader = row[np.flatnonzero(starts)][at]
    shared = (np.bincount(at, weights=new_hash) >= 2)[at]  # a group of one content is exact copies, not near
    row, leader = row[shared], leader[shared]
    key[row] = v.sha[leader]
    follower = row != leader
    v.near_duplicate_of[row[follower]] = v.path[leader[follower]]
    return key


def _frame(cols: Mapping[str, np.ndarray], v: _Verdicts, split: np.ndarray, given: np.ndarray) -> pd.DataFrame:
    """The manifest's table: columns in schema order, class indices by name."""
    classes = sorted(set(v.label[v.status == "ok"]))
    index = {c: i for i, c in enumerate(classes)}
    data: dict[str, object] = {
        "path": v.path,
        "label": v.label,
        "label_idx": pd.Series(v.label, dtype=object).map(index).fillna(-1).to_numpy().astype(np.int32),
        "sha256": v.sha,
        "format": _objects(cols["format"]),
        "mode": _objects(cols["mode"]),
        "phash": v.phash,
        "split": split,
        "given_split": given,
        "status": v.status,
        "reason": v.reason,
        "detail": v.detail,
        "duplicate_of": v.duplicate_of,
        "near_duplicate_of": v.near_duplicate_of,
        "bytes": np.asarray(cols["bytes"], dtype=np.int64),
        "mtime_ns": np.asarray(cols["mtime_ns"], dtype=np.int64),
    }
    for name in ("width", "height", "n_frames"):
        values = np.asarray(cols[name], dtype=np.int64)
        data[name] = pd.arrays.IntegerArray(values.astype(np.int32), values < 0)
    return pd.DataFrame(data, columns=MANIFEST_SCHEMA.names)


# --------------------------------------------------------------------------- reading the result


def class_names(manifest: pd.DataFrame) -> list[str]:
    """Classes in label_idx order (the order the model's outputs use)."""
    ok = manifest[manifest["status"] == "ok"]
    return [str(x) for x in ok.drop_duplicates("label_idx").sort_values("label_idx")["label"]]


def dataset_hash(manifest: pd.DataFrame) -> str:
    """A hash of what training sees: (label, content, split) of every usable file."""
    ok = manifest.loc[manifest["status"] == "ok", ["path", "label", "sha256", "split"]].sort_values("path")
    columns = [pa.array(ok[name], type=pa.large_string(), from_pandas=True) for name in ("label", "sha256", "split")]
    if any(c.null_count for c in columns):  # not from this code's manifests; the text form names the gaps
        lines = map("{}\0{}\0{}\n".format, ok["label"].tolist(), ok["sha256"].tolist(), ok["split"].tolist())
        return hashlib.sha256("".join(lines).encode()).hexdigest()
    # The same bytes as the lines above ("label\0sha\0split\n" per row), joined by Arrow in one
    # buffer: a 100k-row manifest costs milliseconds, not 100k string formats.
    def text(value: str) -> pa.Scalar:
        return pa.scalar(value, pa.large_string())

    split_nl = pc.binary_join_element_wise(columns[2], text(""), text("\n"))
    rows = pc.binary_join_element_wise(columns[0], columns[1], split_nl, text("\0"))
    offsets = np.frombuffer(rows.buffers()[1], dtype=np.int64)[rows.offset : rows.offset + len(rows) + 1]
    if len(rows) == 0:
        return hashlib.sha256(b"").hexdigest()
    return hashlib.sha256(rows.buffers()[2][int(offsets[0]) : int(offsets[-1])]).hexdigest()


def write_manifest(manifest: pd.DataFrame, out: str | os.PathLike[str], metadata: dict[str, str] | None = None) -> Path:
    """Write atomically (temp file, fsync, rename): a crash leaves the old manifest intact."""
    frame = manifest.reindex(columns=MANIFEST_SCHEMA.names)
    table = pa.Table.from_pandas(frame, schema=MANIFEST_SCHEMA, preserve_index=False)
    return write_table_atomic(table, out, metadata=metadata)


def read_manifest(path: str | os.PathLike[str], columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Read a manifest (or only ``columns`` of it); columns added since it was written come back empty."""
    if columns is not None:
        present = set(pq.read_schema(path).names)
        df = pd.read_parquet(path, columns=[c for c in columns if c in present])
        for name in columns:
            if name not in df.columns:
                df[name] = None
        return df
    df = pd.read_parquet(path)
    for name in MANIFEST_SCHEMA.names:
        if name not in df.columns:
            df[name] = None
    return df
