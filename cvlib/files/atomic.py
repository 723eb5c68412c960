"""Atomic file writes: a reader sees the old file or the complete new one, never a torn write,
and a failure (a crash, a full disk) leaves no temporary file behind.

A write that fails for lack of space or a file-size limit (``ENOSPC``, ``EDQUOT``, ``EFBIG``) is
raised as :class:`WriteFailed`, an ``OSError`` with the same errno whose message names the target
and says the previous file is intact, so a user knows which disk to free and that a rerun resumes.
Libraries that write through the file object (``torch.save``, pyarrow) may turn the ``OSError``
into their own error; the file object given to the caller records the first ``OSError`` of any
write so the real cause is still what reaches the user.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

# Errors that mean "no room for this file": the disk, a quota, RLIMIT_FSIZE.
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class WriteFailed(OSError):
    """Writing ``filename`` failed; the file that was there before (if any) is unchanged."""

    def __str__(self) -> str:  # the message already names the file; OSError's would repeat it
        return str(self.strerror)


def _default_mode() -> int:
    """The mode an ordinary ``open()`` would give a new file under the current umask
    (``mkstemp`` makes 0600, which would lock other users and workers out)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


class _RecordingFile(io.RawIOBase):
    """A binary file that remembers the first ``OSError`` of a write: ``torch.save`` reports a
    failed write as ``RuntimeError: ... file write failed`` without the errno."""

    def __init__(self, raw: BinaryIO) -> None:
        super().__init__()
        self.raw = raw
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[override]
        try:
            return self.raw.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        if self.raw.closed:  # IOBase.close() (and __del__) flush once more after the real file closed
            return
        try:
            self.raw.flush()
        except OSError as exc:
            self.error = self.error or exc
            raise

    def fileno(self) -> int:
        return self.raw.fileno()

    def tell(self) -> int:
        return self.raw.tell()

    def seekable(self) -> bool:
        return self.raw.seekable()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self.raw.seek(offset, whence)


def _failure(path: Path, exc: BaseException, recorded: OSError | None) -> WriteFailed | None:
    """The user-facing error for a failed write, or None when it is not a file-system error."""
    cause = exc if isinstance(exc, OSError) else recorded
    if cause is None or cause.errno is None:
        return None
    why = "no space left on the device" if cause.errno in NO_SPACE else (cause.strerror or str(cause))
    hint = "; free space and rerun to resume" if cause.errno in NO_SPACE else ""
    return WriteFailed(cause.errno, f"could not write {path}: {why} (any previous file is unchanged{hint})", str(path))


@contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Write to a temporary file in the target's folder, fsync, then ``os.replace`` it into place.

    On any failure the temporary file is removed and the target is left as it was; a
    file-system failure is raised as :class:`WriteFailed` naming ``path`` (errno kept).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    recorder: _RecordingFile | None = None
    try:
        os.fchmod(fd, _default_mode())
        with os.fdopen(fd, "wb") as f:
            recorder = _RecordingFile(f)
            yield recorder  # type: ignore[misc]
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        failure = None if isinstance(exc, WriteFailed) else _failure(path, exc, recorder.error if recorder else None)
        if failure is not None:
            raise failure from exc
        raise


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    with atomic_write(path) as f:
        f.write(data)
    return Path(path)


def copy_file_atomic(source: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """A byte copy of ``source`` at ``path``, atomically (a reader never sees half of it)."""
    with open(source, "rb") as src, atomic_write(path) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    return Path(path)
