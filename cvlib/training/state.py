"""Where a run stands, and the checkpoints that record it: ``last.pt`` holds everything a resumed
run needs to continue bit for bit (weights, optimizer, schedule, grad scaler, EMA, history,
early stopping); ``best.pt`` holds only the weights that validated best, with the metadata a
model package needs."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from cvlib.training.early_stopping import EarlyStopping
from cvlib.training.ema import ModelEma
from cvlib.training.records import EpochRecord
from cvlib.training.step import TrainStep


@dataclass
class Progress:
    """Completed epochs, the best one so far, and early stopping's count."""

    stopping: EarlyStopping
    epoch: int = 0  # epochs completed
    best_top1: float = -1.0
    best_epoch: int = 0
    history: list[EpochRecord] = field(default_factory=list)

    def add(self, record: EpochRecord) -> bool:
        """Count a finished epoch; True when it is the new best (the first epoch always is,
        even without a validation split)."""
        self.history.append(record)
        self.epoch = record.epoch
        top1 = record.val_top1
        best = (not math.isnan(top1) and top1 > self.best_top1) or self.best_epoch == 0
        if best:
            self.best_top1, self.best_epoch = (top1 if not math.isnan(top1) else self.best_top1), record.epoch
        self.stopping.update(record)
        return best


def last_state(step: TrainStep, progress: Progress, meta: dict[str, Any], seed: int) -> dict[str, Any]:
    """The content of ``last.pt``; ``step`` is the template step, whose model is unwrapped."""
    state = {
        "model": step.model.state_dict(),
        "optimizer": step.optimizer.state_dict(),
        "scheduler": step.scheduler.state_dict(),
        "scaler": step.scaler.state_dict(),
        "epoch": progress.epoch,
        "best_val_top1": progress.best_top1,
        "best_epoch": progress.best_epoch,
        "history": [asdict(h) for h in progress.history],
        "early_stopping": progress.stopping.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "numpy_seed": int(seed)},
        "meta": meta,
    }
    if step.ema is not None:
        state["ema"] = step.ema.state_dict()
    return state


def best_state(step: TrainStep, last: dict[str, Any]) -> dict[str, Any]:
    """The content of ``best.pt`` when the epoch of ``last`` is the best: the EMA's weights
    when it is on (what was validated), else the model's."""
    weights = step.ema.module.state_dict() if step.ema is not None else last["model"]
    return {"model": weights, "meta": last["meta"], "epoch": last["epoch"]}


def restore(step: TrainStep, progress: Progress, state: dict[str, Any], path: str | os.PathLike[str]) -> TrainStep:
    """Load ``last.pt``'s ``state`` (read from ``path``) into the template step and ``progress``.
    Returns the step to continue with: with EMA switched on since the checkpoint, a new average
    starts from the restored weights."""
    step.model.load_state_dict(state["model"])
    try:
        step.optimizer.load_state_dict(state["optimizer"])
    except ValueError as exc:
        raise ValueError(
            f"{path} was written with other optimizer parameter groups (an older visionflow or another "
            f"model); resume needs the same configuration, or use a new output folder: {exc}"
        ) from exc
    step.scheduler.load_state_dict(state["scheduler"])
    if "scaler" in state:
        step.scaler.load_state_dict(state["scaler"])
    if step.ema is not None and "ema" in state:
        step.ema.load_state_dict(state["ema"])
    elif step.ema is not None:
        step = replace(step, ema=ModelEma(step.model, step.ema.decay))
    progress.epoch = int(state["epoch"])
    progress.best_top1, progress.best_epoch = float(state["best_val_top1"]), int(state["best_epoch"])
    progress.history = [EpochRecord(**h) for h in state["history"]]
    progress.stopping.load_state_dict(state.get("early_stopping", {}))
    return step
