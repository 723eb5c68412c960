"""The notebook's SimpleCNN (Part 2.1), made into a model visionflow can train, package and serve.

Why a from-scratch CNN next to torchvision's backbones: with no pretrained weights (offline
machines), a ResNet-50 trained from random initialisation on a small data set is slow and
overfits; three conv blocks train in seconds on a CPU and are the right size for small grey or
colour images (digits, icons, defects on a patch). They are also the easiest model to open up:
:mod:`cvlib.explain.featuremaps` shows what each block responds to.

Changes from the notebook, each for a reason:

* ``AdaptiveAvgPool2d(1)`` before the head instead of ``Linear(128 * 3 * 3, ...)``: the notebook's
  head only fitted 28 px inputs; pooling makes any input of at least 8 px work (three 2x2 max
  pools take 8 px to 1 px), so the same model serves 28, 32 or 64 px data.
* ``in_channels`` and ``width`` are parameters: visionflow feeds RGB (grey images are decoded to
  RGB), and a notebook user may want 1 channel.
* The blocks live in ``features`` (named ``block1``..``block3``, each ``conv``/``bn``/``relu``/
  ``pool``) so that Grad-CAM's default target layer rule (the last block of ``features``) and
  feature-map layer names (``features.block1.relu``) work without special cases.
* The head is ``fc``, built by :func:`cvlib.models.factory.transfer_head` (Dropout -> Linear -> ReLU ->
  Dropout -> Linear): the same head and the same state-dict keys as every other visionflow model,
  so ``create_model("simple_cnn", ...)`` can treat it like a torchvision backbone whose last layer
  is ``fc``.

This module is part of the pure library: torch only.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from cvlib.models.heads import transfer_head

__all__ = ["SimpleCNN", "build_simple_cnn"]

MIN_INPUT_SIZE = 8  # three 2x2 max pools: 8 px -> 1 px


def _block(c_in: int, c_out: int) -> nn.Sequential:
    """conv 3x3 -> BN -> ReLU -> 2x2 max pool; no conv bias, BN has one."""
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
            bn=nn.BatchNorm2d(c_out),
            relu=nn.ReLU(inplace=True),
            pool=nn.MaxPool2d(2, 2),
        )
    )


class SimpleCNN(nn.Module):
    """Three conv-BN-ReLU-maxpool blocks (``width``, 2x, 4x channels), global average pooling,
    then the transfer head ``fc`` (``hidden_dim`` units, ``dropout``).

    ``hidden_dim=None`` (or 0) gives a single ``Linear`` as ``fc`` instead: the form
    :func:`cvlib.models.factory.create_model` builds and then fits its own head onto, as it does for a
    torchvision backbone.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        width: int = 32,
        dropout: float = 0.3,
        hidden_dim: int | None = 256,
    ) -> None:
        super().__init__()
        if num_classes < 1 or in_channels < 1 or width < 1:
            raise ValueError(f"num_classes, in_channels and width must be positive, got {num_classes}, {in_channels}, {width}")
        self.in_channels = in_channels
        self.features = nn.Sequential(
            OrderedDict(
                block1=_block(in_channels, width),
                block2=_block(width, 2 * width),
                block3=_block(2 * width, 4 * width),
            )
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.num_features = 4 * width
        if hidden_dim:
            self.fc: nn.Module = transfer_head(self.num_features, num_classes, hidden_dim=hidden_dim, dropout=dropout)
        else:
            self.fc = nn.Linear(self.num_features, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # He init for ReLU convs (PyTorch's default is tuned for leaky ReLU with a=sqrt(5) and
        # trains visibly slower from scratch); BN starts as the identity.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"SimpleCNN expects (N, {self.in_channels}, H, W) images, got {tuple(x.shape)}")
        if min(x.shape[-2:]) < MIN_INPUT_SIZE:
            raise ValueError(f"SimpleCNN needs images of at least {MIN_INPUT_SIZE} px, got {tuple(x.shape[-2:])}")
        return self.fc(self.flatten(self.pool(self.features(x))))


def build_simple_cnn(num_classes: int, *, in_channels: int = 3, width: int = 32) -> SimpleCNN:
    """The backbone form for :func:`cvlib.models.factory.create_model`: a plain ``Linear`` at ``fc``,
    which create_model replaces by the transfer head with the requested size and dropout."""
    return SimpleCNN(num_classes, in_channels=in_channels, width=width, hidden_dim=None)
