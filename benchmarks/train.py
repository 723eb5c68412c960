"""Training throughput end to end (JPEG files on disk -> decode -> augmentation -> DataLoader
workers -> training step) against the model-only step rate (same model, batch, precision and
step, on a batch already in memory), side by side in one run.

    .venv/bin/python benchmarks/train.py [--images 256] [--size 128] [--batch 32] [--workers 2]
                                         [--threads N] [--gpu-batch 256] [--gpu-steps 40]
                                         [--gpu-workers 12] [--gpu-images 3072] [--gpu-repeats 8]

It writes ``--images`` JPEGs of 500x375 (smooth colour fields with texture, quality 90) to a
temporary folder, then runs visionflow's own pieces: ``ManifestDataset`` with the training draft
size, the default ``TrainPreset`` (random resized crop, flip, rotation, colour jitter),
``EpochSampler`` + persistent workers, and ``cvlib.training.step.TrainStep`` (AdamW, warm-up + cosine, label
smoothing, grad clipping, channels_last) on a randomly initialised ResNet-50.

CPU (always): ``--size`` px (128 by default so that a run stays within ~3 minutes on two cores),
precision "auto" (fp32 on the CPU). The model-only batch is one real batch of the same pipeline,
decoded beforehand. One epoch runs step by step, each end-to-end step (its wait for data
included) right after a model-only step, so that both halves of a pair see the same load from
other processes on a shared machine; the ratio is the median of the pairs' ratios, and the
totals (worker start-up and load spikes included) are printed too. Target: end to end >= 90% of
model-only.

GPU (only where CUDA is available): ResNet-50 at 224 px, precision "auto" (bf16, or fp16 with a
grad scaler), batch ``--gpu-batch``, model-only then end to end with ``--gpu-workers`` workers,
pinned memory and the side-stream prefetcher (the steady state of one long epoch: the clock starts
once the workers have filled their queues). Target: 2,500 images/s on an H100.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cvlib.data.datasets import CudaPrefetcher, EpochSampler, ManifestDataset, make_loader
from cvlib.data.options import AugmentConfig
from cvlib.data.transforms import train_preset
from cvlib.models.factory import create_model
from cvlib.models.precision import autocast_dtype, needs_grad_scaler
from cvlib.training.loaders import train_draft_size
from cvlib.training.options import TrainConfig
from cvlib.training.phases import phase_param_groups
from cvlib.training.schedule import phase_scheduler
from cvlib.training.step import TrainStep

CLASSES = 10


def write_jpegs(root: Path, n: int, size: tuple[int, int] = (500, 375), seed: int = 0) -> pd.DataFrame:
    """``n`` photo-like JPEGs (low-frequency colour plus fine noise, so they compress like
    photos rather than like flat fields) in ``CLASSES`` folders; returns a manifest."""
    rng = np.random.default_rng(seed)
    w, h = size
    rows = []
    for i in range(n):
        label = i % CLASSES
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR), dtype=np.int16)
        img = np.clip(base + rng.integers(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8)
        rel = f"c{label}/img_{i:04d}.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / rel, quality=90)
        rows.append({"path": rel, "label": f"c{label}", "label_idx": label, "split": "train", "status": "ok"})
    return pd.DataFrame(rows)


class Trainer:
    """ResNet-50 and the real training step, as fit() builds them."""

    def __init__(self, device: torch.device, batch: int, steps_total: int) -> None:
        torch.manual_seed(0)
        tc = TrainConfig(arch="resnet50", weights="none", epochs=1, batch_size=batch)
        self.device = device
        self.memory_format = torch.channels_last
        self.amp_dtype = autocast_dtype(tc.precision, device)
        model = create_model("resnet50", CLASSES, weights="none").to(device, memory_format=self.memory_format)
        optimizer = torch.optim.AdamW(phase_param_groups(model, tc.weight_decay, lr=tc.lr, backbone_lr=tc.lr), lr=tc.lr,
                                      fused=device.type == "cuda" or None)  # as fit() builds it
        torch.backends.cudnn.benchmark = device.type == "cuda"
        scheduler = phase_scheduler(optimizer, tc.model_copy(update={"warmup_epochs": 0.1}), steps_total, 0)
        scaler = torch.amp.GradScaler(device.type, enabled=needs_grad_scaler(device, self.amp_dtype))
        criterion = torch.nn.CrossEntropyLoss(label_smoothing=tc.label_smoothing)
        self.step = TrainStep(model, optimizer, scheduler, scaler, criterion, device, self.amp_dtype, self.memory_format, tc.grad_clip)
        model.train()

    def sync(self, value: torch.Tensor) -> None:
        value.item()  # waits for the device
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def model_only(self, images: torch.Tensor, targets: torch.Tensor, steps: int) -> list[float]:
        """Seconds of each step (on CUDA, of the whole run: one sync at the end)."""
        times, loss = [], None
        t0 = time.perf_counter()
        for _ in range(steps):
            loss, _ = self.step(images, targets, 0)
            if self.device.type != "cuda":
                times.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
        self.sync(loss)
        return times if times else [time.perf_counter() - t0]

    def end_to_end(self, loader, sampler: EpochSampler, skip: int) -> tuple[list[float], int]:
        """One epoch on CUDA; the clock starts after ``skip`` steps (the workers' start-up and
        first fill), so this is the steady-state rate a long epoch runs at."""
        seen, loss, t0 = 0, None, None
        sampler.set_epoch(0)
        for i, (images, targets) in enumerate(CudaPrefetcher(loader, self.device, self.memory_format)):
            if i == skip:
                self.sync(loss)
                t0 = time.perf_counter()
            loss, _ = self.step(images, targets, 0)
            if t0 is not None:
                seen += targets.shape[0]
        self.sync(loss)
        return [time.perf_counter() - t0], seen

    def paired(self, loader, sampler: EpochSampler, images: torch.Tensor, targets: torch.Tensor) -> tuple[list[float], list[float]]:
        """One epoch, step by step, each end-to-end step (its wait for data included) right
        after a model-only step: a pair sees the same load from other processes. The first
        end-to-end step includes the workers' start-up."""
        model, e2e = [], []
        sampler.set_epoch(0)
        batches = iter(loader)
        for _ in range(len(loader)):
            t0 = time.perf_counter()
            self.step(images, targets, 0)
            t1 = time.perf_counter()
            x, y = next(batches)
            self.step(x, y, 0)
            t2 = time.perf_counter()
            model.append(t1 - t0)
            e2e.append(t2 - t1)
        return model, e2e


def run(device: torch.device, root: Path, manifest: pd.DataFrame, *, size: int, batch: int, workers: int,
        model_steps: int, repeats: int = 1) -> dict[str, float]:
    ac = AugmentConfig(image_size=size)
    manifest = pd.concat([manifest] * repeats, ignore_index=True)  # a long epoch over the same files
    ds = ManifestDataset(root, manifest, "train", train_preset(ac), draft_size=train_draft_size(ac))
    sampler = EpochSampler(ds, seed=0)
    loader = make_loader(ds, batch_size=batch, sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda",
                         persistent_workers=workers > 0, prefetch_factor=2 if workers else None, drop_last=True)
    steps_per_epoch = len(loader)
    trainer = Trainer(device, batch, 2 * model_steps + 2 + 2 * steps_per_epoch + 10)
    # The model-only batch: one real batch of this pipeline, already decoded and in memory.
    images, targets = next(iter(make_loader(ds, batch_size=batch, sampler=EpochSampler(ds, seed=1), num_workers=0)))
    images = images.to(device).contiguous(memory_format=torch.channels_last)
    targets = targets.to(device)
    trainer.model_only(images, targets, 2)  # warm-up: allocator, oneDNN/cuDNN plans, AdamW state
    if device.type == "cuda":
        m = trainer.model_only(images, targets, model_steps)
        e, e_n = trainer.end_to_end(loader, sampler, skip=min(2 * workers, steps_per_epoch // 4))
        out = {"model_only": model_steps * batch / sum(m), "end_to_end": e_n / sum(e)}
    else:
        m, e = trainer.paired(loader, sampler, images, targets)
        out = {
            "model_only": batch / statistics.median(m),
            "end_to_end": batch / statistics.median(e),
            "pair_ratio": statistics.median(a / b for a, b in zip(m, e)),
            "model_only_total": batch * len(m) / sum(m),
            "end_to_end_total": batch * len(e) / sum(e),
            "model_steps": m,
            "e2e_steps": e,
        }
    t0 = time.perf_counter()
    n = 0
    for epoch in range(1, 3):  # the input pipeline alone, warm workers: its ceiling
        sampler.set_epoch(epoch)
        for x, _ in loader:
            n += x.shape[0]
    out["pipeline_only"] = n / (time.perf_counter() - t0)
    del loader
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=256, help="JPEGs for the CPU run (one epoch)")
    p.add_argument("--size", type=int, default=128, help="CPU image size")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="CPU run's DataLoader workers")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--gpu-batch", type=int, default=256)
    p.add_argument("--gpu-steps", type=int, default=40)
    p.add_argument("--gpu-workers", type=int, default=min(12, os.cpu_count() or 1))
    p.add_argument("--gpu-images", type=int, default=3072, help="JPEGs for the GPU run (12 steps an epoch at batch 256)")
    p.add_argument("--gpu-repeats", type=int, default=8, help="the GPU epoch visits each file this many times")
    p.add_argument("--skip-cpu", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="vf-train-bench-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        manifest = write_jpegs(root / "cpu", args.images)
        mb = sum(f.stat().st_size for f in (root / "cpu").rglob("*.jpg")) / 1e6
        print(f"data: {args.images} JPEGs 500x375 ({mb:.1f} MB) written in {time.perf_counter() - t0:.1f}s")
        print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, {os.cpu_count()} CPUs")
        rows = []
        if not args.skip_cpu:
            cpu = torch.device("cpu")
            ac = AugmentConfig(image_size=args.size)
            prec = autocast_dtype("auto", cpu)
            print(f"CPU: ResNet-50 at {args.size} px, batch {args.batch}, precision auto "
                  f"({'fp32' if prec is None else prec}), channels_last, {args.workers} workers, "
                  f"JPEG draft to >= {train_draft_size(ac)} px, 1 epoch of {args.images // args.batch} steps, "
                  "each end-to-end step paired with a model-only step")
            r = run(cpu, root / "cpu", manifest, size=args.size, batch=args.batch, workers=args.workers,
                    model_steps=0)
            rows.append((f"CPU {args.size}px b{args.batch}", r, 0.90, None))
        if torch.cuda.is_available():
            gpu = torch.device("cuda")
            name = torch.cuda.get_device_name(gpu)
            prec = autocast_dtype("auto", gpu)
            print(f"GPU: {name}, ResNet-50 at 224 px, batch {args.gpu_batch}, precision auto ({prec}), channels_last, "
                  f"{args.gpu_workers} workers, pinned memory + side-stream copies, end to end: steady state of one epoch "
                  f"of {args.gpu_images * args.gpu_repeats // args.gpu_batch} steps")
            gpu_root = root / "gpu"
            gpu_manifest = write_jpegs(gpu_root, args.gpu_images, seed=1)
            r = run(gpu, gpu_root, gpu_manifest, size=224, batch=args.gpu_batch, workers=args.gpu_workers,
                    model_steps=args.gpu_steps, repeats=args.gpu_repeats)
            rows.append((f"GPU 224px b{args.gpu_batch}", r, 0.90, 2500.0))
        else:
            print("GPU: skipped (CUDA not available); on an H100 the target is 2,500 images/s at 224 px with AMP")

    print()
    print(f"{'run':<16} {'model-only':>11} {'end-to-end':>11} {'ratio':>7} {'target':>9}  {'verdict':<13} {'input alone':>11}")
    for label, r, ratio_target, abs_target in rows:
        ratio = r.get("pair_ratio", r["end_to_end"] / r["model_only"])
        ok = ratio >= ratio_target and (abs_target is None or r["end_to_end"] >= abs_target)
        target = f">={ratio_target:.0%}" if abs_target is None else f">={abs_target:,.0f}/s"
        print(f"{label:<16} {r['model_only']:>11.2f} {r['end_to_end']:>11.2f} {ratio:>6.1%} {target:>9}  "
              f"{'OK' if ok else 'BELOW TARGET':<13} {r['pipeline_only']:>11.1f}")
    print("(images/s; 'input alone': the DataLoader with its workers and no model, the pipeline's ceiling)")
    cpu = [r for _, r, _, _ in rows if "model_steps" in r]
    if cpu:
        r = cpu[0]
        total = r["end_to_end_total"] / r["model_only_total"]
        print("\nCPU: rates are per-step medians and the ratio the median of per-pair ratios (a model-only step,")
        print("then an end-to-end step), robust to load from other processes on a shared machine. Totals:")
        print(f"model-only {r['model_only_total']:.2f}, end-to-end {r['end_to_end_total']:.2f} images/s ({total:.1%}, "
              "worker start-up and load spikes included).")
        print("seconds per step, model-only: " + ", ".join(f"{t:.2f}" for t in r["model_steps"]))
        print("                  end-to-end: " + ", ".join(f"{t:.2f}" for t in r["e2e_steps"]))

if __name__ == "__main__":
    main()
