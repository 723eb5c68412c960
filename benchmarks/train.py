"""Training throughput end to end (JPEG files on disk -> decode -> augmentation -> DataLoader
workers -> training step) against the model-only step rate (same model, batch, precision and
step, on a batch already in memory), side by side in one run.

    .venv/bin/python benchmarks/train.py [--images 256] [--size 128] [--batch 32] [--workers 2]
                                         [--blocks 4] [--block-steps 6] [--threads N]
                                         [--gpu-batch 256] [--gpu-block-steps 20] [--gpu-workers 12]
                                         [--gpu-images 3072]

It writes ``--images`` JPEGs of 500x375 (smooth colour fields with texture, quality 90) to a
temporary folder, then runs visionflow's own pieces: ``ManifestDataset`` with the training draft
size, the default ``TrainPreset`` (random resized crop, flip, rotation, colour jitter),
``EpochSampler`` + persistent workers, and ``cvlib.training.step.TrainStep`` (AdamW, warm-up + cosine, label
smoothing, grad clipping, channels_last) on a randomly initialised ResNet-50.

Both arms are timed in separate, alternating blocks (A B A B ...: ``--block-steps`` model-only
steps, then as many end-to-end steps, ``--blocks`` times each), so that both see the same load
from other processes on a shared machine and neither lends the other its time. (Before, each
end-to-end step ran right after a model-only step, during which the DataLoader workers kept
decoding: the input pipeline got the model-only step's time for free and looked twice as fast
as it is.) Each block starts with warm-up steps that are not timed: one for a model-only block,
and for an end-to-end block as many as the workers hold prefetched (``workers x
prefetch_factor``), the batches they filled while the model-only block ran. What is timed is
then the steady state of a long epoch. Printed: the median rate of each arm over its blocks,
their ratio, and each block's rate.

CPU (always): ``--size`` px (128 by default so that a run stays within ~3 minutes on two cores),
precision "auto" (fp32 on the CPU). The model-only batch is one real batch of the same pipeline,
decoded beforehand. Target: end to end >= 90% of model-only.

GPU (only where CUDA is available): ResNet-50 at 224 px, precision "auto" (bf16, or fp16 with a
grad scaler), batch ``--gpu-batch``, ``--gpu-workers`` workers, pinned memory and the
side-stream prefetcher, blocks of ``--gpu-block-steps`` (one device sync at each block's start
and end). Target: 2,500 images/s on an H100.
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

    def block(self, batches, steps: int, warmup: int) -> float:
        """Seconds of ``steps`` training steps on ``batches`` after ``warmup`` untimed ones (the
        device synced at both ends, so queued GPU work is counted in the block it belongs to)."""
        loss = None
        for _ in range(warmup):
            loss, _ = self.step(*next(batches), 0)
        if loss is not None:
            self.sync(loss)
        t0 = time.perf_counter()
        for _ in range(steps):
            loss, _ = self.step(*next(batches), 0)
        self.sync(loss)
        return time.perf_counter() - t0


def _forever(x: torch.Tensor, y: torch.Tensor):
    while True:
        yield x, y


def run(device: torch.device, root: Path, manifest: pd.DataFrame, *, size: int, batch: int, workers: int,
        blocks: int, block_steps: int) -> dict:
    """Alternating blocks: model-only (one real batch in memory), then end to end (the loader, its
    wait for data included), ``blocks`` times. Rates in images/s."""
    ac = AugmentConfig(image_size=size)
    prefetch = 2
    warm_e2e = max(1, workers * prefetch)  # batches the workers queued while the model-only block ran
    need = blocks * (block_steps + warm_e2e) + 1
    repeats = max(1, -(-need * batch // len(manifest)))
    manifest = pd.concat([manifest] * repeats, ignore_index=True)  # one long epoch over the same files
    ds = ManifestDataset(root, manifest, "train", train_preset(ac), draft_size=train_draft_size(ac))
    sampler = EpochSampler(ds, seed=0)
    loader = make_loader(ds, batch_size=batch, sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda",
                         persistent_workers=workers > 0, prefetch_factor=prefetch if workers else None, drop_last=True)
    trainer = Trainer(device, batch, blocks * (2 * block_steps + warm_e2e + 1) + 10)
    # The model-only batch: one real batch of this pipeline, already decoded and in memory.
    images, targets = next(iter(make_loader(ds, batch_size=batch, sampler=EpochSampler(ds, seed=1), num_workers=0)))
    images = images.to(device).contiguous(memory_format=torch.channels_last)
    targets = targets.to(device)
    memory = _forever(images, targets)
    trainer.block(memory, 2, 0)  # warm-up: allocator, oneDNN/cuDNN plans, AdamW state
    sampler.set_epoch(0)
    stream = iter(CudaPrefetcher(loader, device, trainer.memory_format) if device.type == "cuda" else loader)
    model, e2e = [], []
    for b in range(blocks):
        model.append(batch * block_steps / trainer.block(memory, block_steps, 1))
        e2e.append(batch * block_steps / trainer.block(stream, block_steps, warm_e2e))
        print(f"  block {b + 1}/{blocks}: model-only {model[-1]:.1f}, end to end {e2e[-1]:.1f} images/s; "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)
    m, e = statistics.median(model), statistics.median(e2e)
    out = {"model_only": m, "end_to_end": e, "ratio": e / m, "pair_ratio": statistics.median(b / a for a, b in zip(model, e2e)),
           "model_blocks": model, "e2e_blocks": e2e, "warm_e2e": warm_e2e}
    del stream
    t0 = time.perf_counter()
    n = 0
    for epoch in range(1, 2):  # the input pipeline alone, warm workers: its ceiling
        sampler.set_epoch(epoch)
        for x, _ in loader:
            n += x.shape[0]
    out["pipeline_only"] = n / (time.perf_counter() - t0)
    del loader
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=256, help="JPEGs for the CPU run (visited as often as the blocks need)")
    p.add_argument("--size", type=int, default=128, help="CPU image size")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="CPU run's DataLoader workers")
    p.add_argument("--blocks", type=int, default=4, help="blocks per arm (A B A B ...)")
    p.add_argument("--block-steps", type=int, default=6, help="timed CPU steps per block")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--gpu-batch", type=int, default=256)
    p.add_argument("--gpu-block-steps", type=int, default=20, help="timed GPU steps per block")
    p.add_argument("--gpu-workers", type=int, default=min(12, os.cpu_count() or 1))
    p.add_argument("--gpu-images", type=int, default=3072, help="JPEGs for the GPU run")
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
                  f"JPEG draft to >= {train_draft_size(ac)} px, {args.blocks} alternating blocks per arm of "
                  f"{args.block_steps} timed steps")
            r = run(cpu, root / "cpu", manifest, size=args.size, batch=args.batch, workers=args.workers,
                    blocks=args.blocks, block_steps=args.block_steps)
            rows.append((f"CPU {args.size}px b{args.batch}", r, 0.90, None))
        if torch.cuda.is_available():
            gpu = torch.device("cuda")
            name = torch.cuda.get_device_name(gpu)
            prec = autocast_dtype("auto", gpu)
            print(f"GPU: {name}, ResNet-50 at 224 px, batch {args.gpu_batch}, precision auto ({prec}), channels_last, "
                  f"{args.gpu_workers} workers, pinned memory + side-stream copies, {args.blocks} alternating blocks "
                  f"per arm of {args.gpu_block_steps} timed steps")
            gpu_root = root / "gpu"
            gpu_manifest = write_jpegs(gpu_root, args.gpu_images, seed=1)
            r = run(gpu, gpu_root, gpu_manifest, size=224, batch=args.gpu_batch, workers=args.gpu_workers,
                    blocks=args.blocks, block_steps=args.gpu_block_steps)
            rows.append((f"GPU 224px b{args.gpu_batch}", r, 0.90, 2500.0))
        else:
            print("GPU: skipped (CUDA not available); on an H100 the target is 2,500 images/s at 224 px with AMP")

    print()
    print(f"{'run':<16} {'model-only':>11} {'end-to-end':>11} {'ratio':>7} {'target':>9}  {'verdict':<13} {'input alone':>11}")
    for label, r, ratio_target, abs_target in rows:
        ok = r["ratio"] >= ratio_target and (abs_target is None or r["end_to_end"] >= abs_target)
        target = f">={ratio_target:.0%}" if abs_target is None else f">={abs_target:,.0f}/s"
        print(f"{label:<16} {r['model_only']:>11.2f} {r['end_to_end']:>11.2f} {r['ratio']:>6.1%} {target:>9}  "
              f"{'OK' if ok else 'BELOW TARGET':<13} {r['pipeline_only']:>11.1f}")
    print("(images/s, medians over the blocks of each arm; ratio = end-to-end / model-only medians;")
    print(" 'input alone': the DataLoader with its workers and no model, the pipeline's ceiling)")
    for label, r, _, _ in rows:
        print(f"\n{label}: per-block rates (A = model-only, B = end to end, in the order they ran; "
              f"{r['warm_e2e']} untimed warm-up steps opened each B block)")
        print("  " + "  ".join(f"A {a:.1f}  B {b:.1f}" for a, b in zip(r["model_blocks"], r["e2e_blocks"])))
        print(f"  median of the adjacent (A, B) pairs' ratios: {r['pair_ratio']:.1%}")


if __name__ == "__main__":
    main()
