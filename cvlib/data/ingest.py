"""Scan an image folder (one sub-folder per class) into a manifest: one row per file found.

Every file under a class folder that claims to be an image is accounted for: usable images get
``status="ok"``, exact copies inside a class ``duplicate`` (pointing at the kept copy), everything
else ``quarantined`` with a ``reason`` (a code, see :data:`cvlib.data.verdicts.REASONS`) and a ``detail`` (the
message). Other files (hidden ones, notes, sidecars) are counted, not listed.

Splits come from the content hash, so an image keeps its split as the data set grows and a
byte-identical copy can never sit on both sides of the train/val boundary. A folder laid out by
split (``train/CLASS``, ``val/CLASS``: :mod:`cvlib.data.layout`) keeps the split it gives; the
hash decides only for the files outside split folders (and carves val out of train when no val
folder is given), and the summary reports leakage across the given splits. Near-duplicates
(the same picture re-encoded, resized or lightly edited, found by a perceptual hash) are split
by their group's key for the same reason.

Ingestion is incremental: given the previous manifest, files whose size and modification time
have not changed are not read again (the reuse rules live here, with :func:`build_manifest`).

The steps, one module each: :mod:`cvlib.data.scan` lists the folder, :mod:`cvlib.data.inspection`
reads each file, :mod:`cvlib.data.near_duplicates` and :mod:`cvlib.data.splits` supply the
grouping and the split rule, :mod:`cvlib.data.manifest` makes the group-level decisions and holds
the Parquet file, :mod:`cvlib.data.summary` reads the result; :mod:`cvlib.data.verdicts` holds
what they share (the reasons, the per-file record).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cvlib.data.imageio import ALLOWED_FORMATS
from cvlib.data.inspection import inspect_all
from cvlib.data.manifest import records_to_manifest
from cvlib.data.near_duplicates import NEAR_DUPLICATE_DISTANCE
from cvlib.data.options import DataConfig
from cvlib.data.scan import ScanEntry, scan_folder
from cvlib.data.verdicts import GROUP_REASONS, REASONS, RECHECK_REASONS, FileRecord

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- incremental


def _missing(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, (str, int)):  # the common case, without pandas' per-call cost
        return False
    return bool(pd.isna(value))


_REUSE_COLUMNS = ("path", "bytes", "mtime_ns", "sha256", "reason", "detail", "width", "height", "format", "mode", "n_frames", "phash")


class PreviousRows:
    """The last manifest's columns as plain Python lists and a path -> row index: no pandas row
    per file (a 100k-row manifest as per-row dicts cost seconds and hundreds of MB), and
    ``get(path)`` builds the one small mapping :func:`_reuse` reads, on demand."""

    def __init__(self, columns: dict[str, list]) -> None:
        self.columns = columns
        self.index = {str(p): i for i, p in enumerate(columns.get("path", ()))}

    def __len__(self) -> int:
        return len(self.index)

    def get(self, path: str) -> Mapping | None:
        i = self.index.get(path)
        if i is None:
            return None
        return {name: values[i] for name, values in self.columns.items()}


def _previous_rows(previous: pd.DataFrame | str | os.PathLike[str] | None) -> PreviousRows:
    empty = PreviousRows({})
    if previous is None:
        return empty
    if isinstance(previous, pd.DataFrame):
        names = set(previous.columns)
        table = None
    else:
        if not Path(previous).exists():
            return empty  # first run: nothing to reuse
        names = set(pq.read_schema(previous).names)
        table = pq.read_table(previous, columns=[c for c in _REUSE_COLUMNS if c in names])
    needed = {"path", "bytes", "mtime_ns", "sha256", "reason", "width", "height", "format", "mode", "n_frames"}
    if not needed <= names:
        return empty  # a manifest from an older layout: read everything again
    if table is None:
        frame = previous[[c for c in _REUSE_COLUMNS if c in names]]
        table = pa.Table.from_pandas(frame, preserve_index=False)
    if table.num_rows == 0:
        return empty
    # Arrow to Python: nulls come back as None (never NaN), ints as ints.
    return PreviousRows({name: table.column(name).to_pylist() for name in table.column_names})


def _reuse(prev: Mapping | None, entry: ScanEntry, max_pixels: int, phash: bool) -> FileRecord | None:
    """The previous record of an unchanged file, or None when the file must be read again."""
    if prev is None or _missing(prev.get("mtime_ns")) or _missing(prev.get("bytes")):
        return None
    if int(prev["bytes"]) != entry.bytes or int(prev["mtime_ns"]) != entry.mtime_ns:
        return None
    if _missing(prev.get("sha256")):
        return None
    reason = None if _missing(prev.get("reason")) else str(prev["reason"])
    if reason in GROUP_REASONS:
        reason = None  # the file itself was fine; group verdicts are recomputed below
    if reason in RECHECK_REASONS or (reason is not None and reason not in REASONS):
        return None
    detail = None if reason is None or _missing(prev.get("detail")) else str(prev["detail"])
    if reason is None:
        if any(_missing(prev.get(k)) for k in ("width", "height", "format", "mode")):
            return None
        if int(prev["width"]) * int(prev["height"]) > max_pixels or prev["format"] not in ALLOWED_FORMATS:
            return None
        if phash and _missing(prev.get("phash")):
            return None  # near-duplicate detection was off last time
    ph = None if not phash or _missing(prev.get("phash")) else str(prev["phash"])  # as a fresh build would

    def opt_int(key: str) -> int | None:
        return None if _missing(prev.get(key)) else int(prev[key])

    def opt_str(key: str) -> str | None:
        return None if _missing(prev.get(key)) else str(prev[key])

    return FileRecord(
        entry.path, entry.label, str(prev["sha256"]), entry.bytes, entry.mtime_ns,
        opt_int("width"), opt_int("height"), opt_str("format"), opt_str("mode"), opt_int("n_frames"),
        ph if reason is None else None, reason, detail,
    )  # fmt: skip


def build_manifest(
    root: str | os.PathLike[str],
    cfg: DataConfig | None = None,
    *,
    workers: int | None = None,
    previous: pd.DataFrame | str | os.PathLike[str] | None = None,
    near_duplicates: bool | None = None,
    near_duplicate_distance: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Scan, validate, de-duplicate and split a folder. Returns the manifest and skip counts.

    ``previous``: the last manifest of this folder (a DataFrame or a Parquet path; a path that
    does not exist yet is fine). Files with the same size and mtime are taken from it unread.
    ``near_duplicates`` (default on: the hash comes from the pixels validation decodes anyway,
    under 10% of the ingestion time, see benchmarks/ingest.py) groups re-encoded, resized or
    lightly edited copies (perceptual hashes within ``near_duplicate_distance`` bits) so they
    share a split; ``near_duplicate_of`` names the group's key image.
    ``progress(done, total)`` is called as files are read.
    """
    cfg = cfg or DataConfig()
    if near_duplicates is None:
        near_duplicates = bool(getattr(cfg, "near_duplicates", True))
    if near_duplicate_distance is None:
        near_duplicate_distance = int(getattr(cfg, "near_duplicate_distance", NEAR_DUPLICATE_DISTANCE))
    root = Path(root)
    entries, skipped = scan_folder(root)
    prev = _previous_rows(previous)

    records: list[FileRecord | None] = [None] * len(entries)
    todo: list[int] = []
    for i, entry in enumerate(entries):
        if entry.reason is not None:
            records[i] = FileRecord(entry.path, entry.label, None, entry.bytes, entry.mtime_ns,
                                    reason=entry.reason, detail=entry.detail)  # fmt: skip
        elif (reused := _reuse(prev.get(entry.path), entry, cfg.max_image_pixels, near_duplicates)) is not None:
            records[i] = reused
        else:
            todo.append(i)

    workers = workers or min(8, (os.cpu_count() or 2) * 2)
    inspect_all(root, entries, todo, records, cfg.max_image_pixels, near_duplicates, workers, progress)
    log.info("ingested %s: %d files, %d read, %d reused", root, len(entries), len(todo), len(entries) - len(todo))
    manifest = records_to_manifest(
        [r for r in records if r is not None],
        cfg,
        near_duplicate_distance=near_duplicate_distance if near_duplicates else None,
        given_splits={e.path: e.split for e in entries if e.split is not None},
    )
    return manifest, skipped
