"""The classic hand-made image kernels (Part 1.2 of the notebook), applied with :func:`cvlib.toolkit.conv.conv2d`.

They are what a CNN's first layer tends to learn on its own (blurs, edge and blob detectors), so
a gallery of them next to Grad-CAM maps helps a reader see what "a convolution" does to their own
images. Kernels are written for cross-correlation, as OpenCV's ``filter2D`` and PyTorch use them:
``SOBEL_X`` responds positively where brightness *increases to the right*, so it finds vertical
edges (the notebook's title "Horizontal Edges (Sobel X)" had that backwards).

The module-level arrays are read-only: they are shared by every caller, and one in-place
``k *= 2`` would otherwise change every later result in the process.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

from cvlib.files.atomic import atomic_write
from cvlib.toolkit.conv import conv2d

__all__ = [
    "BOX_BLUR",
    "EMBOSS",
    "GAUSSIAN_BLUR",
    "IDENTITY",
    "KERNELS",
    "LAPLACIAN",
    "SHARPEN",
    "SOBEL_X",
    "SOBEL_Y",
    "apply_kernel",
    "gaussian_kernel",
    "get_kernel",
    "render_gallery",
    "sobel_magnitude",
    "to_gray",
]


def _frozen(values: ArrayLike) -> np.ndarray:
    arr = np.array(values, dtype=np.float32)
    arr.setflags(write=False)
    return arr


def gaussian_kernel(size: int = 5, sigma: float = 1.0) -> np.ndarray:
    """A normalised ``size`` x ``size`` Gaussian. Normalised so that blurring keeps the mean
    brightness: a truncated Gaussian's samples do not sum to 1 on their own."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"gaussian kernel size must be a positive odd number, got {size}")
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    ax = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(ax**2) / (2.0 * sigma**2))
    k = np.outer(g, g)
    return (k / k.sum()).astype(np.float32)


IDENTITY = _frozen([[0, 0, 0], [0, 1, 0], [0, 0, 0]])
SHARPEN = _frozen([[0, -1, 0], [-1, 5, -1], [0, -1, 0]])
BOX_BLUR = _frozen(np.ones((3, 3)) / 9.0)
GAUSSIAN_BLUR = _frozen(gaussian_kernel(5, 1.0))
SOBEL_X = _frozen([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]])
SOBEL_Y = _frozen([[-1, -2, -1], [0, 0, 0], [1, 2, 1]])
# The notebook's "Edge Detection": the 8-neighbour Laplacian, sign flipped so edges are bright.
LAPLACIAN = _frozen([[-1, -1, -1], [-1, 8, -1], [-1, -1, -1]])
EMBOSS = _frozen([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]])

KERNELS: dict[str, np.ndarray] = {
    "identity": IDENTITY,
    "sharpen": SHARPEN,
    "box_blur": BOX_BLUR,
    "gaussian_blur": GAUSSIAN_BLUR,
    "sobel_x": SOBEL_X,
    "sobel_y": SOBEL_Y,
    "laplacian": LAPLACIAN,
    "emboss": EMBOSS,
}

# BT.601 luma, the weights OpenCV's cvtColor and Pillow's convert("L") use, so a grey image made
# here matches one made by either library.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def get_kernel(name_or_array: str | ArrayLike) -> np.ndarray:
    """Look a kernel up by name (case, spaces and hyphens forgiven, so ``"Gaussian blur"`` works
    as a gallery title would spell it) or pass a 2-D array through as float32."""
    if isinstance(name_or_array, str):
        key = name_or_array.strip().lower().replace(" ", "_").replace("-", "_")
        if key not in KERNELS:
            raise KeyError(f"unknown kernel {name_or_array!r}; known: {', '.join(KERNELS)}")
        return KERNELS[key]
    k = np.asarray(name_or_array, dtype=np.float32)
    if k.ndim != 2 or min(k.shape) < 1:
        raise ValueError(f"a kernel must be a non-empty 2-D array, got shape {k.shape}")
    return k


def _as_float_image(image: ArrayLike) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[-1] not in (1, 3, 4)):
        raise ValueError(f"expected a (H, W) grey or (H, W, C) colour image with C in 1/3/4, got shape {img.shape}")
    if img.dtype.kind not in "biuf":
        raise TypeError(f"expected a numeric image, got dtype {img.dtype}")
    return img.astype(np.float32, copy=False)


def to_gray(image: ArrayLike) -> np.ndarray:
    """RGB(A) or grey (H, W[, C]) to float32 (H, W) luma, in the input's units (no rescaling).
    Expects RGB order, as Pillow gives; convert OpenCV's BGR first."""
    img = _as_float_image(image)
    if img.ndim == 2:
        return img
    if img.shape[-1] == 1:
        return img[..., 0]
    return np.tensordot(img[..., :3], _LUMA, axes=([-1], [0])).astype(np.float32, copy=False)


def apply_kernel(image: ArrayLike, kernel: str | ArrayLike) -> np.ndarray:
    """Filter each channel of a (H, W) or (H, W, C) image with one 2-D kernel; 'same'-size float32.

    Values stay in the input's units (a uint8 image gives results on the 0..255 scale, not
    rescaled to 0..1), so the output equals ``cv2.filter2D(img.astype(float32), CV_32F, k,
    borderType=BORDER_CONSTANT)``: zero padding, and for an even kernel size the same anchor as
    OpenCV (``k // 2``), i.e. one more row/column of padding before than after.
    """
    k = get_kernel(kernel)
    img = _as_float_image(image)
    kh, kw = k.shape
    pad = ((kh // 2, kh - 1 - kh // 2), (kw // 2, kw - 1 - kw // 2))
    # Channels go through conv2d as a batch of single-channel images: one kernel, per channel.
    planes = img[None] if img.ndim == 2 else np.moveaxis(img, -1, 0)
    padded = np.pad(planes, ((0, 0),) + pad)[:, None]  # (C, 1, H + kh - 1, W + kw - 1)
    out = conv2d(padded, k[None, None])[:, 0]  # (C, H, W)
    out = out[0] if img.ndim == 2 else np.moveaxis(out, 0, -1)
    return np.ascontiguousarray(out, dtype=np.float32)


def sobel_magnitude(image: ArrayLike) -> np.ndarray:
    """Gradient magnitude ``sqrt(gx**2 + gy**2)`` of the image's luma, float32 (H, W).

    Colour images are reduced to luma first: an edge is a change in brightness, and one map is
    what a viewer (and a threshold) wants, not three."""
    gray = to_gray(image)
    gx = apply_kernel(gray, SOBEL_X)
    gy = apply_kernel(gray, SOBEL_Y)
    return np.hypot(gx, gy).astype(np.float32, copy=False)


def _load_for_gallery(image: str | os.PathLike[str] | ArrayLike, size: int) -> np.ndarray:
    """RGB or grey image in [0, 1] float32, its longer side ``size`` px: small enough that eight
    filters render in a blink, and every panel on the same scale."""
    from PIL import Image

    if isinstance(image, str | os.PathLike):
        from cvlib.data.imageio import load_rgb

        pil = load_rgb(image)
    else:
        arr = np.asarray(image)
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
            raise ValueError(f"expected a (H, W) or (H, W, 3|4) image, got shape {arr.shape}")
        if arr.ndim == 3 and arr.shape[-1] == 4:
            arr = arr[..., :3]
        if arr.dtype.kind == "f":
            # Floats are taken as 0..1 unless they plainly are 0..255.
            scale = 255.0 if float(np.nanmax(arr)) > 1.0 else 1.0
            arr = np.clip(np.nan_to_num(arr / scale) * 255.0, 0, 255).round().astype(np.uint8)
        elif arr.dtype != np.uint8:
            arr = np.clip(arr, 0, 255).astype(np.uint8)
        pil = Image.fromarray(arr)
    w, h = pil.size
    scale = size / max(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    if new != (w, h):
        pil = pil.resize(new, Image.Resampling.LANCZOS)
    return np.asarray(pil, dtype=np.float32) / 255.0


def _display(result: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Map a filter result in image units (0..1) to something a person can read.

    Zero-sum kernels (Sobel, Laplacian) are edge detectors: their output is signed around 0, so
    show its magnitude, clipped to the image range. Kernels that sum to one (blur, sharpen,
    emboss, identity) keep brightness, so clipping the over/undershoot is enough."""
    if abs(float(kernel.sum())) < 1e-6:
        result = np.abs(result)
    return np.clip(result, 0.0, 1.0)


def render_gallery(
    image: str | os.PathLike[str] | ArrayLike,
    out_png: str | os.PathLike[str],
    kernels: Sequence[str] | Mapping[str, ArrayLike] | None = None,
    size: int = 256,
) -> Path:
    """Render the image and each kernel's result side by side, titled, into one PNG.

    ``kernels``: names from :data:`KERNELS`, or a mapping of title to array; all of
    :data:`KERNELS` when ``None``. Edge detectors are applied to the image's luma and shown in
    grey; the others run per channel and keep the colour. The image is resized so its longer side
    is ``size`` px, and each panel is exactly that size, in a near-square grid.

    Written to a temporary file beside ``out_png`` and renamed into place, so a reader (a report,
    a Prefect artifact) never sees half a PNG. Matplotlib is imported here and drawn through
    its Agg canvas without pyplot, so importing cvlib costs nothing and a notebook's own backend
    and open figures are left alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if size < 16:
        raise ValueError(f"size must be at least 16 px, got {size}")
    if kernels is None:
        chosen: dict[str, np.ndarray] = dict(KERNELS)
    elif isinstance(kernels, Mapping):
        chosen = {str(name): get_kernel(k) for name, k in kernels.items()}
    else:
        if isinstance(kernels, str):
            kernels = [kernels]
        chosen = {name: get_kernel(name) for name in kernels}

    img = _load_for_gallery(image, size)
    gray = to_gray(img) if img.ndim == 3 else img
    panels: list[tuple[str, np.ndarray]] = [("original", img)]
    for name, k in chosen.items():
        is_edge = abs(float(k.sum())) < 1e-6
        panels.append((name, _display(apply_kernel(gray if is_edge else img, k), k)))

    # Lay panels out in exact pixels (not subplot fractions) so each panel is the image's own
    # size and shape: no letterboxing for landscape photos, nothing resampled twice.
    n = len(panels)
    ncols = math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    ph, pw = img.shape[:2]
    gap, title_px, dpi = 8, 22, 100
    fig_w = ncols * pw + (ncols + 1) * gap
    fig_h = nrows * (ph + title_px) + (nrows + 1) * gap
    fig = Figure(figsize=(fig_w / dpi, fig_h / dpi), dpi=dpi, facecolor="white")
    FigureCanvasAgg(fig)
    for i, (title, data) in enumerate(panels):
        row, col = divmod(i, ncols)
        left = gap + col * (pw + gap)
        top = gap + row * (ph + title_px + gap) + title_px
        ax = fig.add_axes((left / fig_w, 1 - (top + ph) / fig_h, pw / fig_w, ph / fig_h))
        if data.ndim == 2:
            ax.imshow(data, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest", aspect="auto")
        else:
            ax.imshow(data, interpolation="nearest", aspect="auto")
        ax.set_title(title.replace("_", " "), fontsize=9, pad=4)
        ax.set_axis_off()

    out = Path(out_png)
    with atomic_write(out) as fh:
        fig.savefig(fh, format="png", dpi=dpi, facecolor="white")
    return out
