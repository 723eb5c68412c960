"""cvlib.data.transforms: the train/eval presets, the preprocessing record a model package carries,
and ``denormalize`` (used to display images in reports).

Images are tiny (<= 40 px) so every test runs in milliseconds.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cvlib.data.options import IMAGENET_MEAN, IMAGENET_STD, AugmentConfig
from cvlib.data.transforms import (
    EvalPreset,
    TrainPreset,
    denormalize,
    eval_preset_from,
    preprocessing_record,
    resize_size_for,
    train_preset,
)

SIZE = 16


@pytest.fixture
def noise_image() -> Image.Image:
    """Non-square with texture, so crops, flips and rotations all change the output."""
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8), mode="RGB")


@pytest.fixture
def cfg() -> AugmentConfig:
    return AugmentConfig(image_size=SIZE, resize_ratio=1.125)


def test_resize_size_follows_ratio(cfg):
    assert resize_size_for(cfg) == 18
    assert resize_size_for(AugmentConfig()) == 256  # 224 * 256/224: torchvision's recipe


def test_train_preset_shape_and_dtype(cfg, noise_image):
    out = train_preset(cfg)(noise_image)
    assert isinstance(out, torch.Tensor)
    assert out.shape == (3, SIZE, SIZE)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_train_preset_is_random_but_seedable(cfg, noise_image):
    """Augmentation must actually vary between draws, and be reproducible under a seed
    (fit() relies on that for exact resume)."""
    preset = train_preset(cfg)
    torch.manual_seed(1)
    a = preset(noise_image)
    b = preset(noise_image)
    torch.manual_seed(1)
    a2 = preset(noise_image)
    assert not torch.equal(a, b)
    assert torch.equal(a, a2)


def test_train_preset_without_augmentations_builds_fewer_steps(noise_image):
    """Zero strengths drop the steps instead of adding no-op transforms."""
    full = TrainPreset(image_size=SIZE, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    bare = TrainPreset(image_size=SIZE, mean=IMAGENET_MEAN, std=IMAGENET_STD, hflip=0, rotation=0, color_jitter=0)
    assert len(bare.transforms.transforms) == len(full.transforms.transforms) - 3
    assert bare(noise_image).shape == (3, SIZE, SIZE)


@pytest.mark.parametrize("wh", [(40, 24), (24, 40), (16, 16), (10, 7)])
def test_eval_preset_shape_for_any_aspect(cfg, wh):
    """Resize the short side then centre-crop: every input gives the model's square, even one
    smaller than the crop (upscaled)."""
    img = Image.new("RGB", wh, (10, 200, 30))
    out = EvalPreset(image_size=SIZE, resize_size=resize_size_for(cfg), mean=cfg.mean, std=cfg.std)(img)
    assert out.shape == (3, SIZE, SIZE)
    assert out.dtype == torch.float32


def test_eval_preset_is_deterministic(cfg, noise_image):
    preset = eval_preset_from(preprocessing_record(cfg))
    torch.manual_seed(0)
    a = preset(noise_image)
    torch.manual_seed(123)
    b = preset(noise_image)
    assert torch.equal(a, b)


def test_eval_preset_normalises_per_channel(cfg):
    """A flat colour comes out as ((value / 255) - mean) / std in each channel."""
    rgb = (255, 128, 0)
    out = eval_preset_from(preprocessing_record(cfg))(Image.new("RGB", (20, 20), rgb))
    for c in range(3):
        expected = (rgb[c] / 255 - cfg.mean[c]) / cfg.std[c]
        assert out[c].mean().item() == pytest.approx(expected, abs=1e-5)
        assert out[c].std().item() == pytest.approx(0.0, abs=1e-5)


def test_eval_preset_uses_given_statistics():
    """The package's own mean/std are applied, not ImageNet's by accident."""
    img = Image.new("RGB", (20, 20), (51, 102, 153))  # 0.2, 0.4, 0.6
    out = EvalPreset(image_size=SIZE, resize_size=18, mean=[0.5, 0.5, 0.5], std=[0.25, 0.5, 1.0])(img)
    assert out[:, 0, 0].tolist() == pytest.approx([(0.2 - 0.5) / 0.25, (0.4 - 0.5) / 0.5, (0.6 - 0.5) / 1.0], abs=1e-5)


def test_eval_preset_centre_crops(cfg):
    """The centre is kept: an 18x60 image with a red middle (columns 20-39) and blue edges is all
    red after the crop (the short side is already 18, the crop takes columns 22-37)."""
    arr = np.zeros((18, 60, 3), dtype=np.uint8)
    arr[:, :] = (0, 0, 255)
    arr[:, 20:40] = (255, 0, 0)
    out = EvalPreset(image_size=SIZE, resize_size=18, mean=[0, 0, 0], std=[1, 1, 1])(Image.fromarray(arr))
    assert out[0].min().item() > 0.9
    assert out[2].max().item() < 0.1


def test_preprocessing_record_round_trip(cfg, noise_image):
    """The record survives JSON (visionflow.json) and rebuilds the exact eval transform."""
    record = preprocessing_record(cfg)
    assert record == {"image_size": SIZE, "resize_size": 18, "mean": list(cfg.mean), "std": list(cfg.std)}
    rebuilt = eval_preset_from(json.loads(json.dumps(record)))
    direct = EvalPreset(image_size=SIZE, resize_size=18, mean=cfg.mean, std=cfg.std)
    assert (rebuilt.image_size, rebuilt.resize_size) == (SIZE, 18)
    assert torch.equal(rebuilt(noise_image), direct(noise_image))


def test_eval_preset_from_accepts_string_numbers(noise_image):
    """Metadata read back from MLflow tags/params may carry numbers as strings."""
    record = {"image_size": "16", "resize_size": "18", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    assert eval_preset_from(record)(noise_image).shape == (3, SIZE, SIZE)


def test_denormalize_inverts_normalisation(cfg):
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    out = EvalPreset(image_size=SIZE, resize_size=SIZE, mean=cfg.mean, std=cfg.std)(Image.fromarray(arr))
    back = denormalize(out, cfg.mean, cfg.std)
    expected = torch.from_numpy(arr).permute(2, 0, 1).float() / 255
    assert torch.allclose(back, expected, atol=1e-5)


def test_denormalize_batches_and_clamps():
    """Works on (N, C, H, W) batches and clamps to the displayable [0, 1] range."""
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.3, 0.4]
    x = torch.rand(2, 3, 4, 4)
    normed = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(denormalize(normed, mean, std), x, atol=1e-6)
    extreme = torch.full((1, 3, 2, 2), 100.0)
    assert denormalize(extreme, mean, std).max().item() == 1.0
    assert denormalize(-extreme, mean, std).min().item() == 0.0
    assert denormalize(normed.double(), mean, std).dtype == torch.float64
