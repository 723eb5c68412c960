"""Resuming a scoring job: what the output already holds, and what a killed run left behind.

A file is skipped when a part already holds a row for the same path, the same content
(``sha256``), the same ``model_version`` and the same ``engine`` (a file that could not even be
read is matched by path). A change of engine (torch -> openvino) counts as another model: its
numbers differ in the last bits, so its rows are written beside the first engine's, never mixed
into them. So a killed run, rerun, ends with exactly the rows of one clean run; a file whose content
changed is scored again and :func:`cvlib.inference.output.compact_parts` drops the superseded row.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from cvlib.inference.output import DEFAULT_ENGINE, read_part

__all__ = ["clean_stale_temps", "read_done"]


def read_done(
    sources: Iterable[str | os.PathLike[str]], model_version: str, paths: Iterable[str] | None = None, engine: str = DEFAULT_ENGINE
) -> dict[str, str | None]:
    """path -> sha256 of the rows already written for ``model_version`` by ``engine`` (None where
    the file could not be read), restricted to ``paths`` when given."""
    wanted = None if paths is None else set(paths)
    done: dict[str, str | None] = {}
    for src in sources:
        try:
            t = read_part(src, ["path", "sha256", "model_version", "engine"])
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
            raise RuntimeError(f"{src} is not a readable predictions part ({exc}); delete it and rerun: its files are scored again") from exc
        columns = (t.column(c).to_pylist() for c in ("path", "sha256", "model_version", "engine"))
        for path, sha, version, by in zip(*columns, strict=True):
            if version == model_version and (by or DEFAULT_ENGINE) == engine and (wanted is None or path in wanted):
                done[path] = sha
    return done


def clean_stale_temps(parts_dir: str | os.PathLike[str]) -> int:
    """Remove temporary part files a killed run left behind (``.part-*.tmp``); call it only when
    no other run writes to the same output."""
    parts_dir = Path(parts_dir)
    removed = 0
    if parts_dir.is_dir():
        for tmp in parts_dir.glob(".part-*.tmp"):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


