"""cvlib.data.preview: the augmentation grid and the training curves a retraining run logs."""

from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from cvlib.data.options import AugmentConfig
from cvlib.data.preview import augmentation_preview
from cvlib.data.transforms import train_preset
from cvlib.training.plots import training_curves_png
from cvlib.training.records import EpochRecord

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _pixels(png: bytes) -> np.ndarray:
    assert png.startswith(PNG_MAGIC)
    with Image.open(io.BytesIO(png)) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """A small image with structure (gradient + a dark square), so crops and flips show."""
    y, x = np.mgrid[0:48, 0:64]
    arr = np.stack([x * 4, y * 5, np.full_like(x, 128)], axis=-1).astype(np.uint8)
    arr[10:20, 40:56] = 0
    return Image.fromarray(arr, "RGB")


@pytest.fixture(scope="module")
def preset():
    return train_preset(AugmentConfig(image_size=32, rotation=20.0, hflip=0.5))


def test_preview_is_a_non_blank_png(photo, preset):
    png = augmentation_preview(photo, preset, n=4)
    pixels = _pixels(png)
    assert pixels.std() > 10 and not (pixels == 255).all()


def test_preview_is_seeded_and_leaves_global_rng_alone(photo, preset):
    torch.manual_seed(123)
    random.seed(123)
    expected_torch, expected_py = torch.rand(3), random.random()
    torch.manual_seed(123)
    random.seed(123)
    a = augmentation_preview(photo, preset, n=3, seed=7)
    assert torch.equal(torch.rand(3), expected_torch) and random.random() == expected_py
    assert augmentation_preview(photo, preset, n=3, seed=7) == a
    assert augmentation_preview(photo, preset, n=3, seed=8) != a


def test_preview_grows_with_n(photo, preset):
    few = _pixels(augmentation_preview(photo, preset, n=2))
    many = _pixels(augmentation_preview(photo, preset, n=11))
    assert many.shape[0] > few.shape[0]  # more rows


def test_preview_denormalises_with_the_presets_own_mean_and_std(photo):
    """With no augmentation at all, the augmented panel must show the original colours, which
    it does only if the preset's Normalize is undone (a normalised tensor shown raw is mostly
    clipped to black and white)."""
    from cvlib.data.preview import _normalize_params, _to_display

    plain = train_preset(AugmentConfig(image_size=32, scale_min=1.0, hflip=0.0, rotation=0.0, color_jitter=0.0))
    norm = _normalize_params(plain)
    assert norm is not None and list(norm[0]) == pytest.approx([0.485, 0.456, 0.406])
    shown = _to_display(plain(photo.resize((32, 32))), norm)
    original = np.asarray(photo.resize((32, 32)), dtype=np.float32) / 255.0
    assert shown.shape == (32, 32, 3) and np.abs(shown - original).max() < 0.02


def test_preview_rejects_n_below_one(photo, preset):
    with pytest.raises(ValueError):
        augmentation_preview(photo, preset, n=0)


def _history(n: int) -> list[dict]:
    return [
        {"epoch": e, "train_loss": 2.0 / e, "val_loss": 2.2 / e, "train_top1": 1 - 0.5 / e, "val_top1": 1 - 0.6 / e,
         "val_top5": 1.0, "lr": 1e-3, "seconds": 1.0}
        for e in range(1, n + 1)
    ]


def test_curves_png_is_non_blank():
    pixels = _pixels(training_curves_png(_history(5)))
    assert pixels.shape[1] > pixels.shape[0]  # two panels side by side
    assert pixels.std() > 10


def test_curves_accept_epoch_records_one_epoch_and_nan_validation():
    records = [EpochRecord(epoch=1, train_loss=1.0, train_top1=0.5, val_loss=math.nan, val_top1=math.nan,
                           val_top5=math.nan, lr=1e-3, seconds=2.0)]
    assert training_curves_png(records).startswith(PNG_MAGIC)


def test_curves_reject_an_empty_history():
    with pytest.raises(ValueError, match="empty"):
        training_curves_png([])


def test_training_preview_shows_the_first_training_image(photo, tmp_path):
    import pandas as pd

    from cvlib.data.preview import write_training_preview

    (tmp_path / "a").mkdir()
    photo.save(tmp_path / "a" / "x.png")
    manifest = pd.DataFrame({"path": ["a/gone.png", "a/x.png"], "status": ["quarantined", "ok"], "split": ["train", "train"]})
    out = write_training_preview(tmp_path, manifest, AugmentConfig(image_size=32), tmp_path / "out" / "p.png", seed=1)
    assert out == tmp_path / "out" / "p.png"
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 32
    assert write_training_preview(tmp_path, manifest.assign(split="val"), AugmentConfig(), tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
