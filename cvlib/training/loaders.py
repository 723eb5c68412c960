"""What training reads: the training and validation loaders (sharded per rank under DDP), and
MixUp/CutMix on whole batches."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch.utils.data import DataLoader

from cvlib.data.datasets import EpochSampler, ManifestDataset, ShardSampler, make_loader
from cvlib.data.options import AugmentConfig
from cvlib.data.transforms import EvalPreset, resize_size_for, train_preset
from cvlib.training.distributed import DistInfo
from cvlib.training.options import TrainConfig
from cvlib.training.seeding import base_seed


def train_draft_size(ac: AugmentConfig) -> int:
    """Short side JPEGs are draft-decoded to for training: a square RandomResizedCrop of the
    smallest area fraction (``scale_min``) still spans ``image_size`` pixels, so typical crops
    are downscaled, not upscaled, while a 12 MP photo decodes at 1/8 of its size."""
    return math.ceil(ac.image_size / math.sqrt(ac.scale_min))


def batch_mixer(ac: AugmentConfig, num_classes: int) -> Callable | None:
    """MixUp and/or CutMix on whole batches (torchvision.transforms.v2), or None when both
    alphas are 0. Returns (images, soft targets) for (images, class indices)."""
    from torchvision.transforms import v2

    ops: list[Any] = []
    if ac.mixup_alpha > 0:
        ops.append(v2.MixUp(alpha=ac.mixup_alpha, num_classes=num_classes))
    if ac.cutmix_alpha > 0:
        ops.append(v2.CutMix(alpha=ac.cutmix_alpha, num_classes=num_classes))
    if not ops:
        return None
    return ops[0] if len(ops) == 1 else v2.RandomChoice(ops)


@dataclass
class TrainingData:
    """This rank's loaders. ``sampler`` reshuffles per epoch (``set_epoch``); ``steps_per_epoch``
    is what the learning-rate schedule counts in."""

    sampler: EpochSampler
    train_loader: DataLoader
    val_loader: DataLoader
    steps_per_epoch: int
    base_seed: int

    @classmethod
    def build(
        cls,
        data_root: str | os.PathLike[str],
        manifest: pd.DataFrame,
        tc: TrainConfig,
        ac: AugmentConfig,
        device: torch.device,
        dinfo: DistInfo,
    ) -> TrainingData:
        train_ds = ManifestDataset(data_root, manifest, "train", train_preset(ac), draft_size=train_draft_size(ac))
        eval_tf = EvalPreset(image_size=ac.image_size, resize_size=resize_size_for(ac), mean=ac.mean, std=ac.std)
        # The same draft as scoring and validate (evaluate_split) use, so the numbers agree.
        val_ds = ManifestDataset(data_root, manifest, "val", eval_tf, draft_size=2 * resize_size_for(ac))
        if len(train_ds) == 0:
            raise ValueError("the training split is empty")
        seed = base_seed(tc.seed)
        loader_opts = {
            "num_workers": tc.num_workers,
            "pin_memory": device.type == "cuda",
            "persistent_workers": tc.num_workers > 0,
            "prefetch_factor": tc.prefetch_factor if tc.num_workers > 0 else None,
        }
        sampler = EpochSampler(train_ds, seed=seed, shuffle=True, num_replicas=dinfo.world_size, rank=dinfo.rank)
        shard = len(sampler)  # samples per rank and epoch
        # drop_last keeps BatchNorm away from a batch of one; tiny data sets keep their last batch.
        drop_last = shard > tc.batch_size and shard % tc.batch_size == 1
        steps_per_epoch = shard // tc.batch_size if drop_last else math.ceil(shard / tc.batch_size)
        train_loader = make_loader(
            train_ds, batch_size=tc.batch_size, sampler=sampler, drop_last=drop_last, seed=seed, **loader_opts
        )
        val_sampler = ShardSampler(len(val_ds), rank=dinfo.rank, num_replicas=dinfo.world_size) if dinfo.distributed else None
        val_loader = make_loader(val_ds, batch_size=tc.batch_size, sampler=val_sampler, **loader_opts)
        return cls(sampler, train_loader, val_loader, steps_per_epoch, seed)

    def close(self) -> None:
        """Shut persistent DataLoader workers down now rather than when the loader is collected
        (an exception's traceback may keep it alive for a long time)."""
        for loader in (self.train_loader, self.val_loader):
            it = getattr(loader, "_iterator", None)
            if it is not None and hasattr(it, "_shutdown_workers"):
                it._shutdown_workers()
            if hasattr(loader, "_iterator"):
                loader._iterator = None
