"""The predictions output: the Parquet schema, where a job writes (:class:`OutputLayout`), part
files written behind the model (:class:`PartWriter`), and finishing: compacting a dataset,
writing the single file, reading predictions back.

``OUT`` ending in ``.parquet`` (and not an existing folder) is a single file, written atomically
at the end from parts staged in a hidden folder beside it (``.OUT.parts``); anything else is a
Parquet dataset folder of ``part-*.parquet`` files that ``pandas.read_parquet(OUT)`` reads whole.
Every part is written under a temporary name and renamed into place when complete
(:mod:`cvlib.files.atomic`), with the explicit :data:`PREDICTIONS_SCHEMA` and the class list and
scoring configuration in the key-value metadata. Rows carry the ``engine`` (torch, openvino)
and ``precision`` (fp32, bf16, int8) that scored them, and a job's rows are those of one model
version *and* one engine: scoring again with another engine is scoring with another model
(:mod:`cvlib.inference.resume`), its rows never mix with the first's. Hidden names (``.``) are ignored by Parquet
readers: temporary part files and the ``.visionflow`` work folder never show up as data.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cvlib.columns import isin
from cvlib.files.parquet import read_metadata, write_table_atomic

__all__ = [
    "META_CLASS_NAMES", "META_SCORING", "PART_GLOB", "PREDICTIONS_SCHEMA", "OutputLayout", "PartWriter", "compact_parts",
    "finalize_dataset", "finalize_single_file", "output_layout", "parquet_metadata", "read_predictions", "recorded_scoring",
    "write_predictions",
]  # fmt: skip

PREDICTIONS_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("sha256", pa.string()),
        ("bytes", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("top1_label", pa.string()),
        ("top1_index", pa.int32()),
        ("top1_prob", pa.float32()),
        ("top5_labels", pa.list_(pa.string())),
        ("top5_indices", pa.list_(pa.int32())),
        ("top5_probs", pa.list_(pa.float32())),
        ("model_uri", pa.string()),
        ("model_version", pa.string()),
        ("scored_at", pa.timestamp("us", tz="UTC")),
        ("engine", pa.string()),
        ("precision", pa.string()),
    ]
)
# Rows written before the engine columns existed were scored by PyTorch.
DEFAULT_ENGINE = "torch"
ENGINE_COLUMNS = ("engine", "precision")
META_CLASS_NAMES = "visionflow.class_names"
META_SCORING = "visionflow.scoring"
PART_GLOB = "part-*.parquet"
WORK_DIR = ".visionflow"


@dataclass(frozen=True)
class OutputLayout:
    """Where one scoring job writes: ``parts_dir`` holds the part files (the output itself for a
    dataset, a hidden staging folder beside a single file) and ``work_dir`` the job's shard lists
    and progress records."""

    target: Path
    single_file: bool
    parts_dir: Path

    @property
    def work_dir(self) -> Path:
        return self.parts_dir / WORK_DIR

    def sources(self) -> list[Path]:
        """Files already holding rows: the part files, and a finished single file."""
        parts = sorted(self.parts_dir.glob(PART_GLOB)) if self.parts_dir.is_dir() else []
        if self.single_file and self.target.is_file():
            parts.append(self.target)
        return parts


def output_layout(out: str | os.PathLike[str]) -> OutputLayout:
    """``OUT.parquet`` (not an existing folder) -> one file; anything else -> a dataset folder."""
    target = Path(out).expanduser().absolute()
    if target.suffix.lower() == ".parquet" and not target.is_dir():
        return OutputLayout(target, True, target.parent / f".{target.name}.parts")
    return OutputLayout(target, False, target)



# --------------------------------------------------------------------------- Parquet parts


def parquet_metadata(class_names: Sequence[str], config: Mapping) -> dict[str, str]:
    """The key-value metadata of every predictions file: the class list and the scoring configuration."""
    return {META_CLASS_NAMES: json.dumps(list(class_names)), META_SCORING: json.dumps(dict(config), default=str)}


def write_predictions(df: pd.DataFrame, out: str | os.PathLike[str], *, class_names: list[str], config: dict) -> Path:
    """One Parquet file, written atomically."""
    rest = pa.schema([f for f in PREDICTIONS_SCHEMA if f.name != "scored_at"])
    df = df.assign(**{c: df[c] if c in df else None for c in ENGINE_COLUMNS})
    table = pa.Table.from_pandas(df.drop(columns=["scored_at"]), schema=rest, preserve_index=False)
    scored_at = pa.array(list(df["scored_at"]), type=PREDICTIONS_SCHEMA.field("scored_at").type)
    table = table.append_column(PREDICTIONS_SCHEMA.field("scored_at"), scored_at).select(PREDICTIONS_SCHEMA.names)
    return write_table_atomic(table, out, metadata=parquet_metadata(class_names, config))


class PartWriter:
    """Rows in, part files out, from a writer thread behind a bounded queue (so Parquet encoding
    and fsync overlap the model, and a slow disk slows the producer instead of filling memory).

    Parts are named ``{stem}-{seq:05d}.parquet``; each is complete or absent.
    """

    def __init__(
        self, parts_dir: Path, stem: str, metadata: Mapping[str, str], *, max_rows: int, max_seconds: float,
        queue_size: int = 2,
    ) -> None:  # fmt: skip
        self.parts_dir, self.stem, self.metadata = Path(parts_dir), stem, dict(metadata)
        self.max_rows, self.max_seconds = max(1, max_rows), max_seconds
        self.written: list[str] = []
        self._rows: list[dict] = []
        self._first_row_at: float | None = None
        self._seq = 0
        self._error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._run, name="visionflow-parquet-writer", daemon=True)
        self._thread.start()

    def add(self, rows: Iterable[dict]) -> None:
        for row in rows:
            if self._first_row_at is None:
                self._first_row_at = time.monotonic()
            self._rows.append(row)
            if len(self._rows) >= self.max_rows:
                self.flush()
        if self._rows and time.monotonic() - (self._first_row_at or 0) >= self.max_seconds:
            self.flush()

    def flush(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"writing predictions failed: {self._error}") from self._error
        if not self._rows:
            return
        name = f"{self.stem}-{self._seq:05d}.parquet"
        self._seq += 1
        self._queue.put((name, self._rows))
        self._rows, self._first_row_at = [], None

    def close(self) -> list[str]:
        try:
            self.flush()
        finally:
            self._queue.put(None)
            self._thread.join()
        if self._error is not None:
            raise RuntimeError(f"writing predictions failed: {self._error}") from self._error
        return self.written

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            if self._error is not None:
                continue  # keep draining so the producer never blocks on a dead writer
            name, rows = job
            try:
                table = pa.Table.from_pylist(rows, schema=PREDICTIONS_SCHEMA)
                write_table_atomic(table, self.parts_dir / name, metadata=self.metadata)
                self.written.append(name)
            except BaseException as exc:  # noqa: BLE001 - handed to the producer
                self._error = exc


# --------------------------------------------------------------------------- finishing


def read_part(src: str | os.PathLike[str], columns: Sequence[str]) -> pa.Table:
    """``columns`` of one predictions file; the engine columns of a file written before they
    existed come back as the engine that wrote it (torch) and an unknown precision."""
    present = set(pq.read_schema(src).names)
    table = pq.read_table(src, columns=[c for c in columns if c in present])
    for name in columns:
        if name not in present:
            fill = DEFAULT_ENGINE if name == "engine" else None
            table = table.append_column(PREDICTIONS_SCHEMA.field(name), pa.array([fill] * table.num_rows, pa.string()))
    return table.select(list(columns))


def _read_parts(sources: Iterable[Path], columns: Sequence[str] | None = None) -> pa.Table | None:
    names = list(columns or PREDICTIONS_SCHEMA.names)
    schema = pa.schema([PREDICTIONS_SCHEMA.field(n) for n in names])
    tables = []
    for src in sources:
        tables.append(read_part(src, names).cast(schema))
    return pa.concat_tables(tables) if tables else None


def _of_run(df: pd.DataFrame, model_version: str, engine: str | None) -> pd.Series:
    """Rows of ``model_version`` (scored by ``engine``, when given)."""
    keep = df["model_version"] == model_version
    if engine is not None and "engine" in df:
        keep &= df["engine"].fillna(DEFAULT_ENGINE) == engine
    return keep


def _newest_per_path(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (path, model_version, engine): the newest (a file whose content changed since
    it was scored has an older, superseded row)."""
    keys = ["path", "model_version"] + (["engine"] if "engine" in df else [])
    return df.sort_values("scored_at", kind="stable").drop_duplicates(keys, keep="last")


def compact_parts(parts_dir: str | os.PathLike[str], model_version: str, engine: str | None = None) -> int:
    """Drop superseded rows of ``model_version`` (an older row for a path scored again by the
    same engine), by rewriting the affected parts atomically; returns how many rows were dropped."""
    parts = sorted(Path(parts_dir).glob(PART_GLOB))
    frames = []
    for part in parts:
        t = read_part(part, ["path", "model_version", "scored_at", "engine"])
        df = t.to_pandas()
        df["_part"], df["_row"] = str(part), range(len(df))
        frames.append(df[_of_run(df, model_version, engine)])
    if not frames:
        return 0
    rows = pd.concat(frames, ignore_index=True)
    keep = _newest_per_path(rows)
    losers = rows.drop(index=keep.index)
    for part, group in losers.groupby("_part"):
        table = pq.read_table(part)
        drop = set(group["_row"])
        kept = table.filter(pa.array([i not in drop for i in range(table.num_rows)]))
        if kept.num_rows:
            write_table_atomic(kept, part)  # the schema keeps its key-value metadata
        else:
            Path(part).unlink()
    return len(losers)


def finalize_single_file(
    layout: OutputLayout, model_version: str, paths: Sequence[str], *, class_names: Sequence[str], config: Mapping,
    engine: str | None = None,
) -> pd.DataFrame:
    """Write the single output file from the staged parts (and the rows of a previous finished
    file for the same model version), one row per path in ``paths``, sorted by path; then remove
    the staging folder. Rows of other model versions or other paths are not carried over: the
    file holds this job's predictions."""
    table = _read_parts(layout.sources())
    df = table.to_pandas() if table is not None else pd.DataFrame(columns=PREDICTIONS_SCHEMA.names)
    wanted = set(paths)
    df = df[_of_run(df, model_version, engine).to_numpy() & isin(df["path"], wanted)]
    df = _newest_per_path(df).sort_values("path", kind="stable").reset_index(drop=True)
    missing = wanted - set(df["path"])
    if missing:  # never write a silently short file
        raise RuntimeError(f"{len(missing)} files have no row, e.g. {sorted(missing)[:3]}; rerun to resume")
    write_predictions(df, layout.target, class_names=list(class_names), config=dict(config))
    shutil.rmtree(layout.parts_dir, ignore_errors=True)
    return df


def finalize_dataset(
    layout: OutputLayout, model_version: str, paths: Sequence[str], engine: str | None = None
) -> tuple[pd.DataFrame, int]:
    """Compact the dataset (:func:`compact_parts`) and check that every path in ``paths`` has
    exactly one row of ``model_version`` (and ``engine``). Returns those rows (``path``,
    ``status``) and how many superseded rows were dropped."""
    dropped = compact_parts(layout.parts_dir, model_version, engine)
    df = read_predictions(layout.target, model_version, columns=["path", "status", "model_version"], engine=engine)
    df = df[isin(df["path"], set(paths))]
    if df["path"].duplicated().any() or len(df) != len(paths):
        raise RuntimeError(f"{layout.target}: {len(df)} rows for {len(paths)} files of version {model_version}; rerun to resume")
    return df, dropped


def recorded_scoring(layout: OutputLayout, model_version: str, engine: str | None = None) -> tuple[list[str], dict] | None:
    """(class list, scoring configuration) as the parts of ``model_version`` (and ``engine``)
    recorded them (with the device and precision they ran with), or None when no such part exists."""
    for source in layout.sources():
        meta = read_metadata(source)
        scoring = json.loads(meta.get(META_SCORING, "{}"))
        same_engine = engine is None or scoring.get("engine_used", DEFAULT_ENGINE) == engine
        if META_CLASS_NAMES in meta and scoring.get("model_version") == model_version and same_engine:
            return json.loads(meta[META_CLASS_NAMES]), scoring
    return None


def read_predictions(
    out: str | os.PathLike[str], model_version: str | None = None, *, columns: Sequence[str] | None = None,
    engine: str | None = None,
) -> pd.DataFrame:
    """All rows of a predictions file or dataset (hidden and temporary files ignored), optionally
    of one model version (and one engine) and only some ``columns``, sorted by path."""
    out = Path(out)
    sources = [out] if out.is_file() else sorted(out.glob(PART_GLOB))
    names = list(columns or PREDICTIONS_SCHEMA.names)
    for needed in ("path", "model_version") + (("engine",) if engine is not None else ()):
        if needed not in names:
            names.append(needed)
    table = _read_parts(sources, names)
    df = table.to_pandas() if table is not None else pd.DataFrame(columns=names)
    if model_version is not None:
        df = df[_of_run(df, model_version, engine)]
    return df.sort_values(["path", "model_version"], kind="stable").reset_index(drop=True)

