"""Feature maps: what one layer of a trained model responds to in one image (the notebook's
Part 2.2), for any model visionflow builds rather than only the notebook's three-layer CNN.

The notebook re-ran the model's layers by hand up to the one it wanted, which only works for a
model whose forward it knows. Here a forward hook on the named module captures its output while
the model runs its own forward, so any architecture works, and the layer is named the way
``model.named_modules()`` names it (``features.block1.relu``, ``layer3.5.conv2``,
``features.6``). The forward stops as soon as the layer has run (the hook raises a private
exception), so asking for an early layer of a deep model costs only the layers before it.

Guarantees: the hook is removed and every module's train/eval flag restored whatever happens;
no autograd graph is built; the caller's model, weights and RNG are untouched.

Pure library: torch and numpy; matplotlib is imported only when rendering.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cvlib.atomic import atomic_write
from cvlib.models import eval_mode

__all__ = ["conv_layer_names", "feature_maps", "render_feature_maps"]


class _Captured(Exception):
    """Raised by the hook to stop the forward once the layer's output is in hand."""


def conv_layer_names(model: nn.Module) -> list[str]:
    """Dotted names of the model's ``Conv2d`` layers, in registration (for these models,
    execution) order: the layers whose outputs are feature maps by definition."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def _layer(model: nn.Module, layer: str) -> nn.Module:
    modules = dict(model.named_modules())
    if not isinstance(layer, str) or not layer or layer not in modules:
        names = conv_layer_names(model)
        listing = ", ".join(names) if names else "(none: the model has no Conv2d)"
        raise ValueError(
            f"{type(model).__name__} has no layer named {layer!r}; its convolutional layers are: {listing} "
            "(any name from model.named_modules() whose output is a (N, C, H, W) map also works)"
        )
    return modules[layer]




def _as_map(out: object, layer: str) -> torch.Tensor:
    """The layer's output as (C, h, w). ViT encoder blocks give (1, 1 + h*w, C) tokens: the class
    token is dropped and the patch tokens laid back on their grid."""
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        # ValueError, as for a wrong shape: the caller chose an unsuitable layer.
        raise ValueError(f"layer {layer!r} returned {type(out).__name__}, not a tensor")  # noqa: TRY004
    if out.dim() == 4:
        return out[0]
    if out.dim() == 3:
        tokens = out.shape[1]
        for skip in (1, 0):  # a class token first, as in torchvision's ViT; then none
            grid = tokens - skip
            side = math.isqrt(grid) if grid > 0 else 0
            if side and side * side == grid:
                return out[0, skip:].transpose(0, 1).reshape(out.shape[2], side, side)
    raise ValueError(
        f"layer {layer!r} outputs shape {tuple(out.shape)}, not a spatial (N, C, H, W) map; "
        "choose a convolutional layer (see conv_layer_names(model))"
    )


def feature_maps(model: nn.Module, image_tensor: torch.Tensor, layer: str) -> torch.Tensor:
    """The output of ``layer`` for one preprocessed image, as a float32 CPU tensor (C, h, w).

    ``image_tensor``: (1, C, H, W) (or (C, H, W)), normalised as the model expects, e.g. by
    ``cvlib.transforms.eval_preset_from(meta["preprocessing"])``. The model runs in eval mode
    (BN running statistics, no dropout): the maps are what scoring sees.

    Raises ValueError, listing the conv layer names, when ``layer`` is not one of the model's.
    """
    module = _layer(model, layer)
    if not isinstance(image_tensor, torch.Tensor) or not image_tensor.is_floating_point():
        raise TypeError("image_tensor must be a normalised float tensor (1, C, H, W)")
    x = image_tensor.unsqueeze(0) if image_tensor.dim() == 3 else image_tensor
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"image_tensor must be one image (1, C, H, W), got shape {tuple(image_tensor.shape)}")
    param = next(iter(model.parameters()), None)
    if param is not None:
        x = x.to(device=param.device, dtype=param.dtype)

    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        captured.append(_as_map(output, layer).detach().float().cpu().clone())
        raise _Captured

    handle = module.register_forward_hook(hook)
    try:
        with eval_mode(model), torch.no_grad():
            try:
                model(x)
            except _Captured:
                pass
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f"layer {layer!r} did not run in {type(model).__name__}'s forward")
    return captured[0]


def render_feature_maps(
    maps: torch.Tensor | np.ndarray,
    out_png: str | os.PathLike[str],
    max_maps: int = 32,
    title: str | None = None,
    *,
    cmap: str = "viridis",
    panel_px: int = 96,
) -> Path:
    """Draw the first ``max_maps`` channels of a (C, h, w) map as a near-square grid PNG.

    Each panel is scaled to its own min..max (channels differ in range by orders of magnitude; a
    shared scale would leave most of them blank) and titled with its channel index; a constant
    channel (a dead ReLU) is drawn flat, not as noise stretched to full contrast. Written to a
    temporary file beside ``out_png`` and renamed into place, so a reader never sees half a PNG;
    drawn on a matplotlib ``Figure`` with the Agg canvas (no pyplot), so a notebook's own
    backend and figures are left alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    arr = maps.detach().float().cpu().numpy() if isinstance(maps, torch.Tensor) else np.asarray(maps, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[0] == 0:
        raise ValueError(f"maps must be (C, h, w) with C >= 1, got shape {arr.shape}")
    if max_maps < 1:
        raise ValueError(f"max_maps must be at least 1, got {max_maps}")
    n = min(arr.shape[0], max_maps)
    ncols = math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    h, w = arr.shape[1:]
    scale = panel_px / max(h, w)
    pw, ph = max(8, round(w * scale)), max(8, round(h * scale))
    gap, label_px, head_px, dpi = 6, 14, (26 if title else 0), 100
    fig_w = ncols * pw + (ncols + 1) * gap
    fig_h = head_px + nrows * (ph + label_px) + (nrows + 1) * gap
    fig = Figure(figsize=(fig_w / dpi, fig_h / dpi), dpi=dpi, facecolor="white")
    FigureCanvasAgg(fig)
    if title:
        fig.text(0.5, 1 - (head_px / 2) / fig_h, title, ha="center", va="center", fontsize=10)
    for i in range(n):
        m = np.nan_to_num(arr[i])
        lo, hi = float(m.min()), float(m.max())
        shown = (m - lo) / (hi - lo) if hi - lo > 1e-12 * max(1.0, abs(hi)) else np.zeros_like(m)
        row, col = divmod(i, ncols)
        left = gap + col * (pw + gap)
        top = head_px + gap + row * (ph + label_px + gap) + label_px
        ax = fig.add_axes((left / fig_w, 1 - (top + ph) / fig_h, pw / fig_w, ph / fig_h))
        ax.imshow(shown, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest", aspect="auto")
        ax.set_title(f"#{i}", fontsize=7, pad=2)
        ax.set_axis_off()

    out = Path(out_png)
    with atomic_write(out) as fh:
        fig.savefig(fh, format="png", dpi=dpi, facecolor="white")
    return out
