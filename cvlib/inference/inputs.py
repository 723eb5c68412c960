"""What to score: a folder, a glob, a text file of paths or a manifest Parquet, resolved to one
root and the paths under it.

Every input a spec names gets a prediction row, readable or not. A *folder* is walked
recursively for names that claim an image (accepted format or not; hidden files and folders are
skipped). The explicit forms, a *glob*, a *list* or a *manifest*, are taken at their word: every
entry becomes a row, so a listed file that has gone missing or is not an image shows up as an
error instead of vanishing. The same file named twice is scored once (exactly one row per file).

Paths in the result are relative to ``root`` (the predictions' ``path`` column), POSIX style,
sorted. ``root`` is the folder itself, a glob's fixed prefix, or the deepest folder holding every
entry of a list or manifest (unless the manifest says where its data lives).
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cvlib.data.imageio import claims_image

GLOB_CHARS = frozenset("*?[")
MANIFEST_DATA_DIR_KEYS = ("visionflow.data_dir", "visionflow.data_root")


class InputSpecError(ValueError):
    """An input spec that names nothing usable; the message says what to do instead."""


@dataclass(frozen=True)
class Inputs:
    """``root`` and the files under it to score (relative, POSIX, sorted, unique)."""

    root: Path
    paths: list[str]
    kind: str  # folder, file, glob, list, manifest
    spec: str = ""

    def __len__(self) -> int:
        return len(self.paths)


def list_input_files(root: str | os.PathLike[str]) -> list[str]:
    """Every non-hidden file under ``root`` that claims to be an image (accepted format or not),
    sorted, relative to root. Files whose content turns out not to be usable still get a row
    (with an error): nothing that looks like an input is dropped.
    """
    root = Path(root)
    if root.is_file():
        return [root.name]
    if not root.is_dir():
        raise FileNotFoundError(f"input {root} does not exist")
    out: list[str] = []
    base = os.fspath(root)
    for dirpath, names in _input_names(base):
        # One relative prefix per folder and plain string joins per file: a Path and a
        # relative_to() per file cost seconds on a 100k-file folder.
        rel = os.path.relpath(dirpath, base)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        out.extend(prefix + name for name in names)
    return sorted(out)


def holds_input_files(root: str | os.PathLike[str]) -> bool:
    """Whether :func:`list_input_files` would find anything: stops at the first folder holding one."""
    return any(names for _, names in _input_names(os.fspath(root)))


def _input_names(root: str) -> Iterator[tuple[str, list[str]]]:
    """(folder, the names of its input files) for ``root`` and every non-hidden folder under it:
    non-hidden files whose name claims an image."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        yield dirpath, [name for name in filenames if not name.startswith(".") and claims_image(name)]


def is_glob(spec: str) -> bool:
    return any(c in spec for c in GLOB_CHARS)


def resolve_inputs(spec: str | os.PathLike[str], *, root: str | os.PathLike[str] | None = None) -> Inputs:
    """Resolve an input spec (see the module docstring) to :class:`Inputs`.

    ``root`` overrides where a manifest's or list's relative paths start (default: the
    manifest's ``visionflow.data_dir`` metadata, else the folder of the list or manifest).
    """
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        base = path.resolve()
        return Inputs(base, list_input_files(base), "folder", text)
    if path.is_file():
        if path.suffix.lower() == ".parquet":
            return _from_manifest(path, root, text)
        if claims_image(path.name):
            return Inputs(path.resolve().parent, [path.name], "file", text)
        return _from_list(path, root, text)
    if is_glob(text):
        return _from_glob(text)
    raise FileNotFoundError(f"input {text} does not exist (expected a folder, a glob, a text file of paths or a manifest .parquet)")


def _glob_root(pattern: str) -> Path:
    parts = Path(pattern).expanduser().parts
    fixed: list[str] = []
    for part in parts[:-1]:
        if is_glob(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _from_glob(pattern: str) -> Inputs:
    base = _glob_root(pattern).resolve()
    expanded = os.path.expanduser(pattern)
    matches = [Path(m) for m in glob.glob(expanded, recursive=True)]
    files = [m for m in matches if m.is_file()]
    if not files:
        raise InputSpecError(f"the glob {pattern!r} matches no files")
    paths = sorted({m.resolve().relative_to(base).as_posix() for m in files})
    return Inputs(base, paths, "glob", pattern)


def _common_root(absolute: list[Path]) -> Path:
    if not absolute:
        raise InputSpecError("no paths to score")
    common = Path(os.path.commonpath([str(p) for p in absolute]))
    # One entry (or every entry the same file): its folder is the root, so a path stays a name.
    return common.parent if len(set(absolute)) == 1 or common in absolute else common


def _relative(absolute: list[Path], base: Path) -> list[str]:
    seen: dict[str, None] = {}
    for p in absolute:
        seen.setdefault(p.relative_to(base).as_posix(), None)
    return sorted(seen)


def _absolute(entries: list[str], start: Path) -> list[Path]:
    out = []
    for entry in entries:
        p = Path(entry).expanduser()
        out.append(Path(os.path.normpath(p if p.is_absolute() else start / p)))
    return out


def read_path_list(path: str | os.PathLike[str]) -> list[str]:
    """One path per line; blank lines and lines starting with ``#`` are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputSpecError(f"{path} is neither an image nor a UTF-8 text file of paths (one per line)") from exc
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _from_list(path: Path, root: str | os.PathLike[str] | None, spec: str) -> Inputs:
    entries = read_path_list(path)
    if not entries:
        raise InputSpecError(f"the list {path} names no files")
    start = Path(root).expanduser().resolve() if root else path.resolve().parent
    absolute = _absolute(entries, start)
    base = start if root else _common_root(absolute)
    outside = [p for p in absolute if not p.is_relative_to(base)]
    if outside:
        raise InputSpecError(f"{len(outside)} listed paths are outside the root {base}, e.g. {outside[0]}")
    return Inputs(base, _relative(absolute, base), "list", spec)


def _from_manifest(path: Path, root: str | os.PathLike[str] | None, spec: str) -> Inputs:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise InputSpecError(f"{path} is not a readable Parquet manifest: {exc}") from exc
    if "path" not in schema.names:
        raise InputSpecError(f"the manifest {path} has no 'path' column (columns: {', '.join(schema.names)})")
    entries = [str(p) for p in pq.read_table(path, columns=["path"]).column("path").to_pylist() if p]
    if not entries:
        raise InputSpecError(f"the manifest {path} lists no files")
    meta = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
    if root:
        start = Path(root).expanduser().resolve()
    else:
        declared = next((meta[k] for k in MANIFEST_DATA_DIR_KEYS if k in meta), None)
        start = Path(_maybe_json(declared)).expanduser().resolve() if declared else path.resolve().parent
    absolute = _absolute(entries, start)
    relative_entries = [e for e in entries if not Path(e).is_absolute()]
    if relative_entries and not any(p.exists() for p in absolute[:50]):
        raise InputSpecError(
            f"none of the first manifest paths exist under {start} (e.g. {absolute[0]}); the manifest's paths are "
            "relative to its data folder: pass it with --root DIR"
        )
    base = start if not any(Path(e).is_absolute() for e in entries) else _common_root(absolute)
    return Inputs(base, _relative(absolute, base), "manifest", spec)


def _maybe_json(value: str) -> str:
    try:
        decoded = json.loads(value)
    except json.JSONDecodeError:
        return value
    return decoded if isinstance(decoded, str) else value
