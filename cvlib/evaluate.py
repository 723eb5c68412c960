"""Validation: loss, top-1 and top-5 accuracy, and the raw predictions behind them."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader


@dataclass
class Evaluation:
    loss: float
    top1: float
    top5: float
    n: int
    targets: np.ndarray = field(repr=False)
    probs: np.ndarray = field(repr=False)  # (n, classes) softmax probabilities

    @property
    def preds(self) -> np.ndarray:
        return self.probs.argmax(axis=1)

    def metrics(self, prefix: str = "val_") -> dict[str, float]:
        return {f"{prefix}loss": self.loss, f"{prefix}top1": self.top1, f"{prefix}top5": self.top5}


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> Evaluation:
    """Evaluate in eval mode and restore the model's previous mode afterwards."""
    was_training = model.training
    model.eval()
    losses, all_targets, all_probs = [], [], []
    try:
        for images, targets in loader:
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            logits = model(images).float()
            losses.append(nn.functional.cross_entropy(logits, targets, reduction="sum").item())
            all_probs.append(torch.softmax(logits, dim=1).cpu())
            all_targets.append(targets.cpu())
    finally:
        model.train(was_training)
    if not all_targets:
        return Evaluation(float("nan"), float("nan"), float("nan"), 0, np.zeros(0, int), np.zeros((0, 0)))
    probs = torch.cat(all_probs)
    targets = torch.cat(all_targets)
    k = min(5, probs.shape[1])
    topk = probs.topk(k, dim=1).indices
    top1 = (topk[:, 0] == targets).float().mean().item()
    top5 = (topk == targets[:, None]).any(dim=1).float().mean().item()
    n = len(targets)
    return Evaluation(sum(losses) / n, top1, top5, n, targets.numpy(), probs.numpy())
