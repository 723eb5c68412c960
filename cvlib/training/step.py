"""One optimisation step: forward under autocast, label-smoothed loss (on MixUp/CutMix targets
when on), a divergence check, backward through the grad scaler, gradient clipping, the optimizer
and scheduler steps, and the EMA update."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cvlib.models.precision import autocast
from cvlib.training import distributed as dist_
from cvlib.training.ema import ModelEma

# On CUDA the loss is checked for NaN every this many steps (a check is a host-device sync that
# would otherwise stall the GPU every step); on the CPU every step, where a check is free.
CUDA_CHECK_EVERY = 16


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite: the run must fail and nothing may be registered."""


@dataclass
class TrainStep:
    """One optimisation step, with everything it needs held together. Its counters start at 0:
    build one per epoch (``dataclasses.replace`` with the epoch's model)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    device: torch.device
    amp_dtype: torch.dtype | None
    memory_format: torch.memory_format
    grad_clip: float | None
    mixer: Callable | None = None
    ema: ModelEma | None = None
    ema_source: nn.Module | None = None  # the unwrapped model (not its DDP wrapper)
    check_every: int = 0  # 0: every step on the CPU, CUDA_CHECK_EVERY on CUDA

    def __post_init__(self) -> None:
        if self.check_every <= 0:
            self.check_every = CUDA_CHECK_EVERY if self.device.type == "cuda" else 1
        self.calls = 0
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the batch's mean loss and number of correct top-1 predictions, as tensors on
        the device (reading them is a sync the caller decides when to pay)."""
        images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
        targets = targets.to(self.device, non_blocking=True)
        labels = targets
        if self.mixer is not None:
            images, targets = self.mixer(images, targets)
            images = images.contiguous(memory_format=self.memory_format)
        with autocast(self.device, self.amp_dtype):
            logits = self.model(images)
            loss = self.criterion(logits.float(), targets)
        self._nonfinite |= ~torch.isfinite(loss.detach())
        self.calls += 1
        if self.calls % self.check_every == 0:
            self.check(epoch)  # before the step: a bad batch never reaches the weights
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.ema_source if self.ema_source is not None else self.model)
        return loss.detach(), (logits.detach().argmax(1) == labels).sum()

    def check(self, epoch: int) -> None:
        """Raise on every rank at once if the loss was NaN or infinite on any rank."""
        if dist_.any_rank(self._nonfinite):
            raise TrainingDivergedError(f"the loss became NaN or infinite at epoch {epoch + 1}; nothing will be registered")
