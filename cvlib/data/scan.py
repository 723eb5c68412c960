"""Listing a data folder (one sub-folder per class): which files ingestion will look at.

Nothing is read here, only names and ``stat``: the scan decides what is a candidate image, what
is skipped (counted, not listed) and what is refused on sight (links leaving the root, pipes,
undecodable names), so that reading can never be pointed at something it should not open.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, replace
from pathlib import Path

from cvlib.data.imageio import claims_image
from cvlib.data.layout import detect_layout
from cvlib.data.verdicts import DataSetError, nfc


@dataclass(frozen=True, slots=True)
class ScanEntry:
    """A file found by the scan. ``reason`` set: refused without reading (links, pipes...)."""

    path: str
    label: str
    bytes: int = 0
    mtime_ns: int = 0
    reason: str | None = None
    detail: str | None = None
    split: str | None = None  # given by a split folder (cvlib.data.layout); None: decided by content


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

    A folder laid out by split (``train/CLASS/...``, ``val/CLASS/...``, see
    :mod:`cvlib.data.layout`) is read as classes inside splits: each entry's ``split`` is the one
    its folder gives, and its path keeps the split folder (``train/ants/1.jpg``).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataSetError(f"data folder {root} does not exist or is not a folder")
    real_root = os.path.realpath(root)
    skipped = {"hidden": 0, "non_image": 0, "outside_class": 0, "symlink_loop": 0, "empty_class": 0}
    entries: list[ScanEntry] = []
    layout = detect_layout(root)

    for top in sorted(os.scandir(root), key=lambda e: nfc(e.name)):
        split = layout.split_folders.get(top.name)
        if split is None:
            _scan_class(top, "", None, real_root, entries, skipped)
            continue
        real = os.path.realpath(top.path)
        if not _inside(real, real_root):  # a split folder linked from elsewhere: refused like a class folder
            entries.append(ScanEntry(top.name, top.name, reason="symlink_outside_root", detail=f"split folder links to {real}"))
            continue
        for child in sorted(os.scandir(top.path), key=lambda e: nfc(e.name)):
            _scan_class(child, f"{top.name}/", split, real_root, entries, skipped)

    entries.sort(key=lambda e: nfc(e.path))
    return entries, skipped


def _scan_class(
    top: os.DirEntry, prefix: str, split: str | None, real_root: str, entries: list[ScanEntry], skipped: dict[str, int]
) -> None:
    """One class folder (``prefix`` + name, relative to the root); its files take ``split`` as given."""
    name = top.name
    if name.startswith("."):
        skipped["hidden"] += 1
        return
    label = nfc(name) if _encodable(name) else _printable(name)
    rel = f"{prefix}{name}" if _encodable(name) else f"{prefix}{label}"
    real = os.path.realpath(top.path)
    if top.is_symlink() and os.path.isdir(real) and not _inside(real, real_root):
        entries.append(ScanEntry(rel, label, reason="symlink_outside_root", detail=f"class folder links to {real}", split=split))
        return
    if not top.is_dir():  # follows links: a link to a folder inside the root is a class
        skipped["outside_class"] += 1
        return
    before = len(entries)
    _walk_class(top.path, f"{prefix}{name}", label, frozenset({real_root, real}), real_root, entries, skipped)
    if len(entries) == before:
        skipped["empty_class"] += 1
    elif split is not None:
        entries[before:] = [replace(e, split=split) for e in entries[before:]]


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
                children = sorted(it, key=lambda e: nfc(e.name))
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
            entries.append(_file_entry(entry.path, rel, label))


def _file_entry(path: str, rel: str, label: str) -> ScanEntry:
    """A file whose name claims an image: its size and mtime, or why it is refused unread."""
    if not _encodable(rel):
        return _refused(_printable(rel), label, "undecodable_name", "file name is not valid UTF-8")
    try:
        st = os.stat(path)  # follows an in-root link: size and mtime of the content
    except FileNotFoundError:
        return _refused(rel, label, "missing", "file disappeared during the scan")
    except OSError as exc:
        return _refused(rel, label, "unreadable", f"cannot stat: {exc.strerror or exc}")
    if not stat.S_ISREG(st.st_mode):  # opening a FIFO would block ingestion forever
        return _refused(rel, label, "not_a_regular_file", f"file type {stat.S_IFMT(st.st_mode):o}")
    return ScanEntry(rel, label, st.st_size, st.st_mtime_ns)


def _refused(rel: str, label: str, reason: str, detail: str) -> ScanEntry:
    return ScanEntry(rel, label, reason=reason, detail=detail)
