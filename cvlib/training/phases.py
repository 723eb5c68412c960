"""The two phases of a fine-tune from pretrained weights, torchvision's recipe: the head alone
first (backbone frozen, its BatchNorm statistics too), then the whole network with a lower
learning rate for the backbone. From random initialisation there is one phase, at one rate.

The optimizer holds every parameter from the start, in head and backbone groups, so its shape
never changes across the phase boundary and a checkpoint from either phase loads.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from cvlib.models.factory import head_parameters
from cvlib.training.distributed import wrap_ddp
from cvlib.training.options import TrainConfig


def uses_pretrained_weights(tc: TrainConfig) -> bool:
    return str(tc.weights).lower() not in ("none", "")


def resolved_head_epochs(tc: TrainConfig) -> int:
    """Epochs of the head-only phase: the configured number, or 1 with pretrained weights
    (never the whole run) and 0 from random initialisation. ``freeze_backbone`` makes every
    epoch a head epoch."""
    if tc.freeze_backbone:
        return tc.epochs
    if tc.head_epochs is not None:
        return min(tc.head_epochs, tc.epochs)
    return 1 if uses_pretrained_weights(tc) and tc.epochs > 1 else 0


def resolved_backbone_lr_ratio(tc: TrainConfig) -> float:
    if tc.backbone_lr_ratio is not None:
        return tc.backbone_lr_ratio
    return 0.1 if uses_pretrained_weights(tc) else 1.0


def phase_param_groups(model: nn.Module, weight_decay: float, *, lr: float, backbone_lr: float) -> list[dict[str, Any]]:
    """Head and backbone, each split decay / no decay (1-D tensors: biases and normalisation
    weights, which decay would only fight the normalisation), in that order; empty groups are
    left out. Every parameter is included, trainable now or not: the backbone joins the
    optimisation when its phase starts, without changing the optimizer's shape (so a checkpoint
    from either phase loads). Each group carries a ``name`` (``head.decay``...)."""
    head = {id(p) for p in head_parameters(model)}
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {
        ("head", True): [], ("head", False): [], ("backbone", True): [], ("backbone", False): []
    }  # fmt: skip
    for p in model.parameters():
        buckets[("head" if id(p) in head else "backbone", p.ndim > 1)].append(p)
    groups = []
    for (role, decay), params in buckets.items():
        if params:
            groups.append(
                {
                    "params": params,
                    "weight_decay": weight_decay if decay else 0.0,
                    "lr": lr if role == "head" else backbone_lr,
                    "name": f"{role}.{'decay' if decay else 'no_decay'}",
                }
            )
    return groups


class Phases:
    """Puts the model into the phase of each epoch: freezes or unfreezes the backbone when the
    phase changes, and (under DDP) wraps the model anew, since DDP fixes the set of parameters it
    synchronises when it is built."""

    def __init__(self, model: nn.Module, head_epochs: int, device: torch.device, distributed: bool) -> None:
        self.model = model
        self.head_epochs = head_epochs
        self.device = device
        self.distributed = distributed
        self._head_ids = {id(p) for p in head_parameters(model)}
        self._head_only: bool | None = None
        self._train_model: nn.Module = model
        self._frozen_norms: list[nn.Module] = []

    def enter(self, epoch: int) -> tuple[nn.Module, list[nn.Module]]:
        """The module to train this epoch (the model or its DDP wrapper) and the BatchNorm layers
        to keep in eval mode."""
        head_only = epoch < self.head_epochs
        if self._head_only != head_only:
            self._head_only = head_only
            self._frozen_norms = _set_backbone_trainable(self.model, self._head_ids, not head_only)
            self._train_model = wrap_ddp(self.model, self.device) if self.distributed else self.model
        return self._train_model, self._frozen_norms


def _set_backbone_trainable(model: nn.Module, head_ids: set[int], trainable: bool) -> list[nn.Module]:
    """Freeze or unfreeze every parameter outside the head. Returns the backbone's BatchNorm
    layers to keep in eval mode while frozen (a frozen backbone keeps its running statistics)."""
    for p in model.parameters():
        if id(p) not in head_ids:
            p.requires_grad_(trainable)
    if trainable:
        return []
    return [
        m for m in model.modules()
        if isinstance(m, _BatchNorm) and not any(id(p) in head_ids for p in m.parameters(recurse=False))
    ]  # fmt: skip
