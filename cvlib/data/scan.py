"""Listing a data folder (one sub-folder per class): which files ingestion will look at.

Nothing is read here, only names and ``stat``: the scan decides what is a candidate image, what
is skipped (counted, not listed) and what is refused on sight (links leaving the root, pipes,
undecodable names), so that reading can never be pointed at something it should not open.
"""

from __future__ import annotations

import itertools
import operator
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cvlib.data.imageio import IMAGE_EXTENSIONS, OTHER_IMAGE_EXTENSIONS, claims_image
from cvlib.data.layout import detect_layout
from cvlib.data.verdicts import DataSetError, nfc

_IMAGE_SUFFIXES = IMAGE_EXTENSIONS | OTHER_IMAGE_EXTENSIONS
_BY_NAME = operator.attrgetter("name")  # raw names: NFC order where they are ASCII, else Listing.sorted reorders


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


@dataclass(slots=True)
class Listing:
    """What the scan found, as columns (one entry per file, in NFC path order): a 100k-file folder
    is seven lists, not 100k objects, so the previous manifest can be matched against it
    array-wide (:mod:`cvlib.data.ingest`). :meth:`entry` gives one row as a :class:`ScanEntry`."""

    path: list[str] = field(default_factory=list)
    label: list[str] = field(default_factory=list)
    bytes: list[int] = field(default_factory=list)
    mtime_ns: list[int] = field(default_factory=list)
    reason: list[str | None] = field(default_factory=list)
    detail: list[str | None] = field(default_factory=list)
    split: list[str | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.path)

    def add(self, e: ScanEntry) -> None:
        self.path.append(e.path)
        self.label.append(e.label)
        self.bytes.append(e.bytes)
        self.mtime_ns.append(e.mtime_ns)
        self.reason.append(e.reason)
        self.detail.append(e.detail)
        self.split.append(e.split)

    def entry(self, i: int) -> ScanEntry:
        return ScanEntry(self.path[i], self.label[i], self.bytes[i], self.mtime_ns[i], self.reason[i], self.detail[i], self.split[i])

    def entries(self) -> list[ScanEntry]:
        return [self.entry(i) for i in range(len(self))]

    def sorted(self) -> Listing:
        """The same rows in NFC path order (the manifest's order)."""
        keys = [p if p.isascii() else nfc(p) for p in self.path]
        if all(a <= b for a, b in itertools.pairwise(keys)):  # the usual case: the walk listed in order
            return self
        order = sorted(range(len(keys)), key=keys.__getitem__)
        return Listing(*([column[i] for i in order] for column in (self.path, self.label, self.bytes, self.mtime_ns,
                                                                    self.reason, self.detail, self.split)))  # fmt: skip


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


def scan_folder(root: str | os.PathLike[str]) -> tuple[Listing, dict[str, int]]:
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

    The listing is streamed (``os.scandir``, one ``stat`` per candidate) into columns; the only
    per-file work is the name checks and the ``stat``, so a re-run over an unchanged 100k-file
    folder costs little more than the system calls.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataSetError(f"data folder {root} does not exist or is not a folder")
    real_root = os.path.realpath(root)
    skipped = {"hidden": 0, "non_image": 0, "outside_class": 0, "symlink_loop": 0, "empty_class": 0}
    listing = Listing()
    layout = detect_layout(root)

    for top in sorted(os.scandir(root), key=lambda e: nfc(e.name)):
        split = layout.split_folders.get(top.name)
        if split is None:
            _scan_class(top, "", None, real_root, listing, skipped)
            continue
        real = os.path.realpath(top.path)
        if not _inside(real, real_root):  # a split folder linked from elsewhere: refused like a class folder
            listing.add(ScanEntry(top.name, top.name, reason="symlink_outside_root", detail=f"split folder links to {real}"))
            continue
        for child in sorted(os.scandir(top.path), key=lambda e: nfc(e.name)):
            _scan_class(child, f"{top.name}/", split, real_root, listing, skipped)
    return listing.sorted(), skipped


def _scan_class(
    top: os.DirEntry, prefix: str, split: str | None, real_root: str, listing: Listing, skipped: dict[str, int]
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
        listing.add(ScanEntry(rel, label, reason="symlink_outside_root", detail=f"class folder links to {real}", split=split))
        return
    if not top.is_dir():  # follows links: a link to a folder inside the root is a class
        skipped["outside_class"] += 1
        return
    before = len(listing)
    _walk_class(top.path, f"{prefix}{name}", label, frozenset({real_root, real}), real_root, listing, skipped)
    if len(listing) == before:
        skipped["empty_class"] += 1
    elif split is not None:
        listing.split[before:] = [split] * (len(listing) - before)


def _walk_class(
    class_dir: str,
    rel_dir: str,
    label: str,
    ancestors: frozenset[str],
    real_root: str,
    listing: Listing,
    skipped: dict[str, int],
) -> None:
    # The hot loop of a large folder: plain files are appended to the columns directly.
    paths, labels, sizes, mtimes = listing.path, listing.label, listing.bytes, listing.mtime_ns
    reasons, details, splits = listing.reason, listing.detail, listing.split
    stack = [(class_dir, rel_dir, ancestors)]
    while stack:
        dir_path, rel_dir, ancestors = stack.pop()
        try:
            with os.scandir(dir_path) as it:
                # In name order (the file system's is arbitrary): a flat class folder is then listed
                # in path order already, and :meth:`Listing.sorted` has nothing to reorder.
                children = sorted(it, key=_BY_NAME)
        except OSError as exc:  # a folder we cannot list hides files: say so in the manifest
            listing.add(_refused(rel_dir, label, "unreadable", f"cannot list folder: {exc.strerror or exc}"))
            continue
        for entry in children:
            name = entry.name
            if name.startswith("."):
                skipped["hidden"] += 1
                continue
            rel = f"{rel_dir}/{name}"
            try:
                is_link = entry.is_symlink()
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError as exc:
                listing.add(_refused(rel, label, "unreadable", str(exc)))
                continue
            if is_link:
                target = os.path.realpath(entry.path)
                target_is_dir = os.path.isdir(target)
                if not target_is_dir and not claims_image(name):
                    skipped["non_image"] += 1  # never followed, never read
                    continue
                if not os.path.exists(target):
                    listing.add(_refused(rel, label, "broken_symlink", f"links to {target}, which does not exist"))
                    continue
                if not _inside(target, real_root):
                    listing.add(_refused(rel, label, "symlink_outside_root", f"links to {target}"))
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
            dot = name.rfind(".")  # claims_image(name), without its per-call cost (not hidden: no leading dot)
            if dot <= 0 or name[dot:].lower() not in _IMAGE_SUFFIXES:
                skipped["non_image"] += 1
                continue
            if not (rel.isascii() or _encodable(rel)):
                listing.add(_refused(_printable(rel), label, "undecodable_name", "file name is not valid UTF-8"))
                continue
            try:
                st = entry.stat()  # follows an in-root link: size and mtime of the content
            except FileNotFoundError:
                listing.add(_refused(rel, label, "missing", "file disappeared during the scan"))
                continue
            except OSError as exc:
                listing.add(_refused(rel, label, "unreadable", f"cannot stat: {exc.strerror or exc}"))
                continue
            if not stat.S_ISREG(st.st_mode):  # opening a FIFO would block ingestion forever
                listing.add(_refused(rel, label, "not_a_regular_file", f"file type {stat.S_IFMT(st.st_mode):o}"))
                continue
            paths.append(rel)
            labels.append(label)
            sizes.append(st.st_size)
            mtimes.append(st.st_mtime_ns)
            reasons.append(None)
            details.append(None)
            splits.append(None)


def _refused(rel: str, label: str, reason: str, detail: str) -> ScanEntry:
    return ScanEntry(rel, label, reason=reason, detail=detail)
