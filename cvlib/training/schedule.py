"""Learning-rate schedule: linear warm-up, then cosine decay to a floor, stepped per iteration
(the notebook stepped per epoch, which makes short runs jump between plateaus). Backbone groups
follow the same curve from the end of the head-only phase (see :mod:`cvlib.training.phases`)."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from cvlib.training.options import TrainConfig


def warmup_cosine_factor(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    # The last optimizer step is total_steps - 1: that step, not the one after, uses the floor.
    decay_steps = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def phase_scheduler(optimizer: Optimizer, tc: TrainConfig, steps_per_epoch: int, head_epochs: int) -> LambdaLR:
    """Warm-up + cosine per iteration for every group. Backbone groups (named ``backbone...``)
    stay at 0 through the head phase, then warm up again over ``warmup_epochs`` from where the
    phase ends (a fresh optimizer state meets a pretrained backbone gently) and follow the same
    cosine. Unnamed groups count as head groups."""
    total = steps_per_epoch * tc.epochs
    warmup = round(tc.warmup_epochs * steps_per_epoch)
    head_steps = steps_per_epoch * head_epochs

    def head(step: int) -> float:
        return warmup_cosine_factor(step, warmup_steps=warmup, total_steps=total, min_ratio=tc.min_lr_ratio)

    def backbone(step: int) -> float:
        if step < head_steps:
            return 0.0
        factor = head(step)
        if head_steps > 0 and warmup > 0:
            factor *= min(1.0, (step - head_steps + 1) / warmup)
        return factor

    lambdas = [head if g.get("name", "head").startswith("head") else backbone for g in optimizer.param_groups]
    return LambdaLR(optimizer, lambdas)


def last_step_lr(scheduler: LambdaLR, prefix: str) -> float:
    """The learning rate the epoch's last optimizer step used in the first group named
    ``prefix...`` (the lr now in the optimizer is the next step's: across the phase boundary the
    two differ)."""
    step = max(scheduler.last_epoch - 1, 0)
    for g, factor in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        if str(g.get("name", "")).startswith(prefix):
            return float(g["initial_lr"] * factor(step))
    return float("nan")
