"""The two sides of one image in a report: the normalised crop the model sees (read exactly as
scoring reads it) and the uint8 picture a reader sees (the same crop in true colours), embedded
as a base64 PNG so the page needs no other file."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cvlib.data.imageio import load_rgb
from cvlib.data.transforms import denormalize

__all__ = ["display_crops", "image_path", "load_crop", "png_b64"]


def image_path(root: Path, rel: str) -> Path:
    """``rel`` under a folder ``root``; a single-file input is its own root (what
    :func:`cvlib.inference.inputs.list_input_files` lists for a file is its name)."""
    return root / rel if root.is_dir() else root


def load_crop(root: Path, rel: str, pre: Mapping, preset: Callable[[Image.Image], torch.Tensor]) -> torch.Tensor:
    """The normalised crop the model sees for one file (raises ImageReadError)."""
    return preset(load_rgb(image_path(root, rel), draft_size=(int(pre["resize_size"]),) * 2))


def display_crops(images: torch.Tensor, pre: Mapping) -> np.ndarray:
    """Normalised (N, 3, H, W) crops back to (N, H, W, 3) uint8 RGB: the crop the model saw, in
    the colours of the photo."""
    shown = (denormalize(images.float().cpu(), pre["mean"], pre["std"]) * 255).round().byte()
    return shown.permute(0, 2, 3, 1).numpy()


def png_b64(array_or_image: np.ndarray | Image.Image) -> str:
    img = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")
