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

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cvlib.data.imageio import ALLOWED_FORMATS
from cvlib.data.inspection import inspect_all
from cvlib.data.manifest import MANIFEST_SCHEMA, class_names, columns_to_manifest, dataset_hash, write_manifest
from cvlib.data.near_duplicates import NEAR_DUPLICATE_DISTANCE
from cvlib.data.options import DataConfig
from cvlib.data.scan import Listing, scan_folder
from cvlib.data.summary import summarize
from cvlib.data.verdicts import GROUP_REASONS, REASONS, RECHECK_REASONS, FileRecord
from cvlib.files.atomic import copy_file_atomic

log = logging.getLogger(__name__)

# Manifest metadata written by :func:`refresh_manifest`: what an unchanged re-run returns unread.
SETTINGS_KEY = "visionflow.ingest_settings"
SUMMARY_KEY = "visionflow.summary"
HASH_KEY = "visionflow.dataset_hash"
CLASSES_KEY = "visionflow.class_names"
# Bumped when the rules that turn records into a manifest change: an older manifest is then
# rebuilt from its reusable records instead of being returned as it is.
MANIFEST_RULES = 2


# --------------------------------------------------------------------------- incremental

_REUSE_COLUMNS = ("path", "bytes", "mtime_ns", "sha256", "reason", "detail", "width", "height", "format", "mode", "n_frames", "phash")
_NEEDED = {"path", "bytes", "mtime_ns", "sha256", "reason", "width", "height", "format", "mode", "n_frames"}
_KEPT_REASONS = sorted(set(REASONS) - RECHECK_REASONS - GROUP_REASONS)  # file verdicts a re-run may reuse


@dataclass(slots=True)
class Previous:
    """The last manifest as Arrow columns (never one Python object per row), its metadata, and
    per row whether its record may be reused when the file's size and mtime are unchanged."""

    table: pa.Table | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return 0 if self.table is None else self.table.num_rows


def _read_previous(previous: pd.DataFrame | str | os.PathLike[str] | None) -> Previous:
    if previous is None:
        return Previous()
    if isinstance(previous, pd.DataFrame):
        names = set(previous.columns)
        if not _NEEDED <= names:
            return Previous()  # a manifest from an older layout: read everything again
        frame = previous[[c for c in _REUSE_COLUMNS if c in names]]
        table, meta = pa.Table.from_pandas(frame, preserve_index=False), {}
    else:
        if not Path(previous).is_file():
            return Previous()  # first run: nothing to reuse
        schema = pq.read_schema(previous)
        if not _NEEDED <= set(schema.names):
            return Previous()
        table = pq.read_table(previous, columns=[c for c in _REUSE_COLUMNS if c in schema.names])
        meta = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items() if k.startswith(b"visionflow.")}
    for name in ("phash", "detail"):
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, pa.string()))
    # The manifest's types (a frame's all-empty column arrives as Arrow's null type).
    schema = pa.schema([MANIFEST_SCHEMA.field(name) for name in table.column_names])
    return Previous(table.cast(schema), meta)


def _reusable(table: pa.Table, max_pixels: int, phash: bool) -> np.ndarray:
    """Per previous row: may its record be reused for a file of the same size and mtime?
    (The rules of a fresh read, array-wide: a verdict that depends on settings or the file
    system is re-checked, an image needs its facts, the pixel limit and the hash setting hold.)"""

    def col(name: str) -> pa.ChunkedArray:
        return table.column(name)

    reason = col("reason")
    image = pc.or_(pc.is_null(reason), pc.is_in(reason, value_set=pa.array(sorted(GROUP_REASONS))))
    facts = pc.and_(
        pc.and_(pc.is_valid(col("width")), pc.is_valid(col("height"))),
        pc.and_(pc.is_valid(col("format")), pc.is_valid(col("mode"))),
    )
    pixels = pc.multiply(pc.cast(col("width"), pa.int64()), pc.cast(col("height"), pa.int64()))
    facts = pc.and_(facts, pc.less_equal(pixels, max_pixels))
    facts = pc.and_(facts, pc.is_in(col("format"), value_set=pa.array(sorted(ALLOWED_FORMATS))))
    if phash:
        facts = pc.and_(facts, pc.is_valid(col("phash")))  # near-duplicate detection was off last time
    verdict = pc.if_else(image, facts, pc.is_in(reason, value_set=pa.array(_KEPT_REASONS)))
    usable = pc.and_(pc.and_(pc.is_valid(col("sha256")), pc.is_valid(col("bytes"))), pc.is_valid(col("mtime_ns")))
    return pc.fill_null(pc.and_(usable, verdict), False).to_numpy(zero_copy_only=False).astype(bool)


def _ints(column: pa.ChunkedArray, fill: int = -1) -> np.ndarray:
    return pc.fill_null(pc.cast(column, pa.int64()), fill).to_numpy().astype(np.int64, copy=False)


def _objects(column: pa.ChunkedArray) -> np.ndarray:
    """A string column as an object array of str/None."""
    return np.asarray(column.to_numpy(zero_copy_only=False), dtype=object)


@dataclass(slots=True)
class Match:
    """The listing against the previous manifest: ``prev[i]`` the previous row of file ``i``
    (-1: none), ``reuse[i]`` whether its record is taken unread."""

    prev: np.ndarray
    reuse: np.ndarray


def match_previous(listing: Listing, previous: Previous, max_pixels: int, phash: bool) -> Match:
    """Join the listing with the previous manifest on path, with size and mtime equality, as
    array operations (a hash join in pandas' index, comparisons in numpy)."""
    n = len(listing)
    none = Match(np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=bool))
    table = previous.table
    if table is None or table.num_rows == 0 or n == 0:
        return none
    index = pd.Index(_objects(table.column("path")))
    if not index.is_unique:
        return none  # not a manifest this code wrote: read everything again
    prev = index.get_indexer(pd.Index(listing.path, dtype=object)).astype(np.int64)
    found = prev >= 0
    at = np.where(found, prev, 0)
    same = (
        found
        & np.array([r is None for r in listing.reason], dtype=bool)
        & (_ints(table.column("bytes"))[at] == np.asarray(listing.bytes, dtype=np.int64))
        & (_ints(table.column("mtime_ns"))[at] == np.asarray(listing.mtime_ns, dtype=np.int64))
    )
    return Match(prev, same & _reusable(table, max_pixels, phash)[at])


def _record_columns(listing: Listing, previous: Previous, match: Match, phash: bool) -> dict[str, np.ndarray]:
    """Every file's record (what it contributes before the group-level decisions) as columns:
    reused rows from the previous manifest, refused ones from the scan; the rows to read are
    left empty for :func:`_fill_read`."""
    n = len(listing)
    cols: dict[str, np.ndarray] = {
        "path": np.asarray(listing.path + [], dtype=object) if n else np.empty(0, dtype=object),
        "label": np.asarray(listing.label, dtype=object) if n else np.empty(0, dtype=object),
        "bytes": np.asarray(listing.bytes, dtype=np.int64),
        "mtime_ns": np.asarray(listing.mtime_ns, dtype=np.int64),
        "reason": np.asarray(listing.reason, dtype=object) if n else np.empty(0, dtype=object),
        "detail": np.asarray(listing.detail, dtype=object) if n else np.empty(0, dtype=object),
        "given_split": np.asarray(listing.split, dtype=object) if n else np.empty(0, dtype=object),
    }
    for name in ("sha256", "format", "mode", "phash"):
        cols[name] = np.full(n, None, dtype=object)
    for name in ("width", "height", "n_frames"):
        cols[name] = np.full(n, -1, dtype=np.int64)  # -1: null
    rows = np.flatnonzero(match.reuse)
    if len(rows) == 0:
        return cols
    t = previous.table.take(pa.array(match.prev[rows]))
    reason = _objects(t.column("reason"))
    reason[np.isin(reason, list(GROUP_REASONS))] = None  # the file itself was fine; group verdicts are recomputed
    image = np.array([r is None for r in reason], dtype=bool)
    cols["reason"][rows] = reason
    detail = _objects(t.column("detail"))
    detail[image] = None
    cols["detail"][rows] = detail
    for name in ("sha256", "format", "mode"):
        cols[name][rows] = _objects(t.column(name))
    ph = _objects(t.column("phash"))
    if not phash:
        ph[:] = None
    ph[~image] = None  # as a fresh read would: only images get a perceptual hash
    cols["phash"][rows] = ph
    for name in ("width", "height", "n_frames"):
        cols[name][rows] = _ints(t.column(name))
    return cols


def _fill_read(cols: dict[str, np.ndarray], rows: list[int], records: list[FileRecord | None]) -> None:
    """Write the records of the files just read into their rows."""
    for i in rows:
        r = records[i]
        assert r is not None
        cols["sha256"][i], cols["bytes"][i], cols["mtime_ns"][i] = r.sha256, r.bytes, r.mtime_ns
        cols["format"][i], cols["mode"][i], cols["phash"][i] = r.format, r.mode, r.phash
        cols["reason"][i], cols["detail"][i] = r.reason, r.detail
        for name in ("width", "height", "n_frames"):
            value = getattr(r, name)
            cols[name][i] = -1 if value is None else value


def _settings(cfg: DataConfig, near_duplicates: bool, distance: int) -> str:
    """What the manifest depends on besides the files (an unchanged folder under other settings
    is not an unchanged manifest)."""
    return json.dumps(
        {"rules": MANIFEST_RULES, "max_image_pixels": cfg.max_image_pixels, "val_fraction": cfg.val_fraction,
         "test_fraction": cfg.test_fraction, "split_salt": cfg.split_salt, "near_duplicates": near_duplicates,
         "near_duplicate_distance": distance if near_duplicates else None},
        sort_keys=True,
    )  # fmt: skip


def _unchanged(listing: Listing, previous: Previous, match: Match) -> bool:
    """The previous manifest is exactly what a fresh build would give: the same files in the same
    order, every readable one reused, every refused one refused again for the same reason."""
    if previous.table is None or len(previous) != len(listing):
        return False
    if not np.array_equal(match.prev, np.arange(len(listing))):
        return False
    refused = ~match.reuse
    if not refused.any():
        return True
    scan_reason = np.asarray(listing.reason, dtype=object)[refused]
    if any(r is None for r in scan_reason):
        return False  # a file to read
    t = previous.table.take(pa.array(np.flatnonzero(refused)))
    return (
        list(scan_reason) == t.column("reason").to_pylist()
        and [listing.detail[i] for i in np.flatnonzero(refused)] == t.column("detail").to_pylist()
        and not np.any(_ints(t.column("bytes")) != 0)
    )


# --------------------------------------------------------------------------- building


@dataclass(slots=True)
class _Built:
    manifest: pd.DataFrame | None  # None: the previous manifest is the result, unchanged
    skipped: dict[str, int]
    read: int
    settings: str


def _build(
    root: str | os.PathLike[str],
    cfg: DataConfig,
    previous: Previous,
    *,
    workers: int | None,
    near_duplicates: bool | None,
    near_duplicate_distance: int | None,
    progress: Callable[[int, int], None] | None,
    allow_unchanged: bool,
) -> _Built:
    if near_duplicates is None:
        near_duplicates = bool(getattr(cfg, "near_duplicates", True))
    if near_duplicate_distance is None:
        near_duplicate_distance = int(getattr(cfg, "near_duplicate_distance", NEAR_DUPLICATE_DISTANCE))
    root = Path(root)
    settings = _settings(cfg, near_duplicates, near_duplicate_distance)
    listing, skipped = scan_folder(root)
    match = match_previous(listing, previous, cfg.max_image_pixels, near_duplicates)
    if allow_unchanged and previous.metadata.get(SETTINGS_KEY) == settings and _unchanged(listing, previous, match):
        log.info("ingested %s: %d files, none new or changed", root, len(listing))
        return _Built(None, skipped, 0, settings)

    cols = _record_columns(listing, previous, match, near_duplicates)
    scan_ok = np.array([r is None for r in listing.reason], dtype=bool)
    todo = np.flatnonzero(scan_ok & ~match.reuse).tolist()
    records: list[FileRecord | None] = [None] * len(listing)
    workers = workers or min(8, (os.cpu_count() or 2) * 2)
    inspect_all(root, _Entries(listing), todo, records, cfg.max_image_pixels, near_duplicates, workers, progress)
    _fill_read(cols, todo, records)
    log.info("ingested %s: %d files, %d read, %d reused", root, len(listing), len(todo), int(match.reuse.sum()))
    manifest = columns_to_manifest(
        cols, cfg, near_duplicate_distance=near_duplicate_distance if near_duplicates else None, presorted=True
    )
    return _Built(manifest, skipped, len(todo), settings)


class _Entries:
    """``entries[i]`` of a listing, built only for the files that are read."""

    def __init__(self, listing: Listing) -> None:
        self.listing = listing

    def __getitem__(self, i: int):
        return self.listing.entry(i)


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
    built = _build(
        root, cfg or DataConfig(), _read_previous(previous), workers=workers, near_duplicates=near_duplicates,
        near_duplicate_distance=near_duplicate_distance, progress=progress, allow_unchanged=False,
    )  # fmt: skip
    assert built.manifest is not None
    return built.manifest, built.skipped


@dataclass(frozen=True, slots=True)
class Refreshed:
    """What :func:`refresh_manifest` did: the manifest's path and facts (read from its metadata
    when nothing changed), whether it was rewritten, and how many files were read."""

    path: Path
    changed: bool
    read: int
    skipped: dict[str, int]
    dataset_hash: str
    class_names: list[str]
    summary: dict


def refresh_manifest(
    root: str | os.PathLike[str],
    out: str | os.PathLike[str],
    cfg: DataConfig | None = None,
    *,
    previous: str | os.PathLike[str] | None = None,
    workers: int | None = None,
    near_duplicates: bool | None = None,
    near_duplicate_distance: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Refreshed:
    """Bring the manifest ``out`` up to date with the folder; ``previous`` (default: ``out``
    itself) is the manifest whose records are reused.

    An unchanged folder (same files, sizes and mtimes, same settings) costs a listing and a
    column comparison: ``out`` is not rewritten (or is a byte copy of ``previous``), and the
    summary, data set hash and class names come from the manifest's metadata. Otherwise only new
    and changed files are read, and the manifest, with that metadata, is written atomically
    (a crash leaves the old one whole, and the next run resumes from it).
    """
    cfg = cfg or DataConfig()
    out = Path(out)
    source = Path(previous) if previous is not None else out
    prev = _read_previous(source)
    built = _build(
        root, cfg, prev, workers=workers, near_duplicates=near_duplicates,
        near_duplicate_distance=near_duplicate_distance, progress=progress,
        allow_unchanged=all(k in prev.metadata for k in (SUMMARY_KEY, HASH_KEY, CLASSES_KEY)),
    )  # fmt: skip
    if built.manifest is None:
        if source.resolve() != out.resolve():
            copy_file_atomic(source, out)
        return Refreshed(
            out, False, 0, built.skipped, prev.metadata[HASH_KEY], json.loads(prev.metadata[CLASSES_KEY]),
            json.loads(prev.metadata[SUMMARY_KEY]),
        )  # fmt: skip
    manifest = built.manifest
    summary, digest, names = summarize(manifest), dataset_hash(manifest), class_names(manifest)
    metadata = {HASH_KEY: digest, CLASSES_KEY: json.dumps(names), SUMMARY_KEY: json.dumps(summary), SETTINGS_KEY: built.settings}
    write_manifest(manifest, out, metadata=metadata)
    return Refreshed(out, True, built.read, built.skipped, digest, names, summary)
