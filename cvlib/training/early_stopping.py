"""Early stopping: end a run whose monitored validation metric stopped improving
(``TrainConfig.early_stopping_*``). Its state lives in ``last.pt``, so a run that stopped early
stays stopped when it is resumed."""

from __future__ import annotations

import math
from typing import Any

from cvlib.training.options import TrainConfig
from cvlib.training.records import EpochRecord


class EarlyStopping:
    """Counts epochs without improvement of the monitored metric and marks the run stopped when
    the patience is spent (not on the last epoch, which ends the run anyway)."""

    def __init__(self, tc: TrainConfig) -> None:
        self.monitor = tc.early_stopping_monitor
        self.min_delta = tc.early_stopping_min_delta
        self.patience = tc.early_stopping_patience
        self.epochs = tc.epochs
        self.best: float | None = None
        self.bad_epochs = 0
        self.stopped = False
        self.reason: str | None = None

    def update(self, record: EpochRecord) -> None:
        value = getattr(record, self.monitor)
        if not math.isnan(value) and (self.best is None or self._improves(value, self.best)):
            self.best, self.bad_epochs = float(value), 0
        else:
            self.bad_epochs += 1
        if self.patience is not None and self.bad_epochs >= self.patience and record.epoch < self.epochs:
            self.stopped = True
            self.reason = f"{self.monitor} did not improve for {self.bad_epochs} epochs; stopped after epoch {record.epoch}"

    def _improves(self, value: float, best: float) -> bool:
        if self.monitor == "val_top1":  # higher is better
            return value > best + self.min_delta
        return value < best - self.min_delta

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_epochs": self.bad_epochs, "stopped": self.stopped, "reason": self.reason}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Checkpoints may hold only some of the keys (an older visionflow): the rest keep their start values."""
        self.best = state.get("best", self.best)
        self.bad_epochs = state.get("bad_epochs", self.bad_epochs)
        self.stopped = state.get("stopped", self.stopped)
        self.reason = state.get("reason", self.reason)
