"""Decoding for scoring: files -> batches of preprocessed images, one item per file, readable or not.

* Items are read, hashed and decoded in DataLoader worker processes, or in threads where the
  process may not fork (a daemonic Dask worker), or inline (``num_workers=0``); the batch is
  stacked in the worker, so one tensor per batch crosses the process boundary. JPEGs decode in
  libjpeg's draft mode (the smallest power-of-two reduction still at least the resize size); the
  size reported is the stored, upright one.
* A file already scored (same path and content for this model version, ``done``) comes back as a
  ``skip`` item without being decoded; a file that cannot be read becomes an error item, so a bad
  file neither stops the run nor shifts its neighbours' rows.
* On CUDA, photo-sized plain JPEGs travel undecoded and nvJPEG decodes them on the GPU, EXIF
  orientation applied on the tensor (:func:`batch_images`).
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from cvlib.data.datasets import ForkingLoader
from cvlib.data.imageio import DEFAULT_MAX_PIXELS, JPEG_FORMATS, ImageReadError, load_rgb
from cvlib.data.transforms import eval_preset_from
from cvlib.inference.options import ScoreConfig

__all__ = ["GPU_DECODE_MIN_PIXELS", "DecodedBatch", "FileItem", "ScoringDataset", "batch_images", "decoded_batches",
           "orient_tensor", "scoring_dataset"]  # fmt: skip

_EXIF_ORIENTATION = 0x0112
_NOT_DONE = object()
GPU_DECODE_MIN_PIXELS = 512 * 512  # smaller JPEGs decode faster in draft mode on the CPU workers


@dataclass
class FileItem:
    """One input file as decoding left it: an image (decoded, or raw JPEG bytes for the GPU), an
    error, or a skip (already scored)."""

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
class DecodedBatch:
    """Items of consecutive files, with their CPU-decoded images stacked."""

    items: list[FileItem]
    cpu: torch.Tensor | None  # the CPU-decoded images of ``items``, stacked, in item order
    cpu_pos: list[int]  # item positions of the rows of ``cpu``
    raw_pos: list[int]  # item positions of undecoded JPEGs

    @property
    def skipped(self) -> int:
        return sum(it.skip for it in self.items)

    def pin_memory(self) -> DecodedBatch:  # DataLoader(pin_memory=True) calls this
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

    def __getitem__(self, i: int) -> FileItem:
        rel = self.files[i]
        full = self.root / rel if self._root_is_dir else self.root
        previous = self.done.get(rel, _NOT_DONE)
        try:
            data = full.read_bytes()
        except OSError as exc:
            if previous is None:
                return FileItem(i, skip=True)
            if isinstance(exc, FileNotFoundError):
                return FileItem(i, status="missing", error=f"{rel}: file does not exist")
            return FileItem(i, status="unreadable", error=f"{rel}: {exc.strerror or exc}")
        digest = hashlib.sha256(data).hexdigest()
        if previous == digest:
            return FileItem(i, sha256=digest, nbytes=len(data), skip=True)
        item = FileItem(i, sha256=digest, nbytes=len(data))
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


def _collate(items: list[FileItem]) -> DecodedBatch:
    """Runs in the worker: one stacked tensor per batch crosses the process boundary."""
    cpu_pos = [j for j, it in enumerate(items) if it.tensor is not None]
    cpu = torch.stack([items[j].tensor for j in cpu_pos]) if cpu_pos else None
    for j in cpu_pos:
        items[j].tensor = None
    return DecodedBatch(items, cpu, cpu_pos, [j for j, it in enumerate(items) if it.raw is not None])


def _may_fork() -> bool:
    """Daemonic processes (Dask's default workers) may not start DataLoader worker processes."""
    return not multiprocessing.current_process().daemon


def _loader_kind(config: ScoreConfig) -> str:
    if config.num_workers <= 0:
        return "inline"
    if config.loader == "auto":
        return "processes" if _may_fork() else "threads"
    return config.loader


def decoded_batches(ds: ScoringDataset, config: ScoreConfig, pin_memory: bool) -> Iterator[DecodedBatch]:
    """Collated batches of ``config.batch_size`` items in input order, decoded ahead of the consumer."""
    n, bs = len(ds), config.batch_size
    chunks = [range(s, min(s + bs, n)) for s in range(0, n, bs)]
    kind = _loader_kind(config)
    if kind == "processes":
        loader = ForkingLoader(
            ds, batch_size=bs, num_workers=config.num_workers, collate_fn=_collate, pin_memory=pin_memory,
            prefetch_factor=2,
        )  # fmt: skip
        yield from loader
        return
    if kind == "inline":
        for chunk in chunks:
            yield _collate([ds[i] for i in chunk])
        return
    # Threads: Pillow and torch release the GIL while decoding and resizing.
    with ThreadPoolExecutor(config.num_workers, thread_name_prefix="visionflow-decode") as pool:
        pending = []
        ahead = 2 * config.num_workers
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


def _decode_on_device(batch: DecodedBatch, preset, dev: torch.device, rel: Callable[[int], str]) -> dict[int, torch.Tensor]:
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



def scoring_dataset(
    root: Path, files: Sequence[str], preprocessing: Mapping, config: ScoreConfig, dev: torch.device,
    done: Mapping[str, str | None] | None = None,
) -> ScoringDataset:  # fmt: skip
    """The dataset for ``config``'s decoding on ``dev``. ``gpu_decode``: "auto" on CUDA sends
    photo-sized JPEGs (>= GPU_DECODE_MIN_PIXELS) to nvJPEG and small ones to the workers; "on" off
    CUDA decodes with torchvision's libjpeg in the scoring thread: slower than Pillow's draft mode
    in the workers, but the same code path as nvJPEG, so it can be tested without a GPU."""
    gpu_jpeg = config.gpu_decode == "on" or (config.gpu_decode == "auto" and dev.type == "cuda")
    return ScoringDataset(
        root, files, eval_preset_from(preprocessing), draft_size=int(preprocessing["resize_size"]), done=done,
        gpu_jpeg=gpu_jpeg, gpu_min_pixels=GPU_DECODE_MIN_PIXELS if config.gpu_decode == "auto" else 0,
    )  # fmt: skip


def batch_images(batch: DecodedBatch, preset, dev: torch.device, rel: Callable[[int], str]) -> tuple[list[int], torch.Tensor | None]:
    """(item positions, their images stacked on ``dev``): the CPU-decoded images, and the
    undecoded JPEGs decoded on the device and merged in item order. None when no item of the
    batch has an image."""
    x, order = None, batch.cpu_pos
    if batch.cpu is not None:
        x = batch.cpu.to(dev, non_blocking=True)
    if batch.raw_pos:
        decoded = _decode_on_device(batch, preset, dev, rel)
        if x is not None:
            decoded.update(zip(batch.cpu_pos, x, strict=True))
        order = sorted(decoded)
        x = torch.stack([decoded[j] for j in order]) if order else None
    return order, x
