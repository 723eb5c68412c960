"""Feature maps: what a layer of a trained model responds to in an image (the notebook's
Part 2.2), for any model visionflow builds rather than only the notebook's three-layer CNN.

The notebook re-ran the model's layers by hand up to the one it wanted, which only works for a
model whose forward it knows. Here forward hooks on the named modules capture their outputs
while the model runs its own forward, so any architecture works, and a layer is named the way
``model.named_modules()`` names it (``features.block1.relu``, ``layer3.5.conv2``,
``features.6``). The forward stops as soon as every requested layer has run (the last hook raises
a private exception), so asking for early layers of a deep model costs only the layers before
them; several layers of a batch of images cost one (partial) forward.

Guarantees: the hooks are removed and every module's train/eval flag restored whatever happens;
no autograd graph is built; the caller's model, weights and RNG are untouched.

For the Grad-CAM report (:func:`choose_layers`, :func:`feature_map_panels`): a few layers spread
from early to late, and per image and layer the most active channels (highest mean activation)
drawn as one PNG grid.

Pure library: torch and numpy; matplotlib is imported only when rendering.
"""

from __future__ import annotations

import difflib
import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cvlib.explain.target_layer import tokens_to_grid
from cvlib.files.atomic import atomic_write
from cvlib.models.factory import eval_mode

__all__ = [
    "LayerMaps",
    "UnknownLayerError",
    "choose_layers",
    "conv_blocks",
    "conv_layer_names",
    "default_layers",
    "feature_map_panels",
    "feature_map_png",
    "feature_maps",
    "feature_maps_batch",
    "render_feature_maps",
    "top_channels",
]


class _Captured(Exception):
    """Raised by the last hook to stop the forward once every layer's output is in hand."""


class UnknownLayerError(ValueError):
    """A layer name the model does not have; the message names it and lists the conv layers."""


@dataclass
class LayerMaps:
    """One layer's feature maps for one image, as the report shows them."""

    layer: str
    channels: list[int]  # the channel indices drawn, most active first
    n_channels: int  # how many channels the layer has
    size: tuple[int, int]  # (h, w) of each map
    png: bytes  # the grid, one panel per channel in ``channels``


def conv_layer_names(model: nn.Module) -> list[str]:
    """Dotted names of the model's ``Conv2d`` layers, in registration (for these models,
    execution) order: the layers whose outputs are feature maps by definition."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def _trunk_conv_names(model: nn.Module) -> list[str]:
    """:func:`conv_layer_names` without auxiliary heads (GoogLeNet's ``aux1``/``aux2``,
    Inception's ``AuxLogits``): they do not run in eval mode, so their maps never exist."""
    return [n for n in conv_layer_names(model) if not any(p.lower().startswith("aux") for p in n.split("."))]


def conv_blocks(model: nn.Module) -> list[str]:
    """The model's stages: the children of the shallowest module under which its ``Conv2d``
    layers spread over more than one child, in order (``conv1, layer1 .. layer4`` for a ResNet,
    ``features.block1 .. features.block3`` for SimpleCNN, ``features.0 .. features.N`` for
    VGG/MobileNet/EfficientNet). Empty when the model has no ``Conv2d``. Auxiliary heads are
    not stages."""
    convs = _trunk_conv_names(model)
    prefix = ""
    while convs:
        groups: dict[str, None] = {}
        for name in convs:
            head = name[len(prefix) + 1 :].split(".", 1)[0] if prefix else name.split(".", 1)[0]
            groups[f"{prefix}.{head}" if prefix else head] = None
        if len(groups) > 1:
            return list(groups)
        (only,) = groups
        if only in convs:  # a single conv (ViT's patch projection): the stage is that layer
            return [only]
        prefix = only
    return []


def default_layers(model: nn.Module) -> list[str]:
    """Up to three layers from early to late: the first conv (edges and colours), the middle
    stage and the last conv-bearing stage (the map Grad-CAM reads). Empty without a ``Conv2d``."""
    convs = _trunk_conv_names(model)
    if not convs:
        return []
    blocks = conv_blocks(model)
    return list(dict.fromkeys([convs[0], blocks[len(blocks) // 2], blocks[-1]]))


def choose_layers(model: nn.Module, layers: Sequence[str] | None = None) -> list[str]:
    """``layers`` checked against the model (duplicates dropped, order kept), or
    :func:`default_layers` when none are given. Cheap (no forward): call it before expensive
    work so a typo fails first. Raises :class:`UnknownLayerError` naming the layer and listing
    the conv layers, or ValueError when nothing can be chosen."""
    names = list(dict.fromkeys(layers or []))
    for name in names:
        _layer(model, name)
    names = names or default_layers(model)
    if not names:
        raise ValueError(
            f"{type(model).__name__} has no Conv2d layer to choose feature maps from; name the layers "
            "(any module whose output is a (N, C, H, W) map)"
        )
    return names


def _layer(model: nn.Module, layer: str) -> nn.Module:
    if isinstance(layer, str) and layer:
        try:
            return model.get_submodule(layer)  # also a shared module's second name
        except AttributeError:
            pass
    names = conv_layer_names(model)
    listing = ", ".join(names) if names else "(none: the model has no Conv2d)"
    known = [n for n, _ in model.named_modules() if n]
    close = difflib.get_close_matches(layer, known, n=3) if isinstance(layer, str) else []
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise UnknownLayerError(
        f"{type(model).__name__} has no layer named {layer!r}; its convolutional layers are: {listing} "
        f"(any name from model.named_modules() whose output is a (N, C, H, W) map also works).{hint}"
    )


def _as_maps(out: object, layer: str) -> torch.Tensor:
    """The layer's output as (N, C, h, w). ViT encoder blocks give (N, 1 + h*w, C) tokens: the
    class token is dropped and the patch tokens laid back on their grid."""
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        # ValueError, as for a wrong shape: the caller chose an unsuitable layer.
        raise ValueError(f"layer {layer!r} returned {type(out).__name__}, not a tensor")  # noqa: TRY004
    if out.dim() == 4:
        return out
    if out.dim() == 3:
        try:
            return tokens_to_grid(out)
        except ValueError:
            pass  # no square grid: not a map, said below
    raise ValueError(
        f"layer {layer!r} outputs shape {tuple(out.shape)}, not a spatial (N, C, H, W) map; "
        "choose a convolutional layer (see conv_layer_names(model))"
    )


def feature_maps_batch(model: nn.Module, images: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
    """The outputs of several layers for a batch of preprocessed images, in one forward.

    ``images``: (N, C, H, W), normalised as the model expects. A forward hook on each layer (all
    registered before the forward, all removed in ``finally``) copies its output; the forward
    stops once every layer has run. A module called twice in one forward gives its first call.
    The model runs in eval mode without autograd; its per-module train/eval flags are restored.

    Returns ``{layer: float32 CPU tensor (N, C, h, w)}`` in the order of ``layers``. Raises
    :class:`UnknownLayerError` (before any forward) for a name the model lacks, ValueError for a
    layer whose output is not a spatial map or that did not run.
    """
    names = list(dict.fromkeys(layers))
    if not names:
        raise ValueError("no layers given")
    modules = {name: _layer(model, name) for name in names}
    if not isinstance(images, torch.Tensor) or not images.is_floating_point() or images.dim() != 4:
        raise TypeError("images must be a normalised float tensor (N, C, H, W)")
    param = next(iter(model.parameters()), None)
    x = images.to(device=param.device, dtype=param.dtype) if param is not None else images

    captured: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(_module, _inputs, output):
            if name not in captured:
                # clone: a later in-place op (ReLU(inplace=True)) must not change what we keep
                captured[name] = _as_maps(output, name).detach().float().cpu().clone()
            if len(captured) == len(modules):
                raise _Captured

        return hook

    handles = []
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(hook_for(name)))
        with eval_mode(model), torch.no_grad():
            try:
                model(x)
            except _Captured:
                pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [n for n in names if n not in captured]
    if missing:
        raise ValueError(f"layer {', '.join(map(repr, missing))} did not run in {type(model).__name__}'s forward")
    return {n: captured[n] for n in names}


def feature_maps(model: nn.Module, image_tensor: torch.Tensor, layer: str) -> torch.Tensor:
    """The output of ``layer`` for one preprocessed image, as a float32 CPU tensor (C, h, w).

    ``image_tensor``: (1, C, H, W) (or (C, H, W)), normalised as the model expects, e.g. by
    ``cvlib.data.transforms.eval_preset_from(meta["preprocessing"])``. The model runs in eval mode
    (BN running statistics, no dropout): the maps are what scoring sees.

    Raises :class:`UnknownLayerError` (a ValueError), listing the conv layer names, when
    ``layer`` is not one of the model's.
    """
    _layer(model, layer)
    if not isinstance(image_tensor, torch.Tensor) or not image_tensor.is_floating_point():
        raise TypeError("image_tensor must be a normalised float tensor (1, C, H, W)")
    x = image_tensor.unsqueeze(0) if image_tensor.dim() == 3 else image_tensor
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"image_tensor must be one image (1, C, H, W), got shape {tuple(image_tensor.shape)}")
    return feature_maps_batch(model, x, [layer])[layer][0]


def top_channels(maps: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` channels of a (C, h, w) map with the highest mean activation, most
    active first (ties: the lower index first; NaN counts as least active)."""
    if maps.dim() != 3:
        raise ValueError(f"maps must be (C, h, w), got shape {tuple(maps.shape)}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    score = torch.nan_to_num(maps.detach().float().flatten(1).mean(dim=1), nan=-math.inf)
    return torch.argsort(score, descending=True, stable=True)[:k].tolist()


def feature_map_panels(
    model: nn.Module,
    images: torch.Tensor,
    layers: Sequence[str],
    channels: int = 16,
    *,
    panel_px: int = 64,
) -> list[list[LayerMaps]]:
    """For each image of a preprocessed batch (N, C, H, W) and each layer: the ``channels`` most
    active channels (:func:`top_channels`, chosen per image) drawn as a PNG grid. One forward for
    the whole batch (:func:`feature_maps_batch`). Returns one list of :class:`LayerMaps` per
    image, layers in the order given."""
    maps = feature_maps_batch(model, images, layers)
    out: list[list[LayerMaps]] = []
    for i in range(images.shape[0]):
        row = []
        for name, batch in maps.items():
            m = batch[i]
            picked = top_channels(m, channels)
            row.append(
                LayerMaps(
                    layer=name,
                    channels=picked,
                    n_channels=int(m.shape[0]),
                    size=(int(m.shape[1]), int(m.shape[2])),
                    png=feature_map_png(m, picked, panel_px=panel_px),
                )
            )
        out.append(row)
    return out


# --------------------------------------------------------------------------------------------
# drawing
# --------------------------------------------------------------------------------------------


def _as_array(maps: torch.Tensor | np.ndarray) -> np.ndarray:
    arr = maps.detach().float().cpu().numpy() if isinstance(maps, torch.Tensor) else np.asarray(maps, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[0] == 0:
        raise ValueError(f"maps must be (C, h, w) with C >= 1, got shape {arr.shape}")
    return arr


def _grid(arr: np.ndarray, labels: Sequence[str], title: str | None, cmap: str, panel_px: int):
    """A near-square grid of the (n, h, w) maps on a matplotlib ``Figure`` with the Agg canvas
    (no pyplot, so a notebook's own backend and figures are left alone)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = arr.shape[0]
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
    if title:  # parse_math=False: a "$" in a file or layer name is text, not mathtext
        fig.text(0.5, 1 - (head_px / 2) / fig_h, title, ha="center", va="center", fontsize=10, parse_math=False)
    for i in range(n):
        m = np.nan_to_num(arr[i])
        lo, hi = float(m.min()), float(m.max())
        shown = (m - lo) / (hi - lo) if hi - lo > 1e-12 * max(1.0, abs(hi)) else np.zeros_like(m)
        row, col = divmod(i, ncols)
        left = gap + col * (pw + gap)
        top = head_px + gap + row * (ph + label_px + gap) + label_px
        ax = fig.add_axes((left / fig_w, 1 - (top + ph) / fig_h, pw / fig_w, ph / fig_h))
        ax.imshow(shown, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest", aspect="auto")
        ax.set_title(labels[i], fontsize=7, pad=2, parse_math=False)
        ax.set_axis_off()
    return fig, dpi


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
    temporary file beside ``out_png`` and renamed into place, so a reader never sees half a PNG.
    """
    arr = _as_array(maps)
    if max_maps < 1:
        raise ValueError(f"max_maps must be at least 1, got {max_maps}")
    n = min(arr.shape[0], max_maps)
    fig, dpi = _grid(arr[:n], [f"#{i}" for i in range(n)], title, cmap, panel_px)
    out = Path(out_png)
    with atomic_write(out) as fh:
        fig.savefig(fh, format="png", dpi=dpi, facecolor="white")
    return out


def feature_map_png(
    maps: torch.Tensor | np.ndarray,
    channels: Sequence[int],
    *,
    title: str | None = None,
    cmap: str = "viridis",
    panel_px: int = 64,
) -> bytes:
    """The given channels of a (C, h, w) map as a grid PNG (bytes), in the order given, each
    panel titled with its channel index and scaled as in :func:`render_feature_maps`."""
    arr = _as_array(maps)
    channels = [int(c) for c in channels]
    if not channels:
        raise ValueError("no channels given")
    bad = [c for c in channels if not 0 <= c < arr.shape[0]]
    if bad:
        raise ValueError(f"channels {bad} out of range for {arr.shape[0]} channels")
    fig, dpi = _grid(arr[channels], [f"#{c}" for c in channels], title, cmap, panel_px)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    return buf.getvalue()
