"""An exponential moving average of the weights, validated and saved as best when it is on
(``TrainConfig.ema_decay``): it smooths the noise of the last steps, as torchvision's recipe does."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


class ModelEma:
    """Exponential moving average of a model's weights and buffers (BatchNorm statistics), on
    ``torch.optim.swa_utils.AveragedModel``. The decay warms up as ``min(decay, (1 + n) / (10 + n))``
    over the first updates ``n``, so that a short fine-tune's average is not dominated by the
    initial weights."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.averaged = AveragedModel(model, multi_avg_fn=self._average, use_buffers=True)
        self.averaged.requires_grad_(False)

    @property
    def module(self) -> nn.Module:
        return self.averaged.module

    @torch.no_grad()
    def _average(self, ema: list[torch.Tensor], current: list[torch.Tensor], _n: Any) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        if torch.is_floating_point(ema[0]):
            torch._foreach_lerp_(ema, current, 1.0 - d)
        else:  # integer buffers (BatchNorm's num_batches_tracked): follow the model
            for e, c in zip(ema, current, strict=True):
                e.copy_(c)

    def update(self, model: nn.Module) -> None:
        self.averaged.update_parameters(model)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.averaged.load_state_dict(state)
        self.updates = int(self.averaged.n_averaged.item())
