"""Batch scoring: top-k predictions for every file, one row per file, readable or not.

The pipeline, for one list of files (a *shard*):

* **decode** in DataLoader worker processes (or threads, where the process may not fork: a
  daemonic Dask worker): read the bytes, hash them, skip files already scored, decode (JPEGs in
  libjpeg's draft mode: the smallest power-of-two reduction still at least the resize size),
  resize, crop, normalise, and stack a batch in the worker. On CUDA, plain JPEGs travel
  undecoded and nvJPEG decodes the whole batch on the GPU (``gpu_decode``).
* **compute** in the calling thread: batched, channels_last, BatchNorm folded into the
  convolutions, autocast in bf16 on CPUs with native bf16 and bf16/fp16 on CUDA
  (:func:`cvlib.models.precision.inference_dtype`), optionally ``torch.compile``-d.
* **write** in a writer thread behind a bounded queue: rows become Parquet *part files*, each
  written under a temporary name and renamed into place when complete (:mod:`cvlib.files.atomic`),
  with the explicit :data:`PREDICTIONS_SCHEMA` and the class list and scoring configuration in
  the key-value metadata.

Resuming: a file is skipped when a part already holds a row for the same path, the same content
(``sha256``) and the same ``model_version`` (a file that could not even be read is matched by path).
So a killed run, rerun, ends with exactly the rows of one clean run; a file whose content changed
is scored again and :func:`compact_parts` drops the superseded row.

Output layout (:func:`output_layout`): ``OUT`` ending in ``.parquet`` (and not an existing folder)
is a single file, written atomically at the end from parts staged in a hidden folder beside it
(``.OUT.parts``); anything else is a Parquet dataset folder of ``part-*.parquet`` files that
``pandas.read_parquet(OUT)`` reads whole. Hidden names (``.``) are ignored by Parquet readers:
temporary part files and the ``.visionflow`` work folder never show up as data.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import queue
import shutil
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cvlib.data.imageio import DEFAULT_MAX_PIXELS, JPEG_FORMATS, ImageReadError, load_rgb
from cvlib.data.transforms import eval_preset_from
from cvlib.files.parquet import write_table_atomic
from cvlib.inference.inputs import list_input_files
from cvlib.models.factory import pick_device

__all__ = [
    "PREDICTIONS_SCHEMA", "ModelRunner", "fuse_for_inference", "OutputLayout", "ScoringOptions", "ScoringStats", "ScoringDataset", "compact_parts",
    "finalize_single_file", "list_input_files", "output_layout", "predict_sources", "prepare_model", "read_done",
    "read_predictions", "score_folder", "score_to_parts", "write_predictions",
]  # fmt: skip

log = logging.getLogger(__name__)

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
    ]
)
META_CLASS_NAMES = "visionflow.class_names"
META_SCORING = "visionflow.scoring"
PART_GLOB = "part-*.parquet"
WORK_DIR = ".visionflow"
_EXIF_ORIENTATION = 0x0112
_NOT_DONE = object()
GPU_DECODE_MIN_PIXELS = 512 * 512  # smaller JPEGs decode faster in draft mode on the CPU workers
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> compiled, once per process
_FUSED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (weights fingerprint, fused copy)


# --------------------------------------------------------------------------- options and layout


@dataclass
class ScoringOptions:
    """How to score (not what): batching, devices, precision, output granularity."""

    batch_size: int = 64
    top_k: int = 5
    num_workers: int = 2  # decoding workers (processes, or threads where forking is not allowed)
    device: str = "auto"
    precision: str = "auto"  # see cvlib.models.precision.inference_dtype
    compile: bool = False  # torch.compile the model (batches padded to batch_size: one graph)
    gpu_decode: str = "auto"  # JPEGs decoded on the device (nvJPEG on CUDA): auto (with CUDA), on, off
    loader: str = "auto"  # auto (processes unless this process is daemonic), processes, threads
    fuse: bool = True  # fold BatchNorm into the preceding convolutions (same function, faster)
    part_size: int = 4096  # rows per part file
    part_seconds: float = 300.0  # ...or a part at least this often, so a kill loses little work


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

    @property
    def processed(self) -> int:
        return self.scored + self.errors

    @property
    def images_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return asdict(self) | {"images_per_s": self.images_per_s}


# --------------------------------------------------------------------------- reading and decoding


@dataclass
class _Item:
    index: int
    tensor: torch.Tensor | None = None
    raw: torch.Tensor | None = None  # undecoded JPEG bytes, for decoding on the GPU
    orientation: int = 1
    sha256: str | None = None
    nbytes: int = 0
    width: int | None = None
    height: int | None = None
    status: str = "ok"
    error: str | None = None
    skip: bool = False


@dataclass
class _Batch:
    items: list[_Item]
    cpu: torch.Tensor | None  # the CPU-decoded images of ``items``, stacked, in item order
    cpu_pos: list[int]  # item positions of the rows of ``cpu``
    raw_pos: list[int]  # item positions of undecoded JPEGs

    def pin_memory(self) -> _Batch:  # DataLoader(pin_memory=True) calls this
        if self.cpu is not None:
            self.cpu = self.cpu.pin_memory()
        return self


def _jpeg_orientation(im: Image.Image) -> int:
    """EXIF orientation of an opened JPEG (its EXIF is in the header: nothing is decoded)."""
    try:
        value = int(im.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - broken EXIF means no orientation, as in cvlib.data.imageio
        return 1
    return value if 1 <= value <= 8 else 1


def _upright(w: int, h: int, orientation: int) -> tuple[int, int]:
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _stored_size(data: bytes, decoded: tuple[int, int]) -> tuple[int, int]:
    """The upright size of a JPEG as stored, not as decoded in draft mode."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format in JPEG_FORMATS:
                return _upright(*im.size, _jpeg_orientation(im))
    except Exception:  # noqa: BLE001 - it decoded a moment ago; keep the decoded size
        pass
    return decoded


def _gpu_jpeg(data: bytes, min_pixels: int = 0) -> tuple[int, int, int] | None:
    """(upright width, upright height, orientation) when nvJPEG can decode this file as well as
    Pillow would: a complete (EOI-terminated) RGB or greyscale JPEG within the pixel limit, and
    of at least ``min_pixels`` (below that, Pillow's draft decode in a worker is cheaper than a
    trip through the GPU decoder). Anything else takes the CPU path, which also diagnoses
    damaged files."""
    if not data.startswith(b"\xff\xd8\xff") or data.rstrip(b"\x00")[-2:] != b"\xff\xd9":
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if im.format not in JPEG_FORMATS or im.mode not in ("RGB", "L") or not min_pixels <= w * h <= DEFAULT_MAX_PIXELS:
                return None
            orientation = _jpeg_orientation(im)
    except Exception:  # noqa: BLE001 - the CPU path will say what is wrong
        return None
    return (*_upright(w, h, orientation), orientation)


class ScoringDataset(Dataset):
    """Reads, hashes and preprocesses in DataLoader workers; failures travel as items, so a bad
    file becomes an error row instead of stopping the run or shifting rows.

    ``done`` maps a path to the sha256 already scored for it (None: the file could not be read
    then); such files come back as ``skip`` items without being decoded.
    """

    def __init__(
        self,
        root: Path,
        files: Sequence[str],
        transform,
        draft_size: int,
        *,
        done: Mapping[str, str | None] | None = None,
        gpu_jpeg: bool = False,
        gpu_min_pixels: int = 0,
    ) -> None:
        self.root, self.files, self.transform = Path(root), list(files), transform
        self.draft = (draft_size, draft_size)
        self.done = dict(done or {})
        self.gpu_jpeg, self.gpu_min_pixels = gpu_jpeg, gpu_min_pixels
        self._root_is_dir = self.root.is_dir()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> _Item:
        rel = self.files[i]
        full = self.root / rel if self._root_is_dir else self.root
        previous = self.done.get(rel, _NOT_DONE)
        try:
            data = full.read_bytes()
        except OSError as exc:
            if previous is None:
                return _Item(i, skip=True)
            if isinstance(exc, FileNotFoundError):
                return _Item(i, status="missing", error=f"{rel}: file does not exist")
            return _Item(i, status="unreadable", error=f"{rel}: {exc.strerror or exc}")
        digest = hashlib.sha256(data).hexdigest()
        if previous == digest:
            return _Item(i, sha256=digest, nbytes=len(data), skip=True)
        item = _Item(i, sha256=digest, nbytes=len(data))
        if self.gpu_jpeg and (found := _gpu_jpeg(data, self.gpu_min_pixels)) is not None:
            item.width, item.height, item.orientation = found
            item.raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            return item
        try:
            img = load_rgb(data, draft_size=self.draft)
            item.width, item.height = img.size
            if data.startswith(b"\xff\xd8\xff"):  # maybe decoded in draft mode: report the stored size
                item.width, item.height = _stored_size(data, img.size)
            item.tensor = self.transform(img)
        except ImageReadError as exc:
            item.status, item.error = exc.reason, f"{rel}: {exc.message}"
        return item


def _collate(items: list[_Item]) -> _Batch:
    """Runs in the worker: one stacked tensor per batch crosses the process boundary."""
    cpu_pos = [j for j, it in enumerate(items) if it.tensor is not None]
    cpu = torch.stack([items[j].tensor for j in cpu_pos]) if cpu_pos else None
    for j in cpu_pos:
        items[j].tensor = None
    return _Batch(items, cpu, cpu_pos, [j for j, it in enumerate(items) if it.raw is not None])


def _may_fork() -> bool:
    """Daemonic processes (Dask's default workers) may not start DataLoader worker processes."""
    return not multiprocessing.current_process().daemon


def _loader_kind(options: ScoringOptions) -> str:
    if options.num_workers <= 0:
        return "inline"
    if options.loader == "auto":
        return "processes" if _may_fork() else "threads"
    if options.loader not in ("processes", "threads"):
        raise ValueError(f"loader must be auto, processes or threads, not {options.loader!r}")
    return options.loader


def _batches(ds: ScoringDataset, options: ScoringOptions, pin_memory: bool) -> Iterator[_Batch]:
    """Collated batches in input order, decoded ahead of the consumer."""
    n, bs = len(ds), options.batch_size
    chunks = [range(s, min(s + bs, n)) for s in range(0, n, bs)]
    kind = _loader_kind(options)
    if kind == "processes":
        loader = DataLoader(
            ds, batch_size=bs, num_workers=options.num_workers, collate_fn=_collate, pin_memory=pin_memory,
            prefetch_factor=2,
        )  # fmt: skip
        yield from loader
        return
    if kind == "inline":
        for chunk in chunks:
            yield _collate([ds[i] for i in chunk])
        return
    # Threads: Pillow and torch release the GIL while decoding and resizing.
    with ThreadPoolExecutor(options.num_workers, thread_name_prefix="visionflow-decode") as pool:
        pending = []
        ahead = 2 * options.num_workers
        for chunk in chunks:
            pending.append(pool.submit(lambda c=chunk: _collate([ds[i] for i in c])))
            if len(pending) > ahead:
                yield pending.pop(0).result()
        for fut in pending:
            yield fut.result()


# --------------------------------------------------------------------------- GPU JPEG decoding

# EXIF orientation -> the same transposes as cvlib.data.imageio (PIL), on (..., H, W) tensors.
_ORIENT = {
    2: lambda x: x.flip(-1),
    3: lambda x: x.flip(-1, -2),
    4: lambda x: x.flip(-2),
    5: lambda x: x.transpose(-1, -2),
    6: lambda x: torch.rot90(x, -1, (-2, -1)),
    7: lambda x: x.transpose(-1, -2).flip(-1, -2),
    8: lambda x: torch.rot90(x, 1, (-2, -1)),
}


def orient_tensor(x: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation to a (C, H, W) image tensor, as Pillow would."""
    fn = _ORIENT.get(orientation)
    return x if fn is None else fn(x)


def _decode_on_device(batch: _Batch, preset, dev: torch.device, rel: Callable[[int], str]) -> dict[int, torch.Tensor]:
    """Decode the batch's undecoded JPEGs with nvJPEG and preprocess them on the device; a file
    nvJPEG refuses is decoded by Pillow instead, and one neither can read becomes an error item."""
    from torchvision.io import ImageReadMode, decode_jpeg

    positions = batch.raw_pos
    out: dict[int, torch.Tensor] = {}
    try:
        images = decode_jpeg([batch.items[j].raw for j in positions], mode=ImageReadMode.RGB, device=dev)
    except RuntimeError:  # one bad stream fails the whole call: retry one by one
        images = []
        for j in positions:
            try:
                images.append(decode_jpeg(batch.items[j].raw, mode=ImageReadMode.RGB, device=dev))
            except RuntimeError:
                images.append(None)
    for j, img in zip(positions, images, strict=True):
        it = batch.items[j]
        if img is None:
            try:
                pil = load_rgb(it.raw.numpy().tobytes())
                out[j] = preset(pil).to(dev)
            except ImageReadError as exc:
                it.status, it.error = exc.reason, f"{rel(it.index)}: {exc.message}"
        else:
            out[j] = preset.transforms(orient_tensor(img, it.orientation))
        it.raw = None
    return out


# --------------------------------------------------------------------------- the model


def prepare_model(model: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """Eval mode, channels_last weights, on ``device`` (in place, like ``Module.to``)."""
    return model.to(torch.device(device), memory_format=torch.channels_last).eval()


def _fingerprint(model: nn.Module) -> tuple:
    """Changes when a parameter or buffer is replaced or modified in place (an optimizer step)."""
    return tuple((id(t), t._version) for t in (*model.parameters(), *model.buffers()))


def fuse_for_inference(model: nn.Module) -> nn.Module:
    """A copy of an eval-mode model with every BatchNorm that follows a convolution folded into
    it (``torch.fx``): the same function, one pass over the activations fewer (about 10% on a
    CPU for ResNet-50). Models torch.fx cannot trace are returned unchanged. Cached per model
    until its weights change."""
    key = _fingerprint(model)
    cached = _FUSED.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    fused = model
    if not model.training and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        try:
            from torch.fx.experimental.optimization import fuse

            fused = fuse(model).to(memory_format=torch.channels_last)
        except Exception as exc:  # noqa: BLE001 - tracing fails in many ways; fusing is optional
            log.debug("conv-bn fusion skipped for %s: %s", type(model).__name__, exc)
            fused = model
    _FUSED[model] = (key, fused)
    return fused


class ModelRunner:
    """The model as scoring runs it: channels_last, BatchNorm folded into the convolutions
    (``fuse``), under autocast in ``amp_dtype``; with ``compile``, ``torch.compile``-d and fed
    full batches only (one graph: the last, short batch is padded instead of recompiling),
    falling back to eager mode if compilation fails. Call it under ``torch.inference_mode()``."""

    def __init__(
        self, model: nn.Module, dev: torch.device, amp_dtype, *, compile: bool = False, batch_size: int = 64, fuse: bool = True
    ) -> None:
        self.eager = prepare_model(model, dev)
        if fuse:
            self.eager = fuse_for_inference(self.eager)
        self.fn = self.eager
        if compile:
            if self.eager not in _COMPILED:
                _COMPILED[self.eager] = torch.compile(self.eager, dynamic=False)
            self.fn = _COMPILED[self.eager]
        self.pad_to = batch_size if compile else 0
        self.dev, self.amp_dtype = dev, amp_dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from cvlib.models.precision import autocast

        n = x.shape[0]
        if self.pad_to and n < self.pad_to:
            pad = x.new_zeros((self.pad_to - n, *x.shape[1:]))
            x = torch.cat([x, pad]).contiguous(memory_format=torch.channels_last)
        with autocast(self.dev, self.amp_dtype):
            try:
                out = self.fn(x)
            except Exception as exc:  # noqa: BLE001 - inductor's failures have many types
                if self.fn is self.eager:
                    raise
                log.warning("torch.compile failed (%s: %s); scoring in eager mode", type(exc).__name__, exc)
                _COMPILED.pop(self.eager, None)
                self.fn, self.pad_to = self.eager, 0
                out = self.fn(x)
        return out[:n]


def _topk(logits: torch.Tensor, k: int) -> tuple[list[list[float]], list[list[int]]]:
    probs = torch.softmax(logits.float(), dim=1)
    p, idx = probs.topk(k, dim=1)
    return p.cpu().tolist(), idx.cpu().tolist()


@dataclass
class _Context:
    files: list[str]
    class_names: list[str]
    k: int
    model_uri: str
    model_version: str


def _row(it: _Item, ctx: _Context, now: datetime, p: list[float] | None, idx: list[int] | None) -> dict:
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
    }
    if p is not None:
        labels = [ctx.class_names[c] for c in idx]
        row.update(
            top1_label=labels[0], top1_index=int(idx[0]), top1_prob=float(p[0]),
            top5_labels=labels, top5_indices=[int(c) for c in idx], top5_probs=[float(x) for x in p],
        )  # fmt: skip
    return row


def _scored_batches(
    model: nn.Module,
    meta: dict,
    root: Path,
    files: list[str],
    options: ScoringOptions,
    *,
    model_uri: str,
    model_version: str,
    done: Mapping[str, str | None] | None = None,
) -> Iterator[tuple[list[dict], int]]:
    """Yield (rows, skipped) per batch, in input order: one row for every file not skipped."""
    from cvlib.models.precision import inference_dtype

    dev = pick_device(options.device)
    amp_dtype = inference_dtype(options.precision, dev)
    class_names = list(meta["class_names"])
    ctx = _Context(files, class_names, min(options.top_k, len(class_names)), model_uri, model_version)
    pre = meta["preprocessing"]
    preset = eval_preset_from(pre)
    if options.gpu_decode not in ("auto", "on", "off"):
        raise ValueError(f"gpu_decode must be auto, on or off, not {options.gpu_decode!r}")
    # "on" off CUDA decodes with torchvision's libjpeg in this thread: slower than Pillow's draft
    # mode in the workers, but the same code path as nvJPEG, so it can be tested without a GPU.
    # "auto" on CUDA sends photo-sized JPEGs (>= GPU_DECODE_MIN_PIXELS) to nvJPEG, small ones to the workers.
    gpu_jpeg = options.gpu_decode == "on" or (options.gpu_decode == "auto" and dev.type == "cuda")
    ds = ScoringDataset(
        root, files, preset, draft_size=int(pre["resize_size"]), done=done, gpu_jpeg=gpu_jpeg,
        gpu_min_pixels=GPU_DECODE_MIN_PIXELS if options.gpu_decode == "auto" else 0,
    )  # fmt: skip
    forward = ModelRunner(model, dev, amp_dtype, compile=options.compile, batch_size=options.batch_size, fuse=options.fuse)
    with torch.inference_mode():
        for batch in _batches(ds, options, pin_memory=dev.type == "cuda"):
            x, order = None, batch.cpu_pos
            if batch.cpu is not None:
                x = batch.cpu.to(dev, non_blocking=True)
            if batch.raw_pos:  # undecoded JPEGs: decode on the GPU, then merge with the CPU-decoded ones
                decoded = _decode_on_device(batch, preset, dev, lambda i: files[i])
                if x is not None:
                    decoded.update(zip(batch.cpu_pos, x, strict=True))
                order = sorted(decoded)
                x = torch.stack([decoded[j] for j in order]) if order else None
            predictions: dict[int, tuple[list[float], list[int]]] = {}
            if x is not None:
                x = x.contiguous(memory_format=torch.channels_last)
                p, idx = _topk(forward(x), ctx.k)
                predictions = {j: (p[r], idx[r]) for r, j in enumerate(order)}
            now = datetime.now(timezone.utc)
            rows = [_row(it, ctx, now, *predictions.get(j, (None, None))) for j, it in enumerate(batch.items) if not it.skip]
            yield rows, sum(it.skip for it in batch.items)


# --------------------------------------------------------------------------- in-memory scoring


def score_folder(
    model: nn.Module,
    meta: dict,
    root: str | os.PathLike[str],
    *,
    files: Sequence[str] | None = None,
    model_uri: str = "",
    model_version: str = "",
    batch_size: int = 64,
    top_k: int = 5,
    num_workers: int = 2,
    device: str = "auto",
    precision: str = "fp32",
    compile: bool = False,
    gpu_decode: str = "auto",
    loader: str = "auto",
) -> pd.DataFrame:
    """Score every file; the frame has exactly one row per file, in input order. For large jobs
    use :func:`score_to_parts`, which streams to Parquet and resumes."""
    root = Path(root)
    files = list_input_files(root) if files is None else list(files)
    options = ScoringOptions(
        batch_size=batch_size, top_k=top_k, num_workers=num_workers, device=device, precision=precision,
        compile=compile, gpu_decode=gpu_decode, loader=loader,
    )  # fmt: skip
    rows: list[dict] = []
    for batch_rows, _ in _scored_batches(model, meta, root, files, options, model_uri=model_uri, model_version=model_version):
        rows += batch_rows
    if [r["path"] for r in rows] != files:  # cannot happen unless the loader lost items
        raise RuntimeError(f"{len(files) - len(rows)} files were not scored")
    return pd.DataFrame(rows, columns=PREDICTIONS_SCHEMA.names)


# --------------------------------------------------------------------------- Parquet parts


def _metadata(class_names: Sequence[str], config: Mapping) -> dict[str, str]:
    return {META_CLASS_NAMES: json.dumps(list(class_names)), META_SCORING: json.dumps(dict(config), default=str)}


def write_predictions(df: pd.DataFrame, out: str | os.PathLike[str], *, class_names: list[str], config: dict) -> Path:
    """One Parquet file, written atomically."""
    rest = pa.schema([f for f in PREDICTIONS_SCHEMA if f.name != "scored_at"])
    table = pa.Table.from_pandas(df.drop(columns=["scored_at"]), schema=rest, preserve_index=False)
    scored_at = pa.array(list(df["scored_at"]), type=PREDICTIONS_SCHEMA.field("scored_at").type)
    table = table.append_column(PREDICTIONS_SCHEMA.field("scored_at"), scored_at).select(PREDICTIONS_SCHEMA.names)
    return write_table_atomic(table, out, metadata=_metadata(class_names, config))


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


def read_done(sources: Iterable[str | os.PathLike[str]], model_version: str, paths: Iterable[str] | None = None) -> dict[str, str | None]:
    """path -> sha256 of the rows already written for ``model_version`` (None where the file
    could not be read), restricted to ``paths`` when given."""
    wanted = None if paths is None else set(paths)
    done: dict[str, str | None] = {}
    for src in sources:
        try:
            t = pq.read_table(src, columns=["path", "sha256", "model_version"])
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
            raise RuntimeError(f"{src} is not a readable predictions part ({exc}); delete it and rerun: its files are scored again") from exc
        for path, sha, version in zip(*(t.column(c).to_pylist() for c in ("path", "sha256", "model_version")), strict=True):
            if version == model_version and (wanted is None or path in wanted):
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


def score_to_parts(
    model: nn.Module,
    meta: dict,
    root: str | os.PathLike[str],
    files: Sequence[str],
    parts_dir: str | os.PathLike[str],
    *,
    model_uri: str = "",
    model_version: str = "",
    options: ScoringOptions | None = None,
    config: Mapping | None = None,
    shard: int = 0,
    sources: Iterable[str | os.PathLike[str]] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ScoringStats:
    """Score ``files`` (relative to ``root``) into part files in ``parts_dir``, skipping those
    already written there (or in ``sources``) for ``model_version``.

    ``progress(done, total)`` is called after every batch, skipped files counted as done.
    Parts are named ``part-{shard:05d}-{token}-{seq:05d}.parquet`` with a fresh token per call,
    so retries and concurrent shards never overwrite each other's parts.
    """
    from cvlib.models.precision import inference_dtype

    options = options or ScoringOptions()
    parts_dir = Path(parts_dir)
    parts_dir.mkdir(parents=True, exist_ok=True)
    files = list(files)
    stats = ScoringStats(files=len(files))
    t0 = time.perf_counter()
    existing = sorted(parts_dir.glob(PART_GLOB)) if sources is None else list(sources)
    done = read_done(existing, model_version, files)
    dev = pick_device(options.device)
    amp = inference_dtype(options.precision, dev)
    stats.device, stats.precision = str(dev), "fp32" if amp is None else str(amp).removeprefix("torch.")
    if progress:
        progress(0, len(files))
    engine = {
        "batch_size": options.batch_size, "top_k": options.top_k, "device": stats.device,
        "precision": stats.precision, "compile": options.compile, "gpu_decode": options.gpu_decode,
        "preprocessing": meta.get("preprocessing"), "model_uri": model_uri, "model_version": model_version,
    }  # fmt: skip
    writer = PartWriter(
        parts_dir, f"part-{shard:05d}-{uuid.uuid4().hex[:8]}", _metadata(meta["class_names"], dict(config or {}) | engine),
        max_rows=options.part_size, max_seconds=options.part_seconds,
    )  # fmt: skip
    seen = 0
    try:
        for rows, skipped in _scored_batches(
            model, meta, Path(root), files, options, model_uri=model_uri, model_version=model_version, done=done
        ):
            writer.add(rows)
            ok = sum(r["status"] == "ok" for r in rows)
            stats.scored += ok
            stats.errors += len(rows) - ok
            stats.skipped += skipped
            seen += len(rows) + skipped
            if progress:
                progress(seen, len(files))
    finally:
        stats.parts = writer.close()
    stats.seconds = time.perf_counter() - t0
    return stats


# --------------------------------------------------------------------------- finishing


def _read_parts(sources: Iterable[Path], columns: Sequence[str] | None = None) -> pa.Table | None:
    names = list(columns or PREDICTIONS_SCHEMA.names)
    schema = pa.schema([PREDICTIONS_SCHEMA.field(n) for n in names])
    tables = []
    for src in sources:
        tables.append(pq.read_table(src, columns=names).cast(schema))
    return pa.concat_tables(tables) if tables else None


def _newest_per_path(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (path, model_version): the newest (a file whose content changed since it was
    scored has an older, superseded row)."""
    return df.sort_values("scored_at", kind="stable").drop_duplicates(["path", "model_version"], keep="last")


def compact_parts(parts_dir: str | os.PathLike[str], model_version: str) -> int:
    """Drop superseded rows of ``model_version`` (an older row for a path scored again), by
    rewriting the affected parts atomically; returns how many rows were dropped."""
    parts = sorted(Path(parts_dir).glob(PART_GLOB))
    frames = []
    for part in parts:
        t = pq.read_table(part, columns=["path", "model_version", "scored_at"])
        df = t.to_pandas()
        df["_part"], df["_row"] = str(part), range(len(df))
        frames.append(df[df["model_version"] == model_version])
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
    layout: OutputLayout, model_version: str, paths: Sequence[str], *, class_names: Sequence[str], config: Mapping
) -> pd.DataFrame:
    """Write the single output file from the staged parts (and the rows of a previous finished
    file for the same model version), one row per path in ``paths``, sorted by path; then remove
    the staging folder. Rows of other model versions or other paths are not carried over: the
    file holds this job's predictions."""
    table = _read_parts(layout.sources())
    df = table.to_pandas() if table is not None else pd.DataFrame(columns=PREDICTIONS_SCHEMA.names)
    wanted = set(paths)
    df = df[(df["model_version"] == model_version) & df["path"].isin(wanted)]
    df = _newest_per_path(df).sort_values("path", kind="stable").reset_index(drop=True)
    missing = wanted - set(df["path"])
    if missing:  # never write a silently short file
        raise RuntimeError(f"{len(missing)} files have no row, e.g. {sorted(missing)[:3]}; rerun to resume")
    write_predictions(df, layout.target, class_names=list(class_names), config=dict(config))
    shutil.rmtree(layout.parts_dir, ignore_errors=True)
    return df


def read_predictions(
    out: str | os.PathLike[str], model_version: str | None = None, *, columns: Sequence[str] | None = None
) -> pd.DataFrame:
    """All rows of a predictions file or dataset (hidden and temporary files ignored), optionally
    of one model version and only some ``columns``, sorted by path."""
    out = Path(out)
    sources = [out] if out.is_file() else sorted(out.glob(PART_GLOB))
    names = list(columns or PREDICTIONS_SCHEMA.names)
    for needed in ("path", "model_version"):
        if needed not in names:
            names.append(needed)
    table = _read_parts(sources, names)
    df = table.to_pandas() if table is not None else pd.DataFrame(columns=names)
    if model_version is not None:
        df = df[df["model_version"] == model_version]
    return df.sort_values(["path", "model_version"], kind="stable").reset_index(drop=True)


def shard_files(files: Sequence[str], shards: int) -> list[list[str]]:
    """Contiguous, nearly equal slices (neighbouring files share folders and disk locality)."""
    shards = max(1, min(shards, len(files) or 1))
    size = math.ceil(len(files) / shards) if files else 0
    return [list(files[i : i + size]) for i in range(0, len(files), size)] if files else [[]]


# --------------------------------------------------------------------------- in-memory requests


def predict_sources(
    model: nn.Module, meta: dict, sources: Sequence[str | bytes], *, top_k: int = 5, batch_size: int = 32
) -> pd.DataFrame:
    """Top-k for in-memory requests (paths or bytes), one row per source; bad inputs get an
    ``error`` and no prediction. Used by the pyfunc model behind ``mlflow models serve``."""
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
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(tensors), batch_size):
            chunk = tensors[start : start + batch_size]
            probs = torch.softmax(model(torch.stack([t for _, t in chunk])).float(), dim=1)
            p, idx = probs.topk(k, dim=1)
            for (i, _), pi, ii in zip(chunk, p.tolist(), idx.tolist(), strict=True):
                rows[i].update(
                    top1_label=class_names[ii[0]],
                    top1_prob=pi[0],
                    top5_labels=[class_names[c] for c in ii],
                    top5_probs=pi,
                )
    return pd.DataFrame(rows)
