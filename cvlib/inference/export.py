"""Export to OpenVINO: convert, quantize to int8 with NNCF, and keep an artifact only when it
agrees with the fp32 PyTorch model on the validation split.

* **convert**: ``openvino.convert_model`` on the eval-mode module, batch dimension dynamic, saved
  uncompressed (``compress_to_fp16=False``) as ``model_fp32.xml``.
* **quantize**: NNCF post-training quantization of that IR (one image per calibration step),
  calibrated on up to ``calibration_images`` training images through the model's own evaluation
  preprocessing (the same resize, crop and normalisation scoring uses), saved as ``model_int8.xml``.
  By default with accuracy control (``nncf.quantize_with_accuracy_control``, the metric being top-1
  agreement with the fp32 model on the validation split): the quantized layers that cost most
  agreement return to floating point until the gate's threshold is met; optionally the first
  convolution and the head are never quantized (``keep_stem_and_head``).
* **agreement is the gate**: every candidate (int8, then bf16 where the CPU has it, then fp32)
  runs over the whole validation split beside the fp32 PyTorch forward; the first whose top-1
  agreement reaches ``min_top1_agreement`` is ``verified``; when none does the record says
  ``rejected`` and why, and scoring keeps PyTorch. Every figure measured is recorded.

The record (``export.json``) and the IR files go to ``openvino/`` inside the model package.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from cvlib.inference.engines import EXPORT_RECORD, OpenVINOEngine
from cvlib.inference.loop import infer_batches
from cvlib.inference.options import ExportConfig
from cvlib.training.evaluate import package_split_dataset

__all__ = [
    "Agreement", "ExportRecord", "agreement", "calibration_loader", "convert_to_ir", "export_openvino", "export_package",
    "quantize_ir", "stem_and_head", "validation_loader",
]  # fmt: skip

log = logging.getLogger(__name__)

FP32_FILE = "model_fp32.xml"
INT8_FILE = "model_int8.xml"


@dataclass
class Agreement:
    """One candidate against the fp32 PyTorch model on the validation split."""

    precision: str
    top1_agreement: float  # same top-1 class
    top5_agreement: float  # mean overlap of the two top-5 sets
    val_top1: float  # the candidate's own top-1 accuracy
    passed: bool = False


@dataclass
class ExportRecord:
    """What ``export.json`` holds: the decision and the figures behind it."""

    status: str  # verified or rejected
    precision: str | None  # the verified candidate's precision (int8, bf16, fp32), None when rejected
    file: str | None  # its IR, relative to the openvino folder
    fp32_file: str
    reason: str
    min_top1_agreement: float
    val_images: int
    val_top1_fp32: float
    calibration_images: int
    candidates: list[Agreement] = field(default_factory=list)
    seconds: float = 0.0
    quantization: dict = field(default_factory=dict)  # how the int8 candidate was made (ExportConfig's fields)

    @property
    def verified(self) -> bool:
        return self.status == "verified"

    def candidate(self, precision: str) -> Agreement | None:
        return next((c for c in self.candidates if c.precision == precision), None)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


# --------------------------------------------------------------------------- loaders


def calibration_loader(model_meta: dict, data_root, manifest: pd.DataFrame, n: int, *, num_workers: int = 0, seed: int = 0):
    """Up to ``n`` training images (a fixed random subset, every class's share), one per batch,
    through the model's evaluation preprocessing: what NNCF measures activation ranges on."""
    from torch.utils.data import Subset

    from cvlib.data.datasets import make_loader

    ds = package_split_dataset(model_meta, data_root, manifest, "train")
    if len(ds) == 0:
        raise ValueError("no training images to calibrate the int8 model on")
    picks = np.random.default_rng(seed).permutation(len(ds))[: min(n, len(ds))]
    return make_loader(Subset(ds, sorted(picks.tolist())), batch_size=1, num_workers=num_workers)


def validation_loader(model_meta: dict, data_root, manifest: pd.DataFrame, *, batch_size: int = 32, num_workers: int = 0):
    """The whole validation split, (images, targets) in the model's class order."""
    from cvlib.data.datasets import make_loader

    ds = package_split_dataset(model_meta, data_root, manifest, "val")
    if len(ds) == 0:
        raise ValueError("no validation images to measure agreement on")
    return make_loader(ds, batch_size=batch_size, num_workers=num_workers)


# --------------------------------------------------------------------------- convert, quantize


def _input_shape(model_meta: dict) -> tuple[int, int, int, int]:
    side = int(model_meta["preprocessing"]["image_size"])
    return (1, 3, side, side)


def convert_to_ir(model: nn.Module, model_meta: dict, out_xml: str | os.PathLike[str]):
    """The eval-mode module as an OpenVINO model with a dynamic batch, saved in fp32; returns it."""
    import openvino as ov

    from cvlib.models.factory import eval_mode

    with eval_mode(model), torch.no_grad():
        ov_model = ov.convert_model(model.cpu(), example_input=torch.zeros(_input_shape(model_meta)))
    shape = ov_model.input(0).get_partial_shape()
    shape[0] = -1
    ov_model.reshape({ov_model.input(0): shape})
    ov.save_model(ov_model, str(out_xml), compress_to_fp16=False)
    return ov_model


def stem_and_head(ov_model) -> list[str]:
    """Names of the first convolution and of the MatMuls (the classifier head's linear layers) of
    an OpenVINO model: the layers an ignored scope keeps in floating point."""
    ops = ov_model.get_ordered_ops()
    first_conv = next((op.get_friendly_name() for op in ops if op.get_type_name() == "Convolution"), None)
    head = [op.get_friendly_name() for op in ops if op.get_type_name() == "MatMul"]
    return ([first_conv] if first_conv else []) + head


def _to_input(item) -> np.ndarray:
    images = item[0] if isinstance(item, (tuple, list)) else item
    return images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images, np.float32)


def _agreement_items(validation: Iterable, reference_top1: torch.Tensor) -> list[tuple[np.ndarray, int]]:
    """The validation split as (one image, the fp32 model's top-1) items, NNCF's validation data."""
    images = np.concatenate([_to_input(batch) for batch in validation])
    if len(images) != len(reference_top1):
        raise ValueError(f"{len(images)} validation images but {len(reference_top1)} reference predictions")
    return [(images[i : i + 1], int(reference_top1[i])) for i in range(len(images))]


def _top1_agreement_fn(compiled, items) -> tuple[float, list[float]]:
    """NNCF's ``validation_fn``: top-1 agreement with the fp32 model, overall and per item."""
    hits = [float(np.argmax(compiled(image)[0], axis=1)[0] == ref) for image, ref in items]
    return (float(np.mean(hits)) if hits else 0.0), hits


def quantize_ir(
    ov_model, calibration: Iterable, subset_size: int, out_xml: str | os.PathLike[str], config: ExportConfig, *,
    validation: Iterable | None = None, reference_top1: torch.Tensor | None = None,
):  # fmt: skip
    """NNCF post-training int8 quantization of ``ov_model``, calibrated on ``calibration`` (items
    are (images, ...) pairs or bare image tensors), saved to ``out_xml``.

    ``config.keep_stem_and_head`` leaves the first convolution and the head's MatMuls in floating
    point. ``config.accuracy_control`` needs ``validation`` ((images, targets) batches) and the fp32
    model's top-1 on them (``reference_top1``): NNCF then restores the quantized layers that cost
    most agreement until the drop is at most ``1 - config.min_top1_agreement``."""
    import nncf
    import openvino as ov

    preset = nncf.QuantizationPreset.MIXED if config.preset == "mixed" else nncf.QuantizationPreset.PERFORMANCE
    ignored = nncf.IgnoredScope(names=stem_and_head(ov_model)) if config.keep_stem_and_head else None
    common = {
        "subset_size": subset_size, "preset": preset, "fast_bias_correction": config.fast_bias_correction,
        "ignored_scope": ignored,
    }  # fmt: skip
    calibration_data = nncf.Dataset(calibration, _to_input)
    if config.accuracy_control:
        if validation is None or reference_top1 is None:
            raise ValueError("accuracy-controlled quantization needs the validation split and the fp32 model's top-1 on it")
        items = _agreement_items(validation, reference_top1)
        quantized = nncf.quantize_with_accuracy_control(
            ov_model, calibration_data, nncf.Dataset(items, lambda item: item[0]), _top1_agreement_fn,
            max_drop=1.0 - config.min_top1_agreement, drop_type=nncf.DropType.ABSOLUTE, **common,
        )  # fmt: skip
    else:
        quantized = nncf.quantize(ov_model, calibration_data, **common)
    ov.save_model(quantized, str(out_xml), compress_to_fp16=False)
    return quantized


# --------------------------------------------------------------------------- agreement


def _logits(forward, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """All logits and targets of ``loader`` through the one inference loop (fp32 for a module)."""
    pairs = ((targets, images) for images, targets in loader)
    logits, targets = [], []
    with closing(infer_batches(forward, pairs, torch.device("cpu"), amp_dtype=None)) as results:
        for t, out in results:
            logits.append(out.float().cpu())
            targets.append(torch.as_tensor(t))
    return torch.cat(logits), torch.cat(targets)


def agreement(reference: torch.Tensor, candidate: torch.Tensor, targets: torch.Tensor, precision: str) -> Agreement:
    """Top-1 agreement, mean top-5 overlap and the candidate's top-1 accuracy."""
    k = min(5, reference.shape[1])
    ref5, cand5 = reference.topk(k, dim=1).indices, candidate.topk(k, dim=1).indices
    top1 = (ref5[:, 0] == cand5[:, 0]).float().mean().item()
    overlap = (ref5[:, :, None] == cand5[:, None, :]).any(dim=2).float().mean().item()
    acc = (cand5[:, 0] == targets).float().mean().item()
    return Agreement(precision, top1, overlap, acc)


def _bf16_capable() -> bool:
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


# --------------------------------------------------------------------------- the whole export


def export_openvino(
    model: nn.Module,
    model_meta: dict,
    out_dir: str | os.PathLike[str],
    *,
    validation: Iterable,
    calibration: Iterable | None = None,
    calibration_size: int = 0,
    config: ExportConfig | None = None,
) -> ExportRecord:
    """Convert ``model`` into ``out_dir`` (the package's ``openvino/`` folder), quantize it on
    ``calibration`` (``calibration_size`` items) when ``config.int8``, measure every candidate on
    ``validation`` ((images, targets) batches) and write the record; see the module docstring."""
    config = config or ExportConfig()
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ov_model = convert_to_ir(model, model_meta, out / FP32_FILE)
    reference, targets = _logits(model, validation)
    val_top1 = (reference.argmax(1) == targets).float().mean().item()

    candidates: list[tuple[str, str, str | None]] = []  # (precision, file, precision hint)
    if config.int8:
        if calibration is None or calibration_size < 1:
            raise ValueError("int8 export needs calibration images")
        quantize_ir(ov_model, calibration, calibration_size, out / INT8_FILE, config, validation=validation,
                    reference_top1=reference.argmax(1))
        candidates.append(("int8", INT8_FILE, None))
    if _bf16_capable():
        candidates.append(("bf16", FP32_FILE, "bf16"))
    candidates.append(("fp32", FP32_FILE, "f32"))

    measured: list[Agreement] = []
    chosen: tuple[str, str] | None = None
    for precision, file, hint in candidates:
        engine = OpenVINOEngine(out / file, int8=precision == "int8", precision_hint=hint)
        got, _ = _logits(engine, validation)
        a = agreement(reference, got, targets, precision)
        a.passed = a.top1_agreement >= config.min_top1_agreement
        measured.append(a)
        log.info("OpenVINO %s: top-1 agreement %.4f, top-5 overlap %.4f, val top-1 %.4f (fp32 %.4f)",
                 precision, a.top1_agreement, a.top5_agreement, a.val_top1, val_top1)  # fmt: skip
        if a.passed:
            chosen = (precision, file)
            break
    reason = _reason(measured, config.min_top1_agreement)
    record = ExportRecord(
        status="verified" if chosen else "rejected", precision=chosen[0] if chosen else None, file=chosen[1] if chosen else None,
        fp32_file=FP32_FILE, reason=reason, min_top1_agreement=config.min_top1_agreement, val_images=len(targets),
        val_top1_fp32=val_top1, calibration_images=calibration_size if config.int8 else 0, candidates=measured,
        seconds=time.perf_counter() - t0, quantization=_quantization(config) if config.int8 else {},
    )  # fmt: skip
    (out / EXPORT_RECORD).write_text(record.to_json())
    return record


def _quantization(config: ExportConfig) -> dict:
    keys = ("calibration_images", "preset", "fast_bias_correction", "keep_stem_and_head", "accuracy_control")
    return {k: getattr(config, k) for k in keys}


def _reason(measured: list[Agreement], threshold: float) -> str:
    parts = []
    for a in measured:
        verdict = "used" if a.passed else "not used"
        parts.append(f"{a.precision}: top-1 agreement {a.top1_agreement:.4f} {'>=' if a.passed else '<'} {threshold:.4f}, {verdict}")
    if not any(a.passed for a in measured):
        parts.append("PyTorch is kept")
    return "; ".join(parts)


def export_package(
    model: nn.Module, model_meta: dict, data_root: str | os.PathLike[str], manifest: pd.DataFrame,
    out_dir: str | os.PathLike[str], config: ExportConfig | None = None,
) -> ExportRecord:  # fmt: skip
    """:func:`export_openvino` with the calibration and validation images taken from a manifest
    (training split, validation split) through the model's own evaluation preprocessing."""
    config = config or ExportConfig()
    val = validation_loader(model_meta, data_root, manifest, batch_size=config.batch_size, num_workers=config.num_workers)
    calib = None
    if config.int8:
        calib = calibration_loader(model_meta, data_root, manifest, config.calibration_images, num_workers=config.num_workers)
    return export_openvino(
        model, model_meta, out_dir, validation=val, calibration=calib, calibration_size=len(calib) if calib else 0, config=config
    )
