"""Transform presets, in the style of torchvision's references/classification/presets.py.

Both presets take a decoded RGB ``PIL.Image`` and return a normalised float tensor (C, H, W).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2 as T

from cvlib.data.options import AugmentConfig


class TrainPreset:
    """Random crop, flip, rotation and colour jitter: the augmentations of the notebook,
    with the scale range and strengths configurable. Optionally torchvision's recipe on top:
    TrivialAugmentWide (on the uint8 crop) and RandomErasing (on the normalised tensor)."""

    def __init__(
        self,
        *,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        scale_min: float = 0.5,
        hflip: float = 0.5,
        rotation: float = 15.0,
        color_jitter: float = 0.2,
        trivial_augment: bool = False,
        random_erase: float = 0.0,
    ) -> None:
        steps: list[T.Transform] = [T.PILToTensor(), T.RandomResizedCrop(image_size, scale=(scale_min, 1.0), antialias=True)]
        if hflip > 0:
            steps.append(T.RandomHorizontalFlip(hflip))
        if rotation > 0:
            steps.append(T.RandomRotation(rotation))
        if color_jitter > 0:
            steps.append(T.ColorJitter(color_jitter, color_jitter, color_jitter))
        if trivial_augment:
            steps.append(T.TrivialAugmentWide(interpolation=T.InterpolationMode.BILINEAR))
        # uint8 until here: the geometric ops are cheaper on bytes than on floats.
        steps += [T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)]
        if random_erase > 0:
            steps.append(T.RandomErasing(p=random_erase, value=0.0))  # 0 after Normalize: the mean colour
        self.transforms = T.Compose(steps)

    def __call__(self, img) -> torch.Tensor:
        return self.transforms(img)


class EvalPreset:
    """Resize the short side, centre-crop: what the model sees at validation and scoring time."""

    def __init__(self, *, image_size: int, resize_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.image_size = image_size
        self.resize_size = resize_size
        self.transforms = T.Compose(
            [
                T.PILToTensor(),
                T.Resize(resize_size, antialias=True),
                T.CenterCrop(image_size),
                T.ToDtype(torch.float32, scale=True),
                T.Normalize(mean, std),
            ]
        )

    def __call__(self, img) -> torch.Tensor:
        return self.transforms(img)


def resize_size_for(cfg: AugmentConfig) -> int:
    return int(round(cfg.image_size * cfg.resize_ratio))


def train_preset(cfg: AugmentConfig) -> TrainPreset:
    return TrainPreset(
        image_size=cfg.image_size,
        mean=cfg.mean,
        std=cfg.std,
        scale_min=cfg.scale_min,
        hflip=cfg.hflip,
        rotation=cfg.rotation,
        color_jitter=cfg.color_jitter,
        trivial_augment=cfg.trivial_augment,
        random_erase=cfg.random_erase,
    )


def eval_preset_from(preprocessing: dict) -> EvalPreset:
    """Build the eval preset from a model package's ``preprocessing`` record."""
    return EvalPreset(
        image_size=int(preprocessing["image_size"]),
        resize_size=int(preprocessing["resize_size"]),
        mean=preprocessing["mean"],
        std=preprocessing["std"],
    )


def preprocessing_record(cfg: AugmentConfig) -> dict:
    """The preprocessing a model package carries, so scoring needs nothing from training."""
    return {
        "image_size": cfg.image_size,
        "resize_size": resize_size_for(cfg),
        "mean": list(cfg.mean),
        "std": list(cfg.std),
    }


def denormalize(batch: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Back to [0, 1] RGB for display."""
    m = torch.as_tensor(mean, dtype=batch.dtype, device=batch.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=batch.dtype, device=batch.device).view(-1, 1, 1)
    return (batch * s + m).clamp(0, 1)
