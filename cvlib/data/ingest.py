"""Scan an image folder (one sub-folder per class) into a manifest: one row per file found.

Every file under a class folder that claims to be an image is accounted for: usable images get
``status="ok"``, exact copies inside a class ``duplicate`` (pointing at the kept copy), everything
else ``quarantined`` with a ``reason`` (a code, see :data:`REASONS`) and a ``detail`` (the
message). Other files (hidden ones, notes, sidecars) are counted, not listed.

Splits come from the content hash, so an image keeps its split as the data set grows and a
byte-identical copy can never sit on both sides of the train/val boundary. Near-duplicates
(the same picture re-encoded, resized or lightly edited, found by a perceptual hash) are split
by their group's key for the same reason.

Ingestion is incremental: given the previous manifest, files whose size and modification time
have not changed are not read again.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import queue
import stat
import threading
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from cvlib.data.imageio import ALLOWED_FORMATS, ImageReadError, claims_image, probe
from cvlib.data.options import DataConfig
from cvlib.files.parquet import write_table_atomic

log = logging.getLogger(__name__)

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
        ("status", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),  # the human-readable message behind ``reason``
        ("duplicate_of", pa.string()),
        ("near_duplicate_of", pa.string()),  # path of the near-duplicate group's key image
    ]
)

REASONS: dict[str, str] = {
    # about the file itself
    "empty": "the file has zero bytes",
    "not_an_image": "the content is not an image (whatever the extension says)",
    "unsupported_format": "an image, but not in an accepted format (JPEG, PNG, WebP, BMP, GIF, TIFF)",
    "truncated": "the file ends before the image data does",
    "corrupt": "the image data is damaged",
    "decompression_bomb": "more pixels than DataConfig.max_image_pixels allows",
    "unreadable": "the file could not be read, or reading it failed unexpectedly (see detail)",
    "missing": "the file disappeared while the folder was being ingested",
    "symlink_outside_root": "a symbolic link that leads outside the data folder",
    "broken_symlink": "a symbolic link whose target does not exist",
    "not_a_regular_file": "a device, socket or pipe with an image's name",
    "undecodable_name": "the file name is not valid UTF-8 (the path shown is escaped)",
    # about the file among the others
    "label_conflict": "the same bytes appear under more than one class",
    "exact_duplicate": "a byte-identical copy of another file of the same class",
}
GROUP_REASONS = frozenset({"label_conflict", "exact_duplicate"})
# Verdicts that depend on something other than the file's bytes (permissions, the filesystem,
# the pixel limit): never reused from a previous manifest.
_RECHECK_REASONS = frozenset(
    {"unreadable", "missing", "decompression_bomb", "symlink_outside_root", "broken_symlink",
     "not_a_regular_file", "undecodable_name"}
)  # fmt: skip

NEAR_DUPLICATE_DISTANCE = 4  # pHash bits; re-encodes and rescales land at 0-4, see benchmarks/ingest.py
READ_WHOLE_LIMIT = 64 << 20  # files up to this size are read once, hashed and decoded from memory


class DataSetError(ValueError):
    """The folder as a whole cannot be trained on (too few classes, a class too small...)."""


@dataclass(frozen=True, slots=True)
class FileRecord:
    """What one file contributes to the manifest, before the group-level decisions."""

    path: str
    label: str
    sha256: str | None
    bytes: int
    mtime_ns: int
    width: int | None = None
    height: int | None = None
    format: str | None = None
    mode: str | None = None
    n_frames: int | None = None
    phash: str | None = None
    reason: str | None = None  # None: a readable image
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class ScanEntry:
    """A file found by the scan. ``reason`` set: refused without reading (links, pipes...)."""

    path: str
    label: str
    bytes: int = 0
    mtime_ns: int = 0
    reason: str | None = None
    detail: str | None = None


# --------------------------------------------------------------------------- scanning


def _nfc(s: str) -> str:
    return unicodedata.normalize("NFC", s)


def _printable(s: str) -> str:
    """A name the file system handed over as undecodable bytes, escaped so it can be stored."""
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _encodable(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _inside(target: str, real_root: str) -> bool:
    return target == real_root or target.startswith(real_root.rstrip(os.sep) + os.sep)


def scan_folder(root: str | os.PathLike[str]) -> tuple[list[ScanEntry], dict[str, int]]:
    """Walk the class folders; return the files to ingest in a deterministic order, and counts
    of what was skipped.

    Skipped (counted, not listed): hidden files and folders (editor and OS droppings), files
    whose name does not claim an image, files directly under the root (no class), symbolic
    links that would loop. Symbolic links are followed only while they stay inside the data
    root: one that leaves it is listed as quarantined without its target being read, so a
    data folder cannot be used to pull arbitrary files (``/etc/...``, another user's data) into
    a training set. The order is by Unicode NFC path, so it does not depend on the file
    system's directory order or its normalisation.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataSetError(f"data folder {root} does not exist or is not a folder")
    real_root = os.path.realpath(root)
    skipped = {"hidden": 0, "non_image": 0, "outside_class": 0, "symlink_loop": 0, "empty_class": 0}
    entries: list[ScanEntry] = []

    for top in sorted(os.scandir(root), key=lambda e: _nfc(e.name)):
        name = top.name
        if name.startswith("."):
            skipped["hidden"] += 1
            continue
        label = _nfc(name) if _encodable(name) else _printable(name)
        real = os.path.realpath(top.path)
        if top.is_symlink() and os.path.isdir(real) and not _inside(real, real_root):
            entries.append(
                ScanEntry(label, label, reason="symlink_outside_root", detail=f"class folder links to {real}")
            )
            continue
        if not top.is_dir():  # follows links: a link to a folder inside the root is a class
            skipped["outside_class"] += 1
            continue
        before = len(entries)
        _walk_class(top.path, name, label, frozenset({real_root, real}), real_root, entries, skipped)
        if len(entries) == before:
            skipped["empty_class"] += 1

    entries.sort(key=lambda e: _nfc(e.path))
    return entries, skipped


def _walk_class(
    class_dir: str,
    rel_dir: str,
    label: str,
    ancestors: frozenset[str],
    real_root: str,
    entries: list[ScanEntry],
    skipped: dict[str, int],
) -> None:
    stack = [(class_dir, rel_dir, ancestors)]
    while stack:
        dir_path, rel_dir, ancestors = stack.pop()
        try:
            with os.scandir(dir_path) as it:
                children = sorted(it, key=lambda e: _nfc(e.name))
        except OSError as exc:  # a folder we cannot list hides files: say so in the manifest
            entries.append(_refused(rel_dir, label, "unreadable", f"cannot list folder: {exc.strerror or exc}"))
            continue
        for entry in children:
            name = entry.name
            rel = f"{rel_dir}/{name}"
            if name.startswith("."):
                skipped["hidden"] += 1
                continue
            try:
                is_link = entry.is_symlink()
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError as exc:
                entries.append(_refused(rel, label, "unreadable", str(exc)))
                continue
            if is_link:
                target = os.path.realpath(entry.path)
                target_is_dir = os.path.isdir(target)
                if not target_is_dir and not claims_image(name):
                    skipped["non_image"] += 1  # never followed, never read
                    continue
                if not os.path.exists(target):
                    entries.append(_refused(rel, label, "broken_symlink", f"links to {target}, which does not exist"))
                    continue
                if not _inside(target, real_root):
                    entries.append(_refused(rel, label, "symlink_outside_root", f"links to {target}"))
                    continue
                if target_is_dir:
                    if target in ancestors:
                        skipped["symlink_loop"] += 1
                    else:
                        stack.append((entry.path, rel, ancestors | {target}))
                    continue
            elif is_dir:
                stack.append((entry.path, rel, ancestors | {os.path.realpath(entry.path)}))
                continue
            if not claims_image(name):
                skipped["non_image"] += 1
                continue
            if not _encodable(rel):
                entries.append(_refused(_printable(rel), label, "undecodable_name", "file name is not valid UTF-8"))
                continue
            try:
                st = os.stat(entry.path)  # follows an in-root link: size and mtime of the content
            except FileNotFoundError:
                entries.append(_refused(rel, label, "missing", "file disappeared during the scan"))
                continue
            except OSError as exc:
                entries.append(_refused(rel, label, "unreadable", f"cannot stat: {exc.strerror or exc}"))
                continue
            if not stat.S_ISREG(st.st_mode):  # opening a FIFO would block ingestion forever
                entries.append(_refused(rel, label, "not_a_regular_file", f"file type {stat.S_IFMT(st.st_mode):o}"))
                continue
            entries.append(ScanEntry(rel, label, st.st_size, st.st_mtime_ns))


def _refused(rel: str, label: str, reason: str, detail: str) -> ScanEntry:
    return ScanEntry(rel, label, reason=reason, detail=detail)


def list_class_files(root: str | os.PathLike[str]) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """``[(relative_path, label)]`` of every file the scan found, and the skip counts."""
    entries, skipped = scan_folder(root)
    return [(e.path, e.label) for e in entries], skipped


# --------------------------------------------------------------------------- one file


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def inspect_file(
    root: Path,
    rel: str,
    label: str,
    max_pixels: int = DataConfig.model_fields["max_image_pixels"].default,
    *,
    phash: bool = True,
    mtime_ns: int | None = None,
) -> FileRecord:
    """Hash and validate one file; a bad file gives a record with a reason, never an exception.

    The file is read once: the same bytes are hashed and decoded (a JPEG at 1/8 scale), so
    the hash always describes exactly the content that was validated.
    """
    full = os.path.join(root, rel)
    try:
        if mtime_ns is None:
            mtime_ns = os.stat(full).st_mtime_ns
        with open(full, "rb", buffering=0) as f:  # one read of the whole file: no buffer layer
            size = os.fstat(f.fileno()).st_size
            data = f.read() if size <= READ_WHOLE_LIMIT else None
        if data is not None:
            size, digest, source = len(data), hashlib.sha256(data).hexdigest(), data
        else:
            digest, source = sha256_file(full), full
    except FileNotFoundError:
        return FileRecord(rel, label, None, 0, mtime_ns or 0, reason="missing", detail="file disappeared")
    except OSError as exc:
        return FileRecord(rel, label, None, 0, mtime_ns or 0, reason="unreadable", detail=f"{exc.strerror or exc}")
    try:
        info = probe(source, max_pixels=max_pixels, draft=True, phash=phash)
    except ImageReadError as exc:
        return FileRecord(rel, label, digest, size, mtime_ns, reason=exc.reason, detail=exc.message)
    return FileRecord(
        rel,
        label,
        digest,
        size,
        mtime_ns,
        info.width,
        info.height,
        info.format,
        info.mode,
        info.n_frames,
        None if info.phash is None else f"{info.phash:016x}",
    )


def _inspect_safely(root: Path, entry: ScanEntry, max_pixels: int, phash: bool) -> FileRecord:
    """One file's failure, whatever it is, becomes that file's row: ingestion never stops."""
    try:
        # Looked up at call time (a module global) so tests can count or break it.
        return inspect_file(root, entry.path, entry.label, max_pixels, phash=phash, mtime_ns=entry.mtime_ns)
    except Exception as exc:  # noqa: BLE001
        return FileRecord(
            entry.path, entry.label, None, entry.bytes, entry.mtime_ns,
            reason="unreadable", detail=f"{type(exc).__name__}: {exc}",
        )  # fmt: skip


def _inspect_all(
    root: Path,
    entries: list[ScanEntry],
    todo: list[int],
    records: list[FileRecord | None],
    max_pixels: int,
    phash: bool,
    workers: int,
    progress: Callable[[int, int], None] | None,
) -> None:
    """Fill ``records[i]`` for every ``i`` in ``todo``, on ``workers`` threads.

    Threads, not processes: reading, hashing and decoding all release the GIL. Each thread
    takes the next file as soon as it has finished one, with no future per file and nothing
    handed back through the calling thread: on a two-core machine that bookkeeping (and the
    wake-ups it causes) was a measurable share of the CPU a file costs. The calling thread
    only reports progress, when asked to, and stops the workers if the callback raises.
    """
    total = len(todo)
    workers = max(1, min(int(workers), total))
    if total == 0:
        return
    if workers == 1:
        for done, i in enumerate(todo, 1):
            records[i] = _inspect_safely(root, entries[i], max_pixels, phash)
            if progress is not None:
                progress(done, total)
        return

    jobs = iter(todo)
    take = threading.Lock()
    stop = threading.Event()
    finished: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
    errors: list[BaseException] = []

    def work() -> None:
        try:
            while not stop.is_set():
                with take:
                    i = next(jobs, None)
                if i is None:
                    return
                records[i] = _inspect_safely(root, entries[i], max_pixels, phash)
                if progress is not None:
                    finished.put(None)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
            errors.append(exc)
            stop.set()
            finished.put(exc)

    threads = [threading.Thread(target=work, name=f"ingest-{k}", daemon=True) for k in range(workers)]
    for t in threads:
        t.start()
    try:
        if progress is not None:
            for done in range(1, total + 1):
                if finished.get() is not None:
                    break
                progress(done, total)
        for t in threads:
            t.join()
    except BaseException:
        stop.set()  # the callback failed, or an interrupt: finish the files in hand, take no more
        for t in threads:
            t.join()
        raise
    if errors:
        raise errors[0]


# --------------------------------------------------------------------------- incremental


def _missing(value: object) -> bool:
    return value is None or (not isinstance(value, str) and bool(pd.isna(value)))


def _previous_rows(previous: pd.DataFrame | str | os.PathLike[str] | None) -> dict[str, Mapping]:
    if previous is None:
        return {}
    if not isinstance(previous, pd.DataFrame):
        if not Path(previous).exists():
            return {}  # first run: nothing to reuse
        previous = read_manifest(previous)
    needed = {"path", "bytes", "mtime_ns", "sha256", "reason", "width", "height", "format", "mode", "n_frames"}
    if previous.empty or not needed <= set(previous.columns):
        return {}  # a manifest from an older layout: read everything again
    return {str(row["path"]): row for row in previous.to_dict("records")}


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
    if reason in _RECHECK_REASONS or (reason is not None and reason not in REASONS):
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


# --------------------------------------------------------------------------- the whole folder


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
    _inspect_all(root, entries, todo, records, cfg.max_image_pixels, near_duplicates, workers, progress)
    log.info("ingested %s: %d files, %d read, %d reused", root, len(entries), len(todo), len(entries) - len(todo))
    manifest = records_to_manifest(
        [r for r in records if r is not None],
        cfg,
        near_duplicate_distance=near_duplicate_distance if near_duplicates else None,
    )
    return manifest, skipped


def records_to_manifest(
    records: Iterable[FileRecord], cfg: DataConfig, *, near_duplicate_distance: int | None = NEAR_DUPLICATE_DISTANCE
) -> pd.DataFrame:
    """Turn per-file records into the manifest: label conflicts, duplicates, near-duplicate
    groups, splits and class indices (everything that depends on more than one file)."""
    records = list(records)
    n = len(records)

    def column(name: str) -> np.ndarray:
        out = np.empty(n, dtype=object)
        out[:] = [getattr(r, name) for r in records]
        return out

    path, label, sha, reason, detail, phash = (
        column(c) for c in ("path", "label", "sha256", "reason", "detail", "phash")
    )
    status = np.array(["ok" if r is None else "quarantined" for r in reason], dtype=object)
    duplicate_of = np.full(n, None, dtype=object)
    near_of = np.full(n, None, dtype=object)

    # The same bytes under two labels: which one is right is unknowable, so neither is used.
    ok = status == "ok"
    labels_of: dict[str, set[str]] = {}
    for h, lab in zip(sha[ok], label[ok], strict=True):
        labels_of.setdefault(h, set()).add(lab)
    conflict = ok & np.array([h is not None and len(labels_of.get(h, ())) > 1 for h in sha], dtype=bool)
    status[conflict] = "quarantined"
    reason[conflict] = "label_conflict"
    for i in np.flatnonzero(conflict):
        detail[i] = "same content under classes " + ", ".join(repr(c) for c in sorted(labels_of[sha[i]]))

    # Exact duplicates inside a class: keep the first path in sorted order, point the rest at it.
    order = sorted(range(n), key=lambda i: _nfc(path[i]))
    kept: dict[str, str] = {}
    for i in order:
        if status[i] != "ok":
            continue
        first = kept.setdefault(sha[i], path[i])
        if first != path[i]:
            status[i], reason[i], duplicate_of[i] = "duplicate", "exact_duplicate", first

    # Split key: the content hash, or for a near-duplicate group the smallest hash in it, so
    # every member of the group lands in the same split (a re-encoded copy in val of a train
    # image would measure memory, not generalisation).
    key = sha.copy()
    ok = status == "ok"
    if near_duplicate_distance is not None:
        ok_idx = np.flatnonzero(ok & np.array([x is not None for x in phash], dtype=bool))
        if len(ok_idx) > 1:
            hashes = np.array([int(phash[i], 16) for i in ok_idx], dtype=np.uint64)
            groups = near_duplicate_groups(hashes, near_duplicate_distance)
            members: dict[int, list[int]] = {}
            for i, g in zip(ok_idx, groups, strict=True):
                members.setdefault(int(g), []).append(int(i))
            for rows in members.values():
                if len({sha[i] for i in rows}) < 2:
                    continue
                leader = min(rows, key=lambda i: (sha[i], _nfc(path[i])))
                for i in rows:
                    key[i] = sha[leader]
                    if i != leader:
                        near_of[i] = path[leader]
    key_of_sha = {sha[i]: key[i] for i in np.flatnonzero(ok)}
    split = np.full(n, None, dtype=object)
    for i in range(n):
        if status[i] == "ok":
            split[i] = split_for(key[i], cfg)
        elif status[i] == "duplicate":
            split[i] = split_for(key_of_sha.get(sha[i], sha[i]), cfg)

    classes = sorted({lab for lab, s in zip(label, status, strict=True) if s == "ok"})
    index = {c: i for i, c in enumerate(classes)}
    take = np.array(order, dtype=np.int64)

    def ints(name: str, dtype: str) -> pd.arrays.IntegerArray:
        return pd.array([getattr(records[i], name) for i in take], dtype=dtype)

    columns = {
        "path": path,
        "label": label,
        "label_idx": np.array([index.get(lab, -1) for lab in label], dtype=np.int32),
        "sha256": sha,
        "bytes": None,
        "mtime_ns": None,
        "width": None,
        "height": None,
        "format": column("format"),
        "mode": column("mode"),
        "n_frames": None,
        "phash": phash,
        "split": split,
        "status": status,
        "reason": reason,
        "detail": detail,
        "duplicate_of": duplicate_of,
        "near_duplicate_of": near_of,
    }
    data = {k: (v[take] if v is not None else None) for k, v in columns.items()}
    data["bytes"] = np.array([records[i].bytes for i in take], dtype=np.int64)
    data["mtime_ns"] = np.array([records[i].mtime_ns for i in take], dtype=np.int64)
    for name in ("width", "height", "n_frames"):
        data[name] = ints(name, "Int32")
    return pd.DataFrame(data, columns=MANIFEST_SCHEMA.names)


def _popcount64(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    return np.unpackbits(x.astype(">u8").view(np.uint8).reshape(*x.shape, 8), axis=-1).sum(axis=-1)


_SMALL_BUCKET = 16  # bucket sizes compared position against position; larger ones pair by pair


def near_duplicate_groups(hashes: np.ndarray, distance: int) -> np.ndarray:
    """Group 64-bit hashes that are within ``distance`` bits of each other (transitively).

    Returns a group id per hash (the smallest index, among the distinct hashes in sorted order,
    of its group). Candidate pairs come from multi-index hashing: split the 64 bits into
    ``distance + 1`` blocks; two hashes within ``distance`` bits agree exactly on at least one
    block (pigeonhole), so only hashes sharing a block value are compared. That keeps it
    near-linear instead of comparing every pair of a large folder. Everything is array work:
    small buckets (the usual case) are compared all at once, a crowded bucket in slices of
    bounded memory, and the groups come from label propagation over the close pairs.
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    uniq, inverse = np.unique(hashes, return_inverse=True)
    inverse = inverse.reshape(-1)
    n = len(uniq)
    label = np.arange(n, dtype=np.int64)
    distance = max(0, min(int(distance), 63))
    if distance == 0 or n < 2:
        return label[inverse]

    left: list[np.ndarray] = []
    right: list[np.ndarray] = []

    def keep_close(a: np.ndarray, b: np.ndarray) -> None:
        close = _popcount64(uniq[a] ^ uniq[b]) <= distance
        if close.any():
            left.append(a[close])
            right.append(b[close])

    bounds = np.linspace(0, 64, distance + 2).astype(int)
    for lo, hi in itertools.pairwise(bounds):
        block = (uniq >> np.uint64(lo)) & np.uint64((1 << int(hi - lo)) - 1)
        order = np.argsort(block, kind="stable")
        sorted_block = block[order]
        starts = np.flatnonzero(np.r_[True, sorted_block[1:] != sorted_block[:-1]])
        sizes = np.diff(np.r_[starts, n])
        bucket = np.repeat(np.arange(len(starts)), sizes)  # bucket of each sorted position
        small = sizes[bucket] <= _SMALL_BUCKET
        # small buckets: position k against position k + d of the same bucket, for every d
        for d in range(1, min(int(sizes.max()), _SMALL_BUCKET)):
            k = np.flatnonzero(small[:-d] & (bucket[:-d] == bucket[d:]))
            if len(k):
                keep_close(order[k], order[k + d])
        # crowded buckets: every pair, in slices of bounded memory
        for b in np.flatnonzero(sizes > _SMALL_BUCKET):
            idx = order[starts[b] : starts[b] + sizes[b]]
            values = uniq[idx]
            for a in range(0, len(idx), 1024):
                ii, jj = np.nonzero(_popcount64(values[a : a + 1024, None] ^ values[None, :]) <= distance)
                ii = ii + a
                upper = ii < jj
                if upper.any():
                    left.append(idx[ii[upper]])
                    right.append(idx[jj[upper]])

    if left:
        a, b = np.concatenate(left), np.concatenate(right)
        while True:  # hook each root onto the smallest root it touches, then flatten
            la, lb = label[a], label[b]
            if np.array_equal(la, lb):
                break
            low = np.minimum(la, lb)
            np.minimum.at(label, la, low)
            np.minimum.at(label, lb, low)
            while True:
                up = label[label]
                if np.array_equal(up, label):
                    break
                label = up
    return label[inverse]


def split_for(sha256: str, cfg: DataConfig) -> str:
    """Deterministic split from content: a uniform number in [0, 1) per (salt, hash).

    Each image's split depends on nothing but its own key, which is what makes the split stable
    as images are added, and stratified in expectation: every class gets the configured
    fractions independently (exactly only in the limit; a class of 5 images may get no val).
    """
    u = int.from_bytes(hashlib.sha256(f"{cfg.split_salt}:{sha256}".encode()).digest()[:8], "big") / 2**64
    if u < cfg.test_fraction:
        return "test"
    if u < cfg.test_fraction + cfg.val_fraction:
        return "val"
    return "train"


# --------------------------------------------------------------------------- reading the result


def class_names(manifest: pd.DataFrame) -> list[str]:
    """Classes in label_idx order (the order the model's outputs use)."""
    ok = manifest[manifest["status"] == "ok"]
    return [str(x) for x in ok.drop_duplicates("label_idx").sort_values("label_idx")["label"]]


def check_trainable(manifest: pd.DataFrame, cfg: DataConfig) -> None:
    """Fail fast, naming the class, when the data cannot support training."""
    ok = manifest[manifest["status"] == "ok"]
    all_labels = sorted({str(x) for x in manifest["label"].dropna()})
    counts = ok["label"].astype(str).value_counts().reindex(all_labels, fill_value=0)
    small = counts[counts < cfg.min_images_per_class]
    if len(small):
        parts = []
        for name, n in small.items():
            bad = manifest[(manifest["label"] == name) & (manifest["status"] == "quarantined")]
            why = bad["reason"].value_counts()
            note = f" ({len(bad)} quarantined: {', '.join(f'{r} x{c}' for r, c in why.items())})" if len(bad) else ""
            parts.append(f"{name!r} has {n}{note}")
        raise DataSetError(
            f"classes with fewer than {cfg.min_images_per_class} usable images: {'; '.join(parts)}. "
            "Add images, remove the class folder, or lower min_images_per_class."
        )
    if len(counts) < 2:
        raise DataSetError(f"need at least two classes with usable images, found {len(counts)}: {list(counts.index)}")
    if cfg.val_fraction > 0 and not (ok["split"] == "val").any():
        raise DataSetError("the validation split is empty; add images or raise val_fraction")


def _stats(values: pd.Series) -> dict[str, float]:
    v = pd.to_numeric(values, errors="coerce").dropna()
    if v.empty:
        return {"min": 0, "median": 0.0, "max": 0}
    return {"min": int(v.min()), "median": float(v.median()), "max": int(v.max())}


def summarize(manifest: pd.DataFrame) -> dict:
    """Counts a person wants to see after ingestion (and a Prefect artifact can show)."""
    ok = manifest[manifest["status"] == "ok"]
    per_class = ok.groupby(["label", "split"]).size().unstack(fill_value=0)
    counts = ok["label"].value_counts()
    all_labels = sorted({str(x) for x in manifest["label"].dropna()})
    near = manifest["near_duplicate_of"] if "near_duplicate_of" in manifest else pd.Series([], dtype=object)
    near_rows = manifest[near.notna()] if len(near) else manifest.iloc[0:0]
    groups: dict[str, set[str]] = {}
    group_sizes: Counter[str] = Counter()
    for _, row in near_rows.iterrows():
        leader = str(row["near_duplicate_of"])
        groups.setdefault(leader, set()).add(str(row["label"]))
        group_sizes[leader] += 1
    label_of = dict(zip(manifest["path"].astype(str), manifest["label"].astype(str), strict=True))
    cross = sum(1 for leader, labs in groups.items() if len(labs | {label_of.get(leader, "")}) > 1)
    return {
        "files": len(manifest),
        "ok": len(ok),
        "duplicates": int((manifest["status"] == "duplicate").sum()),
        "quarantined": int((manifest["status"] == "quarantined").sum()),
        "classes": int(ok["label"].nunique()),
        "class_counts": {str(k): int(v) for k, v in counts.sort_index().items()},
        "empty_classes": [c for c in all_labels if c not in counts.index],
        "imbalance_ratio": float(counts.max() / counts.min()) if len(counts) else 0.0,
        "per_class": {str(k): {str(s): int(v) for s, v in row.items()} for k, row in per_class.iterrows()},
        "splits": {str(k): int(v) for k, v in ok["split"].value_counts().sort_index().items()},
        "image_size": {"width": _stats(ok["width"]), "height": _stats(ok["height"])},
        "formats": {str(k): int(v) for k, v in ok["format"].value_counts().sort_index().items()},
        "animated": int((pd.to_numeric(ok["n_frames"], errors="coerce").fillna(1) > 1).sum()),
        "near_duplicates": len(near_rows),
        "near_duplicate_groups": len(groups),
        "cross_class_near_duplicate_groups": int(cross),
        "largest_near_duplicate_group": int(max(group_sizes.values()) + 1) if group_sizes else 0,
        "reasons": {str(k): int(v) for k, v in manifest["reason"].dropna().value_counts().sort_index().items()},
    }


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
