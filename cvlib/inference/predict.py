"""Scoring: top-k predictions for every file, one row per file, readable or not.

The pipeline, for one list of files (a *shard*), configured by one :class:`ScoreConfig`:

* **decode** (:mod:`cvlib.inference.decoding`) in DataLoader worker processes (or threads, where
  the process may not fork: a daemonic Dask worker): read the bytes, hash them, skip files
  already scored (:mod:`cvlib.inference.resume`), decode, resize, crop, normalise, and stack a
  batch in the worker. On CUDA, plain JPEGs travel undecoded and nvJPEG decodes the whole batch
  on the GPU (``gpu_decode``).
* **compute** in the calling thread, in the inference loop (:mod:`cvlib.inference.loop`):
  batched, channels_last, BatchNorm folded into the convolutions (``fuse``), autocast in bf16 on
  CPUs with native bf16 and bf16/fp16 on CUDA (:func:`cvlib.models.precision.inference_dtype`),
  optionally ``torch.compile``-d.
* **write** (:mod:`cvlib.inference.output`) in a writer thread behind a bounded queue: rows
  become Parquet *part files*, each renamed into place when complete, with the class list and the
  scoring configuration in the key-value metadata.

:func:`score_to_parts` is the streaming, resumable entry point (a shard of a ``score`` flow);
:func:`score_folder` returns a frame; :func:`predict_sources` answers in-memory requests (paths
or bytes) for the served model.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from cvlib.data.imageio import ImageReadError, load_rgb
from cvlib.data.transforms import eval_preset_from
from cvlib.inference.decoding import DecodedBatch, FileItem, batch_images, decoded_batches, scoring_dataset
from cvlib.inference.engines import BatchEngine
from cvlib.inference.inputs import list_input_files
from cvlib.inference.loop import infer_batches
from cvlib.inference.options import ScoreConfig
from cvlib.inference.output import PART_GLOB, PREDICTIONS_SCHEMA, PartWriter, parquet_metadata
from cvlib.inference.resume import read_done
from cvlib.models.factory import pick_device
from cvlib.models.precision import inference_dtype

__all__ = ["ScoringStats", "predict_sources", "score_folder", "score_to_parts"]


@dataclass
class ScoringStats:
    files: int = 0  # files in this shard
    scored: int = 0  # rows written with a prediction
    errors: int = 0  # rows written with an error
    skipped: int = 0  # already in the output (resumed)
    seconds: float = 0.0
    parts: list[str] = field(default_factory=list)
    device: str = ""
    precision: str = ""
    engine: str = "torch"
    stopped: bool = False  # ``stop()`` said so before the last file: the rest is left for a rerun

    @property
    def processed(self) -> int:
        return self.scored + self.errors

    @property
    def images_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def count(self, rows: Sequence[dict], skipped: int) -> None:
        ok = sum(r["status"] == "ok" for r in rows)
        self.scored += ok
        self.errors += len(rows) - ok
        self.skipped += skipped


# --------------------------------------------------------------------------- rows


def _topk(logits: torch.Tensor, k: int) -> tuple[list[list[float]], list[list[int]]]:
    probs = torch.softmax(logits.float(), dim=1)
    p, idx = probs.topk(k, dim=1)
    return p.cpu().tolist(), idx.cpu().tolist()


@dataclass
class _RowContext:
    """What every row of one scoring call shares."""

    files: list[str]
    class_names: list[str]
    k: int
    model_uri: str
    model_version: str
    engine: str = "torch"
    precision: str = ""


def _row(it: FileItem, ctx: _RowContext, now: datetime, p: list[float] | None, idx: list[int] | None) -> dict:
    row = {
        "path": ctx.files[it.index],
        "sha256": it.sha256,
        "bytes": it.nbytes,
        "width": it.width,
        "height": it.height,
        "status": it.status,
        "error": it.error,
        "top1_label": None,
        "top1_index": None,
        "top1_prob": None,
        "top5_labels": None,
        "top5_indices": None,
        "top5_probs": None,
        "model_uri": ctx.model_uri,
        "model_version": ctx.model_version,
        "scored_at": now,
        "engine": ctx.engine,
        "precision": ctx.precision,
    }
    if p is not None:
        labels = [ctx.class_names[c] for c in idx]
        row.update(
            top1_label=labels[0], top1_index=int(idx[0]), top1_prob=float(p[0]),
            top5_labels=labels, top5_indices=[int(c) for c in idx], top5_probs=[float(x) for x in p],
        )  # fmt: skip
    return row


def _batch_rows(batch: DecodedBatch, order: list[int], logits: torch.Tensor | None, ctx: _RowContext) -> list[dict]:
    """One row per item not skipped; the logits' rows belong to the items at ``order``."""
    predictions: dict[int, tuple[list[float], list[int]]] = {}
    if logits is not None:
        p, idx = _topk(logits, ctx.k)
        predictions = {j: (p[r], idx[r]) for r, j in enumerate(order)}
    now = datetime.now(timezone.utc)
    return [_row(it, ctx, now, *predictions.get(j, (None, None))) for j, it in enumerate(batch.items) if not it.skip]


# --------------------------------------------------------------------------- the scoring loop


def _engine_of(model, dev: torch.device, precision: str) -> tuple[str, str]:
    """(engine, precision) the rows record: an engine says its own; a module is PyTorch."""
    if isinstance(model, nn.Module):
        return "torch", _precision_name(inference_dtype(precision, dev))
    return model.engine, model.precision


def _precision_name(dtype: torch.dtype | None) -> str:
    return "fp32" if dtype is None else str(dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float16", "fp16")


def _scored_batches(
    model: nn.Module | BatchEngine,
    meta: dict,
    root: Path,
    files: list[str],
    config: ScoreConfig,
    *,
    model_uri: str,
    model_version: str,
    done: Mapping[str, str | None] | None = None,
) -> Iterator[tuple[list[dict], int]]:
    """Yield (rows, skipped) per batch, in input order: one row for every file not skipped."""
    is_module = isinstance(model, nn.Module)
    dev = pick_device(config.device) if is_module else torch.device("cpu")  # an engine runs where it was compiled
    class_names = list(meta["class_names"])
    engine, precision = _engine_of(model, dev, config.precision)
    ctx = _RowContext(files, class_names, min(config.top_k, len(class_names)), model_uri, model_version, engine, precision)
    preset = eval_preset_from(meta["preprocessing"])
    ds = scoring_dataset(root, files, meta["preprocessing"], config, dev, done)

    def model_inputs() -> Iterator[tuple[tuple[DecodedBatch, list[int]], torch.Tensor | None]]:
        for batch in decoded_batches(ds, config, pin_memory=dev.type == "cuda"):
            order, images = batch_images(batch, preset, dev, lambda i: files[i])
            yield (batch, order), images

    # In place, like Module.to: the model stays there for the next shard this process scores.
    if is_module:
        model.to(dev, memory_format=torch.channels_last)
    results = infer_batches(
        model, model_inputs(), dev, amp_dtype=inference_dtype(config.precision, dev), fuse=config.fuse,
        compile=config.compile, batch_size=config.batch_size,
    )  # fmt: skip
    with closing(results):
        for (batch, order), logits in results:
            yield _batch_rows(batch, order, logits, ctx), batch.skipped


def score_folder(
    model: nn.Module | BatchEngine,
    meta: dict,
    root: str | os.PathLike[str],
    *,
    files: Sequence[str] | None = None,
    model_uri: str = "",
    model_version: str = "",
    config: ScoreConfig | None = None,
) -> pd.DataFrame:
    """Score every file (default: every image under ``root``); the frame has exactly one row per
    file, in input order. For large jobs use :func:`score_to_parts`, which streams to Parquet and
    resumes."""
    root = Path(root)
    files = list_input_files(root) if files is None else list(files)
    rows: list[dict] = []
    batches = _scored_batches(model, meta, root, files, config or ScoreConfig(), model_uri=model_uri, model_version=model_version)
    with closing(batches):
        for batch_rows, _ in batches:
            rows += batch_rows
    if [r["path"] for r in rows] != files:  # cannot happen unless the loader lost items
        raise RuntimeError(f"{len(files) - len(rows)} files were not scored")
    return pd.DataFrame(rows, columns=PREDICTIONS_SCHEMA.names)


def score_to_parts(
    model: nn.Module | BatchEngine,
    meta: dict,
    root: str | os.PathLike[str],
    files: Sequence[str],
    parts_dir: str | os.PathLike[str],
    *,
    model_uri: str = "",
    model_version: str = "",
    config: ScoreConfig | None = None,
    job: Mapping | None = None,
    shard: int = 0,
    sources: Iterable[str | os.PathLike[str]] | None = None,
    progress: Callable[[int, int], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> ScoringStats:
    """Score ``files`` (relative to ``root``) into part files in ``parts_dir``, skipping those
    already written there (or in ``sources``) for ``model_version`` by the same engine (``model``
    is a module, PyTorch, or a :class:`~cvlib.inference.engines.BatchEngine`).

    ``job``: facts about the job (input spec, root, weights) that the parts' metadata records
    beside the configuration. ``progress(done, total)`` is called after every batch, skipped
    files counted as done. Parts are named ``part-{shard:05d}-{token}-{seq:05d}.parquet`` with a
    fresh token per call, so retries and concurrent shards never overwrite each other's parts.
    ``stop()``, asked after every batch, ends the shard early (rows so far are written; the stats
    say ``stopped``): a worker whose job was abandoned (its client died) must not race the rerun.
    """
    config = config or ScoreConfig()
    parts_dir = Path(parts_dir)
    parts_dir.mkdir(parents=True, exist_ok=True)
    files = list(files)
    stats = ScoringStats(files=len(files))
    t0 = time.perf_counter()
    dev = pick_device(config.device) if isinstance(model, nn.Module) else torch.device("cpu")
    engine, stats.precision = _engine_of(model, dev, config.precision)
    stats.device, stats.engine = str(dev), engine
    done = read_done(sorted(parts_dir.glob(PART_GLOB)) if sources is None else list(sources), model_version, files, engine)
    record = config.model_dump(mode="json") | dict(job or {}) | {
        "device": stats.device, "precision": stats.precision, "preprocessing": meta.get("preprocessing"),
        "model_uri": model_uri, "model_version": model_version, "engine_used": engine,
    }  # fmt: skip
    writer = PartWriter(
        parts_dir, f"part-{shard:05d}-{uuid.uuid4().hex[:8]}", parquet_metadata(meta["class_names"], record),
        max_rows=config.part_size, max_seconds=config.part_seconds,
    )  # fmt: skip
    if progress:
        progress(0, len(files))
    batches = _scored_batches(model, meta, Path(root), files, config, model_uri=model_uri, model_version=model_version, done=done)
    try:
        with closing(batches):
            for rows, skipped in batches:
                writer.add(rows)
                stats.count(rows, skipped)
                if progress:
                    progress(stats.processed + stats.skipped, len(files))
                if stop is not None and stop():
                    stats.stopped = True
                    break
    finally:
        stats.parts = writer.close()
    stats.seconds = time.perf_counter() - t0
    return stats


# --------------------------------------------------------------------------- in-memory requests


def _model_device(model: nn.Module | BatchEngine) -> torch.device:
    if not isinstance(model, nn.Module):
        return torch.device("cpu")
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def predict_sources(
    model: nn.Module | BatchEngine, meta: dict, sources: Sequence[str | bytes], *, top_k: int = 5, batch_size: int = 32
) -> pd.DataFrame:
    """Top-k for in-memory requests (paths or bytes), one row per source, in fp32 on the model's
    device; bad inputs get an ``error`` and no prediction. Used by the pyfunc model behind
    ``mlflow models serve``."""
    class_names = list(meta["class_names"])
    k = min(top_k, len(class_names))
    preset = eval_preset_from(meta["preprocessing"])
    draft = (int(meta["preprocessing"]["resize_size"]),) * 2
    rows: list[dict] = []
    tensors: list[tuple[int, torch.Tensor]] = []
    for i, src in enumerate(sources):
        rows.append({"status": "ok", "error": None, "top1_label": None, "top1_prob": None, "top5_labels": None, "top5_probs": None})
        try:
            tensors.append((i, preset(load_rgb(src, draft_size=draft))))
        except ImageReadError as exc:
            rows[i].update(status=exc.reason, error=str(exc))
    chunks = [tensors[s : s + batch_size] for s in range(0, len(tensors), batch_size)]
    pairs = (([i for i, _ in chunk], torch.stack([t for _, t in chunk])) for chunk in chunks)
    with closing(infer_batches(model, pairs, _model_device(model))) as results:
        for positions, logits in results:
            p, idx = _topk(logits, k)
            for i, pi, ii in zip(positions, p, idx, strict=True):
                labels = [class_names[c] for c in ii]
                rows[i].update(top1_label=labels[0], top1_prob=pi[0], top5_labels=labels, top5_probs=pi)
    return pd.DataFrame(rows)
