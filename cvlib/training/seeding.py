"""Reproducibility: every random draw of an epoch is a function of (seed, epoch) alone: the
shuffle, each sample's augmentation (see :mod:`cvlib.data.datasets`, independent of the number of
DataLoader workers), and the main process's generator (dropout, MixUp/CutMix). A run resumed from
``last.pt`` in a fresh process therefore ends with the same weights as an uninterrupted one (bit
for bit on the CPU, where the default precision is fp32)."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def base_seed(seed: int) -> int:
    """The seed of the data order and augmentation, from the configured seed."""
    return seed * 100_003


def seed_epoch(base: int, epoch: int, rank: int) -> None:
    """Reseed the main process for ``epoch``. Ranks draw different dropout masks; rank 0's stream
    is the single-process one."""
    seed_everything(base + epoch + 7919 * rank)
