"""Pictures a retraining run should leave behind: what the augmentations do to a real training
image, and the loss/accuracy curves per epoch.

Why: augmentation settings are the easiest to get wrong without noticing (a flip on digits or
text, crops that cut the object off), and nothing in the metrics says so; a grid of augmented
copies shows it in one look. The curves show over- or under-fitting where a single "best val
top-1" cannot.

Both functions return PNG bytes, ready for ``mlflow.log_image``/``log_artifact`` or a Prefect
artifact, and draw on a matplotlib ``Figure`` with the Agg canvas (imported lazily, no pyplot),
so they are thread-safe and leave a notebook's backend alone.

Pure library: torch, numpy, PIL; matplotlib lazily.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cvlib.data.options import AugmentConfig
from cvlib.files.atomic import write_bytes_atomic

__all__ = ["augmentation_preview", "write_training_preview"]


def _normalize_params(preset: Any) -> tuple[Sequence[float], Sequence[float]] | None:
    """(mean, std) of the preset's ``Normalize`` step, if it has one (visionflow's presets keep
    their steps in ``.transforms``, a torchvision ``Compose``)."""
    from torchvision.transforms import v2

    compose = getattr(preset, "transforms", None)
    steps = getattr(compose, "transforms", None) or []
    for step in reversed(list(steps)):
        if isinstance(step, v2.Normalize):
            return step.mean, step.std
    return None


def _to_display(x: Any, norm: tuple[Sequence[float], Sequence[float]] | None) -> np.ndarray:
    """A preset's output (C, H, W) tensor -> (H, W, 3) float in [0, 1]; a PIL image passes."""
    if not isinstance(x, torch.Tensor):
        return np.asarray(x.convert("RGB"), dtype=np.float32) / 255.0
    t = x.detach().float().cpu()
    if t.dim() != 3:
        raise ValueError(f"the preset must return one (C, H, W) image, got shape {tuple(t.shape)}")
    if norm is not None:
        from cvlib.data.transforms import denormalize

        t = denormalize(t, *norm)
    elif not x.is_floating_point():
        t = t / 255.0
    t = t.clamp(0, 1)
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    return t[:3].permute(1, 2, 0).numpy()


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor="white")
    return buf.getvalue()


def augmentation_preview(image, train_preset: Callable, n: int = 8, seed: int = 0) -> bytes:
    """The original image and ``n`` augmented versions of it, as a PNG grid.

    ``image``: a PIL image (decoded as training decodes it, e.g. ``cvlib.data.imageio.load_rgb``);
    ``train_preset``: the callable training uses (``cvlib.data.transforms.train_preset(cfg.augment)``).
    Its output is denormalised with the preset's own ``Normalize`` mean and std, so colours look
    as they do on disk. The draws are seeded (``seed``) inside a forked RNG: the same call gives
    the same picture, and the caller's random streams (training's reproducibility) are untouched.
    """
    import random

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    norm = _normalize_params(train_preset)
    py_state = random.getstate()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            augmented = [_to_display(train_preset(image), norm) for _ in range(n)]
    finally:
        random.setstate(py_state)
    panels = [("original", _to_display(image, None))] + [(f"augmented {i + 1}", a) for i, a in enumerate(augmented)]

    ncols = min(len(panels), max(3, math.ceil(math.sqrt(len(panels)))))
    nrows = math.ceil(len(panels) / ncols)
    side = 1.6
    fig = Figure(figsize=(ncols * side, nrows * (side + 0.25)), dpi=100, facecolor="white")
    FigureCanvasAgg(fig)
    for i, (title, data) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.imshow(data, interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.set_axis_off()
    fig.suptitle("training augmentations", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def write_training_preview(
    data_dir: str | os.PathLike[str], manifest: pd.DataFrame, augment: AugmentConfig, out: str | os.PathLike[str], *, seed: int = 0
) -> Path | None:
    """The first training image of ``manifest`` and 8 augmented copies, as a PNG at ``out``: the
    first thing to check when a run learns nothing. None when there is no training image."""
    from cvlib.data.imageio import load_rgb
    from cvlib.data.transforms import train_preset

    train = manifest[(manifest["status"] == "ok") & (manifest["split"] == "train")]
    if train.empty:
        return None
    image = load_rgb(Path(data_dir) / train["path"].iloc[0])
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, augmentation_preview(image, train_preset(augment), n=8, seed=seed))
    return path
