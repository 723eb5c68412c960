"""Reading each file the scan found: hash it and validate it as an image, on worker threads.

A file is read once: the same bytes are hashed and decoded, so the hash always describes exactly
the content that was validated. Whatever the file itself causes (it cannot be read, it is not an
image, it is damaged or too large) becomes that file's verdict. Anything else is a bug in our own
code and stops the run, naming the file: quarantining every file because of one typo would look
like a data problem and hide the bug.
"""

from __future__ import annotations

import hashlib
import os
import queue
import struct
import threading
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from cvlib.data.imageio import ImageReadError, probe
from cvlib.data.options import DataConfig
from cvlib.data.scan import ScanEntry
from cvlib.data.verdicts import FileRecord

READ_WHOLE_LIMIT = 64 << 20  # files up to this size are read once, hashed and decoded from memory
# What a file can make reading and decoding raise: I/O errors and Pillow's own (UnidentifiedImageError
# and "image file is truncated" are OSErrors), a decompression bomb, and the ValueError, EOFError,
# SyntaxError and struct.error Pillow's parsers raise on damaged headers. :func:`probe` already turns
# these into an ImageReadError; this is the last line for one that escapes it. TypeError,
# AttributeError, KeyError, NameError, RuntimeError... are ours, and are raised.
FILE_ERRORS: tuple[type[Exception], ...] = (
    OSError, Image.DecompressionBombError, ValueError, EOFError, SyntaxError, struct.error,
)  # fmt: skip


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
    """A failure the file caused becomes that file's row and ingestion goes on; any other error
    is raised with a note naming the file, so a bug fails the run instead of quarantining the data."""
    try:
        # Looked up at call time (a module global) so tests can count or break it.
        return inspect_file(root, entry.path, entry.label, max_pixels, phash=phash, mtime_ns=entry.mtime_ns)
    except FILE_ERRORS as exc:
        return FileRecord(
            entry.path, entry.label, None, entry.bytes, entry.mtime_ns,
            reason="unreadable", detail=f"{type(exc).__name__}: {exc}",
        )  # fmt: skip
    except Exception as exc:
        exc.add_note(f"raised while inspecting {os.path.join(root, entry.path)}: a bug in visionflow, not a bad file")
        raise


def inspect_all(
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
