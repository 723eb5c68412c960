"""A real data set that ships with scikit-learn: 1,797 handwritten digits (8x8, 17 grey levels),
written as an image folder so the demo exercises the same path as a user's photos."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image


def write_digits(out_dir: str | os.PathLike[str], *, size: int = 64, per_class: int | None = None) -> dict[str, int]:
    """Write the digits as ``out_dir/<digit>/digit_<index>.png``; returns images per class.

    The 8x8 originals are upscaled with bicubic interpolation: ImageNet backbones expect more
    than 8 pixels, and smooth strokes are closer to what a camera gives than nearest-neighbour
    blocks. Idempotent: existing files are rewritten with the same bytes.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    out = Path(out_dir)
    counts: dict[str, int] = {}
    for index, (pixels, target) in enumerate(zip(digits.images, digits.target, strict=True)):
        label = str(int(target))
        if per_class is not None and counts.get(label, 0) >= per_class:
            continue
        grey = np.clip(np.rint(pixels * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        img = Image.fromarray(grey, mode="L").resize((size, size), Image.Resampling.BICUBIC)
        folder = out / label
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"digit_{index:04d}.png", optimize=False)
        counts[label] = counts.get(label, 0) + 1
    return dict(sorted(counts.items()))
