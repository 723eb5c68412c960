"""Inference engines: what runs a batch's forward besides the PyTorch module itself.

The one inference loop (:func:`cvlib.inference.loop.infer_batches`) takes either an
``nn.Module`` (the PyTorch engine: eval mode, autocast, BN folding) or a :class:`BatchEngine`,
any callable that maps a batch of (N, C, H, W) float32 images to (N, classes) float32 logits and
says which engine and precision it is. :class:`OpenVINOEngine` is the one we have: an OpenVINO IR
compiled for the CPU with the throughput hint, each batch split over the compiled model's
parallel infer requests (one per stream) so every stream works on every batch.

The OpenVINO artifact lives in the model package, in ``openvino/`` beside the safetensors
weights (:mod:`cvlib.inference.export` writes it): the IR files and ``export.json``, the
agreement figures and the decision. Only a ``verified`` artifact is used by ``auto``.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

__all__ = [
    "EXPORT_RECORD", "OPENVINO_DIR", "BatchEngine", "EngineChoice", "OpenVINOEngine", "choose_engine", "openvino_dir",
    "read_export_record",
]  # fmt: skip

OPENVINO_DIR = "openvino"  # inside a model package folder
EXPORT_RECORD = "export.json"  # the export's figures and decision, in OPENVINO_DIR
# What OpenVINO calls a precision -> what the Parquet rows and tags say.
_PRECISION_NAMES = {"f32": "fp32", "bf16": "bf16", "f16": "fp16", "i8": "int8", "u8": "int8"}


@runtime_checkable
class BatchEngine(Protocol):
    """A forward that is not a PyTorch module: images in, float32 logits out (on the CPU)."""

    engine: str  # "openvino"
    precision: str  # "int8", "bf16", "fp32"

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


class OpenVINOEngine:
    """An OpenVINO IR compiled for the CPU (``PERFORMANCE_HINT=THROUGHPUT``).

    Each call splits the batch over the compiled model's optimal number of infer requests and runs
    them at once through an ``AsyncInferQueue``: with one request per stream, a batch keeps every
    stream busy. ``precision_hint`` ("bf16", "f32") is OpenVINO's ``INFERENCE_PRECISION_HINT`` for
    the non-quantized parts (by default bf16 on CPUs with native bf16). Calls are serialised
    (a lock): one compiled model per process, shared by the threads that score with it.
    """

    engine = "openvino"

    def __init__(self, xml: str | os.PathLike[str], *, int8: bool = False, precision_hint: str | None = None, streams: int = 0) -> None:
        import openvino as ov

        core = ov.Core()
        config: dict[str, str] = {"PERFORMANCE_HINT": "THROUGHPUT"}
        if streams:
            config["NUM_STREAMS"] = str(streams)
        if precision_hint:
            config["INFERENCE_PRECISION_HINT"] = precision_hint
        self.xml = str(xml)
        self.compiled = core.compile_model(self.xml, "CPU", config)
        self.requests = max(1, int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self.streams = int(self.compiled.get_property("NUM_STREAMS"))
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        hint = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
        self.precision = "int8" if int8 else _PRECISION_NAMES.get(hint, hint)
        self._queue = ov.AsyncInferQueue(self.compiled, self.requests)
        self._queue.set_callback(self._done)
        self._out: list[np.ndarray | None] = []
        self._lock = threading.Lock()

    def _done(self, request, index: int) -> None:
        self._out[index] = request.get_output_tensor(0).data.copy()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) float32 images (any device, any layout) -> (N, classes) float32 CPU logits."""
        x = np.ascontiguousarray(images.detach().to("cpu", torch.float32).contiguous().numpy())
        chunks = np.array_split(x, min(self.requests, len(x))) if len(x) else []
        with self._lock:
            self._out = [None] * len(chunks)
            for i, chunk in enumerate(chunks):
                self._queue.start_async({0: chunk}, i)
            self._queue.wait_all()
            out = self._out
        return torch.from_numpy(np.concatenate(out)) if out else torch.zeros((0, 0))


# --------------------------------------------------------------------------- the artifact


def openvino_dir(package: str | os.PathLike[str]) -> Path | None:
    """The ``openvino/`` folder of a model package (searched below it, as MLflow nests the
    package), or None."""
    p = Path(package)
    if not p.is_dir():
        return None
    if (p / OPENVINO_DIR / EXPORT_RECORD).is_file():
        return p / OPENVINO_DIR
    found = next(iter(sorted(p.rglob(f"{OPENVINO_DIR}/{EXPORT_RECORD}"))), None)
    return found.parent if found else None


def read_export_record(package: str | os.PathLike[str]) -> dict | None:
    """The export's record (status, chosen file and precision, agreement figures), or None."""
    d = openvino_dir(package)
    return None if d is None else json.loads((d / EXPORT_RECORD).read_text())


@dataclass(frozen=True)
class EngineChoice:
    """Which engine scores, and why (``reason`` goes to the log)."""

    engine: str  # "torch" or "openvino"
    xml: str | None = None  # the IR to compile (openvino)
    int8: bool = False
    precision_hint: str | None = None
    reason: str = ""


def choose_engine(requested: str, device: torch.device, package: str | os.PathLike[str] | None) -> EngineChoice:
    """``auto``: the package's verified OpenVINO artifact on a CPU, else PyTorch (always on CUDA).
    ``openvino``: the verified artifact, else the fp32 IR the export kept (unverified artifacts are
    named in the reason), else None for ``xml`` (the caller converts on the fly). ``torch``: torch."""
    if requested == "torch":
        return EngineChoice("torch", reason="asked for")
    if requested == "auto" and device.type != "cpu":
        return EngineChoice("torch", reason=f"auto on {device.type}: PyTorch")
    record = read_export_record(package) if package is not None else None
    if record is not None and record.get("status") == "verified":
        d = openvino_dir(package)
        return EngineChoice(
            "openvino", str(d / record["file"]), int8=record["precision"] == "int8",
            precision_hint=_hint(record["precision"]), reason=f"verified {record['precision']} artifact",
        )  # fmt: skip
    if requested == "auto":
        why = "no OpenVINO artifact" if record is None else f"the OpenVINO artifact was rejected: {record.get('reason')}"
        return EngineChoice("torch", reason=f"auto: {why}; PyTorch")
    if requested != "openvino":
        raise ValueError(f"engine must be auto, torch or openvino, not {requested!r}")
    if device.type != "cpu":
        raise ValueError(f"the openvino engine runs on the CPU; device {device} was asked for")
    if record is not None and record.get("fp32_file"):
        d = openvino_dir(package)
        return EngineChoice("openvino", str(d / record["fp32_file"]), reason=f"unverified fp32 IR ({record.get('reason')})")
    return EngineChoice("openvino", None, reason="no OpenVINO artifact: converting to fp32 IR now")


def _hint(precision: str) -> str | None:
    return {"fp32": "f32", "bf16": "bf16"}.get(precision)
