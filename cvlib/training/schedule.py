"""Learning-rate schedule: linear warm-up, then cosine decay to a floor, stepped per iteration
(the notebook stepped per epoch, which makes short runs jump between plateaus)."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine_factor(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    # The last optimizer step is total_steps - 1: that step, not the one after, uses the floor.
    decay_steps = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: Optimizer, *, warmup_steps: int, total_steps: int, min_ratio: float) -> LambdaLR:
    def factor(step: int) -> float:
        return warmup_cosine_factor(step, warmup_steps=warmup_steps, total_steps=total_steps, min_ratio=min_ratio)

    return LambdaLR(optimizer, factor)
