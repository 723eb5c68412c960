"""What ingestion can say about a file, and about the folder as a whole.

Shared by every step of ingestion (scan, reading, the manifest, the summary): the reasons a file
is refused (:data:`REASONS`), the record each file contributes before the group-level decisions
(:class:`FileRecord`), the error for a folder that cannot be trained on, and the one ordering rule
for paths and class names (:func:`nfc`).
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

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
RECHECK_REASONS = frozenset(
    {"unreadable", "missing", "decompression_bomb", "symlink_outside_root", "broken_symlink",
     "not_a_regular_file", "undecodable_name"}
)  # fmt: skip


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


def nfc(s: str) -> str:
    """The sort key of paths and names: Unicode NFC, so the order does not depend on how the file
    system normalises names."""
    return unicodedata.normalize("NFC", s)
