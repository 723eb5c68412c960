"""A scoring job split into shards, for workers that share a filesystem with the driver.

A shard is a contiguous slice of the job's file list (neighbouring files share folders and disk
locality), written as a JSON list in a fresh job folder under the output's work folder, so that
tasks pass paths, not file lists. Each shard reports its progress in a small JSON file there
(:class:`ProgressFile`) that the driver sums (:func:`read_progress`).
"""

from __future__ import annotations

import json
import math
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from cvlib.files.atomic import write_bytes_atomic

__all__ = ["ProgressFile", "read_progress", "read_shard_list", "shard_files", "write_shard_lists"]

PROGRESS_DIR = "progress"


def shard_files(files: Sequence[str], shards: int) -> list[list[str]]:
    """Contiguous, nearly equal slices (neighbouring files share folders and disk locality)."""
    shards = max(1, min(shards, len(files) or 1))
    size = math.ceil(len(files) / shards) if files else 0
    return [list(files[i : i + size]) for i in range(0, len(files), size)] if files else [[]]


def write_shard_lists(work_dir: Path, files: Sequence[str], shards: int) -> tuple[list[str], str]:
    """Split ``files`` into ``shards`` lists in a new job folder under ``work_dir``, after removing
    the job folders of an interrupted run; returns (the lists' paths, the progress folder)."""
    for old in Path(work_dir).glob("job-*"):
        shutil.rmtree(old, ignore_errors=True)
    job = Path(work_dir) / f"job-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    lists = []
    for i, chunk in enumerate(shard_files(files, shards)):
        path = job / f"shard-{i:05d}.json"
        write_bytes_atomic(path, json.dumps(chunk).encode())  # JSON: any file name survives
        lists.append(str(path))
    return lists, str(job / PROGRESS_DIR)


def read_shard_list(path: str | Path) -> list[str]:
    return list(json.loads(Path(path).read_text()))


class ProgressFile:
    """``{"done": n, "total": t}`` in a small JSON file, at most once a second (and at the end);
    a ``progress`` callback for :func:`cvlib.inference.predict.score_to_parts`."""

    def __init__(self, path: Path, every: float = 1.0) -> None:
        self.path, self.every, self._last = Path(path), every, 0.0
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self._last < self.every:
            return
        self._last = now
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:6]}.tmp")
        tmp.write_text(json.dumps({"done": done, "total": total}))
        tmp.replace(self.path)


def read_progress(progress_dir: str | Path) -> int:
    """Files done so far over all shards (from the shards' progress files)."""
    done = 0
    for f in Path(progress_dir).glob("shard-*.json"):
        try:
            done += int(json.loads(f.read_text())["done"])
        except (OSError, ValueError, KeyError):
            continue
    return done
