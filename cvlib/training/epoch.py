"""One epoch: train on this rank's shard, then validate (sharded under DDP and reduced, so every
rank reports the numbers of the whole validation split)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import replace

import torch
from torch import nn

from cvlib.data.datasets import CudaPrefetcher
from cvlib.training import distributed as dist_
from cvlib.training.evaluate import evaluate
from cvlib.training.loaders import TrainingData
from cvlib.training.phases import Phases
from cvlib.training.records import EpochRecord
from cvlib.training.schedule import last_step_lr
from cvlib.training.seeding import seed_epoch
from cvlib.training.step import TrainStep


def run_epoch(epoch: int, step: TrainStep, phases: Phases, data: TrainingData, *, epochs: int, progress: bool) -> EpochRecord:
    """Train and validate epoch ``epoch`` (0-based) of ``epochs``; ``step`` is the template each
    epoch's step is built from."""
    dinfo = dist_.info()
    t0 = time.perf_counter()
    train_model, frozen_norms = phases.enter(epoch)
    seed_epoch(data.base_seed, epoch, dinfo.rank)
    data.sampler.set_epoch(epoch)
    epoch_step = replace(step, model=train_model)
    batches = CudaPrefetcher(data.train_loader, step.device, step.memory_format)
    train_loss, train_top1 = train_one_epoch(epoch_step, batches, epoch, epochs, progress and dinfo.is_main, frozen_norms)
    if dinfo.distributed:  # BatchNorm statistics: rank 0's, everywhere
        dist_.broadcast_buffers(phases.model)
        if step.ema is not None:
            dist_.broadcast_buffers(step.ema.module)
    evaluated = step.ema.module if step.ema is not None else phases.model
    val_loss, val_top1, val_top5 = validate_on_ranks(evaluated, data.val_loader, step, dinfo.distributed)
    return EpochRecord(
        epoch=epoch + 1,
        train_loss=train_loss,
        train_top1=train_top1,
        val_loss=val_loss,
        val_top1=val_top1,
        val_top5=val_top5,
        lr=last_step_lr(step.scheduler, "head."),
        seconds=time.perf_counter() - t0,
        backbone_lr=last_step_lr(step.scheduler, "backbone."),
    )


def train_one_epoch(
    step: TrainStep, loader: Iterable, epoch: int, epochs: int, progress: bool, frozen_norms: Sequence[nn.Module] = ()
) -> tuple[float, float]:
    """Mean loss and top-1 accuracy over every rank's batches. Losses and hits add up on the
    device and are read once at the end (and every ``check_every`` steps for the progress bar)."""
    step.model.train()
    for m in frozen_norms:
        m.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=step.device)
    correct = torch.zeros((), dtype=torch.int64, device=step.device)
    seen = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True, disable=None)  # None: off when not a terminal
    try:
        for images, targets in loader:
            loss, hits = step(images, targets, epoch)
            n = targets.shape[0]
            loss_sum += loss.double() * n
            correct += hits
            seen += n
            if bar is not None:
                bar.update(1)
                if step.calls % step.check_every == 0:
                    bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", lr=f"{step.optimizer.param_groups[0]['lr']:.2e}")
        step.check(epoch)
    finally:
        if bar is not None:
            bar.close()
    total_loss, total_correct, total_seen = dist_.all_reduce_sum([loss_sum.item(), correct.item(), seen])
    return total_loss / max(total_seen, 1), total_correct / max(total_seen, 1)


def validate_on_ranks(model: nn.Module, loader: Iterable, step: TrainStep, distributed: bool) -> tuple[float, float, float]:
    """Loss, top-1 and top-5 on the validation split, in the step's precision and memory format;
    under DDP each rank evaluates its shard and the sums are reduced (NaN when the split is empty)."""
    ev = evaluate(model, loader, step.device, amp_dtype=step.amp_dtype, memory_format=step.memory_format)
    if not distributed:
        return ev.loss, ev.top1, ev.top5
    n = ev.n
    sums = [0.0, 0.0, 0.0, 0.0] if n == 0 else [ev.loss * n, round(ev.top1 * n), round(ev.top5 * n), n]
    loss_sum, top1, top5, total = dist_.all_reduce_sum(sums)
    if total == 0:
        return float("nan"), float("nan"), float("nan")
    return loss_sum / total, top1 / total, top5 / total
