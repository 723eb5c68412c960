"""Datasets over a manifest, and DataLoaders that keep the model fed."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from cvlib.imageio import load_rgb


class ManifestDataset(Dataset):
    """Usable images of one split; each item is (tensor, label_idx)."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        manifest: pd.DataFrame,
        split: str | None,
        transform: Callable,
        *,
        draft_size: int | None = None,
    ) -> None:
        rows = manifest[manifest["status"] == "ok"]
        if split is not None:
            rows = rows[rows["split"] == split]
        self.root = Path(root)
        self.paths = rows["path"].tolist()
        self.targets = rows["label_idx"].astype(int).tolist()
        self.transform = transform
        # JPEG draft decoding down to about twice the crop keeps enough pixels for the random crop.
        self.draft_size = None if draft_size is None else (draft_size, draft_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = load_rgb(self.root / self.paths[i], draft_size=self.draft_size)
        return self.transform(img), self.targets[i]


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    num_workers: int,
    seed: int = 0,
    pin_memory: bool = False,
    drop_last: bool = False,
) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        generator=generator,
        persistent_workers=False,
    )
