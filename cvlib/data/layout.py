"""How a data folder is laid out: class folders at the top, or split folders holding class folders.

Many public data sets (torchvision's transfer-learning tutorial's ants/bees among them) ship as
``train/CLASS/...`` and ``val/CLASS/...``. Read as class folders, that trains a model to tell
"train" from "val". So the top level is looked at first, by name and shape only (nothing read):

- A top-level folder named ``train``, ``val``/``valid``/``validation`` or ``test`` (any case) is a
  *split folder* when it holds sub-folders and no images directly; its sub-folders are classes and
  their files take that split as given. A folder with one of those names that holds images
  directly is an ordinary class (a vehicles data set may have a class called "train").
- Every split folder must hold the same class folders; otherwise the error names the folders and
  the classes that differ (a typo there would silently make a class that is never validated).
- Next to split folders, a top-level folder named like one of their classes adds unsplit images to
  that class (the content hash then splits them). Any other top-level folder is ambiguous (a new
  class, or data that belongs in a split?) and is an error naming it.
- Mixed shapes (``train/ants/...`` next to ``val/*.jpg``), or two folders naming the same split
  (``val`` and ``validation``), are errors too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from cvlib.data.imageio import claims_image
from cvlib.data.verdicts import DataSetError, nfc

SPLIT_FOLDER_NAMES: dict[str, str] = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
SPLIT_ORDER = ("train", "val", "test")


@dataclass(frozen=True, slots=True)
class Layout:
    """``split_folders`` maps a top-level folder's name to the split it gives (empty: class folders)."""

    split_folders: dict[str, str] = field(default_factory=dict)
    classes: tuple[str, ...] = ()

    @property
    def by_split(self) -> bool:
        return bool(self.split_folders)


def _visible_dirs(path: str) -> list[os.DirEntry]:
    with os.scandir(path) as it:
        return sorted((e for e in it if not e.name.startswith(".") and e.is_dir()), key=lambda e: nfc(e.name))


def _has_direct_images(path: str) -> bool:
    with os.scandir(path) as it:
        return any(not e.name.startswith(".") and claims_image(e.name) and not e.is_dir() for e in it)


def _names(values: set[str]) -> str:
    return ", ".join(sorted(values)) or "(none)"


def detect_layout(root: str | os.PathLike[str]) -> Layout:
    """The layout of ``root``; raises :class:`DataSetError` for one that looks like splits but is
    inconsistent (see the module docstring for the rules)."""
    tops = _visible_dirs(os.fspath(root))
    named = [e for e in tops if e.name.lower() in SPLIT_FOLDER_NAMES]
    shaped = {e.name: bool(_visible_dirs(e.path)) and not _has_direct_images(e.path) for e in named}
    if not any(shaped.values()):
        return Layout()  # no split folders: every top-level folder is a class
    loose = [n for n, ok in shaped.items() if not ok]
    if loose:
        split_like = [n for n, ok in shaped.items() if ok]
        raise DataSetError(
            f"ambiguous layout in {root}: {_quoted(split_like)} hold class folders (split folders), but "
            f"{_quoted(loose)} hold images directly; put the images of {_quoted(loose)} in class sub-folders, "
            "or rename the folders"
        )
    split_folders: dict[str, str] = {}
    for e in named:
        split = SPLIT_FOLDER_NAMES[e.name.lower()]
        other = next((n for n, s in split_folders.items() if s == split), None)
        if other is not None:
            raise DataSetError(f"folders '{other}' and '{e.name}' in {root} both name the {split} split; merge them into one")
        split_folders[e.name] = split
    classes = {e.name: {nfc(c.name) for c in _visible_dirs(e.path)} for e in named}
    every = set().union(*classes.values())
    if any(c != every for c in classes.values()):
        parts = "; ".join(f"'{n}' has {_names(c)}" for n, c in classes.items())
        differ = "; ".join(f"'{n}' lacks {_names(every - c)}" for n, c in classes.items() if c != every)
        raise DataSetError(
            f"split folders in {root} hold different classes: {parts} ({differ}). Every split folder needs the "
            "same class sub-folders (check for a typo, or add the missing class)"
        )
    extra = [e.name for e in tops if e.name not in split_folders and nfc(e.name) not in every]
    if extra:
        raise DataSetError(
            f"ambiguous layout in {root}: split folders {_quoted(list(split_folders))} hold classes {_names(every)}, "
            f"but top-level folder(s) {_quoted(extra)} are neither a split nor one of those classes; move them "
            "into the split folders (or name them like a class to add unsplit images of it)"
        )
    return Layout(split_folders, tuple(sorted(every)))


def _quoted(names: list[str]) -> str:
    return ", ".join(f"'{n}'" for n in names)


def layout_note(given: dict[str, str], hashed_files: int = 0) -> str:
    """One line saying how the splits were decided. ``given``: split folder name -> split."""
    if not given:
        return "class folders: splits from the content hash"
    folders = "/".join(sorted(given, key=lambda n: (SPLIT_ORDER.index(given[n]), n)))
    note = f"split folders {folders} found: using the given split"
    present = set(given.values())
    if "train" in present and "val" not in present:
        note += " (no val folder: val is taken from train by the content hash)"
    if hashed_files:
        note += f"; {hashed_files} files in top-level class folders split by the content hash"
    return note
