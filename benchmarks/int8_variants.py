"""Which NNCF settings keep int8 in agreement with fp32, and at what speed: each variant of
:class:`cvlib.inference.options.ExportConfig`'s quantization fields quantizes the same IR,
calibrated on the same training images, and is measured on the whole validation split (top-1
agreement with the fp32 PyTorch model, as the export's gate measures it) and timed model-only
beside the fp32 IR with the bf16 hint, rounds interleaved.

Runs on a package that ``benchmarks/engines.py --workdir DIR`` trained (``DIR/package`` and the
training folder ``DIR/train``):

    PYTHONPATH=. python benchmarks/int8_variants.py DIR [--variants default,stem_head,...]

Figures on a shared machine are noisy: read the ratios within one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

PLAIN = {"accuracy_control": False}  # nncf.quantize alone
VARIANTS: dict[str, dict] = {
    "plain": PLAIN,
    "calib_all": PLAIN | {"calibration_images": 100_000},
    "stem_head": PLAIN | {"keep_stem_and_head": True},
    "slow_bias": PLAIN | {"fast_bias_correction": False},
    "stem_head_slow_bias_calib_all": PLAIN | {"keep_stem_and_head": True, "fast_bias_correction": False, "calibration_images": 100_000},
    "mixed": PLAIN | {"preset": "mixed"},
    "accuracy_control": {},  # the default
    "accuracy_control_stem_head": {"keep_stem_and_head": True},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdir", type=Path)
    p.add_argument("--variants", default="plain,stem_head,calib_all,accuracy_control")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()

    from cvlib.data.ingest import build_manifest
    from cvlib.inference.engines import OpenVINOEngine
    from cvlib.inference.export import (
        FP32_FILE,
        _logits,
        agreement,
        calibration_loader,
        convert_to_ir,
        quantize_ir,
        validation_loader,
    )
    from cvlib.inference.options import ExportConfig
    from cvlib.training.checkpoint import load_package

    model, meta = load_package(args.workdir / "package")
    manifest = build_manifest(args.workdir / "train")[0]
    out = Path(tempfile.mkdtemp(prefix="visionflow-int8-"))
    ov_model = convert_to_ir(model, meta, out / FP32_FILE)
    val = validation_loader(meta, args.workdir / "train", manifest)
    reference, targets = _logits(model, val)
    print(f"ResNet-50 at {meta['preprocessing']['image_size']} px; validation {len(targets)} images, "
          f"fp32 top-1 {(reference.argmax(1) == targets).float().mean():.4f}; load {os.getloadavg()[0]:.2f}")  # fmt: skip
    engines = {"bf16 IR": OpenVINOEngine(out / FP32_FILE, precision_hint="bf16")}
    for name in args.variants.split(","):
        config = ExportConfig(**VARIANTS[name])
        calib = calibration_loader(meta, args.workdir / "train", manifest, config.calibration_images)
        t0 = time.perf_counter()
        quantize_ir(ov_model, calib, len(calib), out / f"{name}.xml", config, validation=val, reference_top1=reference.argmax(1))
        secs = time.perf_counter() - t0
        engines[name] = OpenVINOEngine(out / f"{name}.xml", int8=True)
        got, _ = _logits(engines[name], val)
        a = agreement(reference, got, targets, "int8")
        print(f"  {name:28s} calibration {len(calib):4d}: top-1 agreement {a.top1_agreement:.4f}, top-5 overlap "
              f"{a.top5_agreement:.4f}, val top-1 {a.val_top1:.4f}; quantized in {secs:.0f}s", flush=True)  # fmt: skip
    batches = [b for b, _ in val][:4]
    speed: dict[str, list[float]] = {k: [] for k in engines}
    n = sum(len(b) for b in batches)
    for fn in engines.values():
        fn(batches[0])
    for _ in range(args.rounds):
        for name, fn in engines.items():
            t0 = time.perf_counter()
            for b in batches:
                fn(b)
            speed[name].append(n / (time.perf_counter() - t0))
    base = speed["bf16 IR"]
    print(f"model only, img/s (median of {args.rounds} interleaved rounds), ratio to the bf16 IR; load {os.getloadavg()[0]:.2f}")
    for name, values in speed.items():
        ratios = [v / b for v, b in zip(values, base, strict=True)]
        print(f"  {name:28s} {statistics.median(values):7.1f}  ratio {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    main()
