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


@dataclass(slots=True)
class _Verdicts:
    """The manifest's columns, one entry per record in input order, while the group-level
    decisions are being made (each step rewrites some of them in place)."""

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
    def of(cls, records: Sequence[FileRecord]) -> _Verdicts:
        reason = _objects([r.reason for r in records])
        return cls(
            path=_objects([r.path for r in records]),
            label=_objects([r.label for r in records]),
            sha=_objects([r.sha256 for r in records]),
            phash=_objects([r.phash for r in records]),
            status=np.array(["ok" if r is None else "quarantined" for r in reason], dtype=object),
            reason=reason,
            detail=_objects([r.detail for r in records]),
            duplicate_of=np.full(len(records), None, dtype=object),
            near_duplicate_of=np.full(len(records), None, dtype=object),
        )


def records_to_manifest(
    records: Iterable[FileRecord],
    cfg: DataConfig,
    *,
    near_duplicate_distance: int | None = NEAR_DUPLICATE_DISTANCE,
    given_splits: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Turn per-file records into the manifest: label conflicts, duplicates, near-duplicate
    groups, splits and class indices (everything that depends on more than one file).

    ``near_duplicate_distance`` None: no near-duplicate grouping (each file's key is its hash).
    ``given_splits``: path -> split for files in split folders (see :mod:`cvlib.data.layout`).
    """
    records = list(records)
    v = _Verdicts.of(records)
    _mark_label_conflicts(v)
    order = sorted(range(len(records)), key=lambda i: nfc(v.path[i]))  # the manifest's row order
    _mark_exact_duplicates(v, order)
    key = v.sha.copy() if near_duplicate_distance is None else _group_near_duplicates(v, near_duplicate_distance)
    given = _objects([(given_splits or {}).get(p) for p in v.path])
    split = assign_splits(v.status, v.sha, key, cfg, given=given)
    return _frame(records, v, split, order, given)


def _mark_label_conflicts(v: _Verdicts) -> None:
    """The same bytes under two labels: which one is right is unknowable, so neither is used."""
    ok = v.status == "ok"
    labels_of: dict[str, set[str]] = {}
    for h, lab in zip(v.sha[ok], v.label[ok], strict=True):
        labels_of.setdefault(h, set()).add(lab)
    conflict = ok & np.array([h is not None and len(labels_of.get(h, ())) > 1 for h in v.sha], dtype=bool)
    v.status[conflict] = "quarantined"
    v.reason[conflict] = "label_conflict"
    for i in np.flatnonzero(conflict):
        v.detail[i] = "same content under classes " + ", ".join(repr(c) for c in sorted(labels_of[v.sha[i]]))


def _mark_exact_duplicates(v: _Verdicts, order: list[int]) -> None:
    """Exact duplicates inside a class: keep the first path in sorted order, point the rest at it."""
    kept: dict[str, str] = {}
    for i in order:
        if v.status[i] != "ok":
            continue
        first = kept.setdefault(v.sha[i], v.path[i])
        if first != v.path[i]:
            v.status[i], v.reason[i], v.duplicate_of[i] = "duplicate", "exact_duplicate", first


def _group_near_duplicates(v: _Verdicts, distance: int) -> np.ndarray:
    """The split key of every row: its content hash, or for a near-duplicate group the smallest
    hash in it, so every member of the group lands in the same split (a re-encoded copy in val
    of a train image would measure memory, not generalisation). Sets ``near_duplicate_of``."""
    key = v.sha.copy()
    rows = np.flatnonzero((v.status == "ok") & np.array([x is not None for x in v.phash], dtype=bool))
    if len(rows) < 2:
        return key
    hashes = np.array([int(v.phash[i], 16) for i in rows], dtype=np.uint64)
    members: dict[int, list[int]] = {}
    for i, g in zip(rows, near_duplicate_groups(hashes, distance), strict=True):
        members.setdefault(int(g), []).append(int(i))
    for group in members.values():
        if len({v.sha[i] for i in group}) < 2:
            continue
        leader = min(group, key=lambda i: (v.sha[i], nfc(v.path[i])))
        for i in group:
            key[i] = v.sha[leader]
            if i != leader:
                v.near_duplicate_of[i] = v.path[leader]
    return key


def _frame(
    records: list[FileRecord], v: _Verdicts, split: np.ndarray, order: list[int], given: np.ndarray
) -> pd.DataFrame:
    """The manifest's table: rows in ``order``, columns in schema order, class indices by name."""
    classes = sorted({lab for lab, s in zip(v.label, v.status, strict=True) if s == "ok"})
    index = {c: i for i, c in enumerate(classes)}
    take = np.array(order, dtype=np.int64)
    objects = {
        "path": v.path,
        "label": v.label,
        "label_idx": np.array([index.get(lab, -1) for lab in v.label], dtype=np.int32),
        "sha256": v.sha,
        "format": _objects([r.format for r in records]),
        "mode": _objects([r.mode for r in records]),
        "phash": v.phash,
        "split": split,
        "given_split": given,
        "status": v.status,
        "reason": v.reason,
        "detail": v.detail,
        "duplicate_of": v.duplicate_of,
        "near_duplicate_of": v.near_duplicate_of,
    }
    data: dict[str, object] = {name: column[take] for name, column in objects.items()}
    ordered = [records[i] for i in take]
    data["bytes"] = np.array([r.bytes for r in ordered], dtype=np.int64)
    data["mtime_ns"] = np.array([r.mtime_ns for r in ordered], dtype=np.int64)
    for name in ("width", "height", "n_frames"):
        data[name] = pd.array([getattr(r, name) for r in ordered], dtype="Int32")
    return pd.DataFrame(data, columns=MANIFEST_SCHEMA.names)


# --------------------------------------------------------------------------- reading the result


def class_names(manifest: pd.DataFrame) -> list[str]:
    """Classes in label_idx order (the order the model's outputs use)."""
    ok = manifest[manifest["status"] == "ok"]
    return [str(x) for x in ok.drop_duplicates("label_idx").sort_values("label_idx")["label"]]


def dataset_hash(manifest: pd.DataFrame) -> str:
    """A hash of what training sees: (label, content, split) of every usable file."""
    ok = manifest[manifest["status"] == "ok"].sort_values("path")
    h = hashlib.sha256()
    for label, digest, split in zip(ok["label"], ok["sha256"], ok["split"], strict=True):
        h.update(f"{label}\0{digest}\0{split}\n".encode())
    return h.hexdigest()


def write_manifest(manifest: pd.DataFrame, out: str | os.PathLike[str], metadata: dict[str, str] | None = None) -> Path:
    """Write atomically (temp file, fsync, rename): a crash leaves the old manifest intact."""
    frame = manifest.reindex(columns=MANIFEST_SCHEMA.names)
    table = pa.Table.from_pandas(frame, schema=MANIFEST_SCHEMA, preserve_index=False)
    return write_table_atomic(table, out, metadata=metadata)


def read_manifest(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a manifest; columns added since it was written come back empty."""
    df = pd.read_parquet(path)
    for name in MANIFEST_SCHEMA.names:
        if name not in df.columns:
            df[name] = None
    return df
