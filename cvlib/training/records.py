"""What a training run reports: one record per epoch, and the result of the whole run.

Plain dataclasses of numbers and strings, so that they go into a checkpoint (``asdict``, read back
with ``torch.load(weights_only=True)``), into MLflow metrics and into JSON unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class EpochRecord:
    epoch: int  # 1-based
    train_loss: float
    train_top1: float
    val_loss: float
    val_top1: float
    val_top5: float
    lr: float  # the head's learning rate at the end of the epoch
    seconds: float
    backbone_lr: float = float("nan")  # 0 while the backbone is frozen


@dataclass
class FitResult:
    best_checkpoint: str
    last_checkpoint: str
    best_epoch: int
    best_val_top1: float
    history: list[EpochRecord] = field(default_factory=list)
    device: str = "cpu"
    stopped_early: bool = False
    stop_reason: str | None = None
    world_size: int = 1

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["history"] = [asdict(h) for h in self.history]
        return d
