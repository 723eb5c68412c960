"""2-D convolution in NumPy, the way deep-learning frameworks define it.

This is Part 1 of the teaching notebook made into a library function. Like
``torch.nn.functional.conv2d`` and ``cv2.filter2D`` it computes the *cross-correlation*
``out[i, j] = sum_m sum_n in[i*s + m, j*s + n] * k[m, n]`` (the kernel is not flipped), so
weights learnt by a CNN and kernels written for OpenCV mean the same thing here.

Two implementations are kept side by side on purpose:

- :func:`conv2d` gathers every receptive field as a strided *view* of the padded input
  (``sliding_window_view``, no copy) and contracts it with the kernel in one ``einsum`` that
  NumPy turns into a matrix product. That product needs the im2col matrix, so memory peaks at
  about ``N * H' * W' * C * kH * kW`` elements: fine for images, not meant for huge batches.
- :func:`conv2d_naive` is the notebook's double loop over output pixels, corrected. It is the
  executable definition the fast version is checked and benchmarked against.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import TypeAlias

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from numpy.typing import ArrayLike

__all__ = ["IntPair", "conv2d", "conv2d_naive", "output_size"]

IntPair: TypeAlias = int | tuple[int, int] | Sequence[int]


def _pair(value: IntPair, name: str) -> tuple[int, int]:
    """Normalise ``3`` / ``(3, 1)`` to a (rows, cols) pair, refusing floats and bools early:
    a float stride silently truncated would give a wrong shape, not an error."""
    if isinstance(value, bool | np.bool_ | str | bytes):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    try:
        return (operator.index(value),) * 2  # type: ignore[arg-type,return-value]
    except TypeError:
        pass
    try:
        items = tuple(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}") from None
    if len(items) != 2:
        raise ValueError(f"{name} must be an int or a pair of 2 ints, got {len(items)} values: {value!r}")
    if any(isinstance(v, bool | np.bool_) for v in items):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    try:
        return operator.index(items[0]), operator.index(items[1])
    except TypeError:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}") from None


def _stride_padding(stride: IntPair, padding: IntPair) -> tuple[tuple[int, int], tuple[int, int]]:
    s = _pair(stride, "stride")
    p = _pair(padding, "padding")
    if min(s) < 1:
        raise ValueError(f"stride must be positive, got {s}")
    if min(p) < 0:
        raise ValueError(f"padding must be non-negative, got {p}")
    return s, p


def _compute_dtype(image: np.ndarray) -> tuple[np.dtype, np.dtype]:
    """(dtype to compute in, dtype to return). Float inputs keep their precision, so a float32
    pipeline stays float32; integers and bools become float64, which holds every uint8/int16
    sum exactly. float16 is computed in float32 because BLAS has no half-precision path."""
    dt = image.dtype
    if dt.kind == "f":
        return (np.dtype(np.float32) if dt.itemsize < 4 else dt), dt
    if dt.kind in "biu":
        return np.dtype(np.float64), np.dtype(np.float64)
    raise TypeError(f"conv2d needs a real numeric image, got dtype {dt}")


def output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output length along one axis, the formula every framework documents:
    ``(size + 2*padding - kernel) // stride + 1``."""
    return (size + 2 * padding - kernel) // stride + 1


def _check_fits(hw: tuple[int, int], khw: tuple[int, int], padding: tuple[int, int]) -> None:
    if min(khw) < 1:
        raise ValueError(f"kernel must have a positive size, got {khw[0]}x{khw[1]}")
    padded = (hw[0] + 2 * padding[0], hw[1] + 2 * padding[1])
    if khw[0] > padded[0] or khw[1] > padded[1]:
        raise ValueError(
            f"kernel {khw[0]}x{khw[1]} is larger than the padded input {padded[0]}x{padded[1]} "
            f"(input {hw[0]}x{hw[1]}, padding {padding})"
        )


def _as_nchw(image: np.ndarray, kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """Lift every supported (image, kernel) pairing to the general (N, C, H, W) x (O, C, kH, kW)
    case, and remember which leading axes to drop again so each caller gets the shape it asked
    for rather than singleton axes it never had."""
    pairs = {
        2: "(kH, kW)",
        3: "(C, kH, kW) or (O, C, kH, kW)",
        4: "(O, C, kH, kW)",
    }
    if image.ndim not in pairs:
        raise ValueError(
            f"image must be (H, W), (C, H, W) or (N, C, H, W); got {image.ndim}-D shape {image.shape}"
        )
    allowed = {2: (2,), 3: (3, 4), 4: (4,)}[image.ndim]
    if kernel.ndim not in allowed:
        raise ValueError(
            f"a {image.ndim}-D image of shape {image.shape} takes a {pairs[image.ndim]} kernel; "
            f"got {kernel.ndim}-D shape {kernel.shape}"
        )
    if image.ndim == 2:
        return image[None, None], kernel[None, None], (0, 1)  # -> (H', W')
    if image.ndim == 3:
        if kernel.ndim == 3:
            squeeze: tuple[int, ...] = (0, 1)  # -> (H', W')
            kernel = kernel[None]
        else:
            squeeze = (0,)  # -> (O, H', W')
        image = image[None]
    else:
        squeeze = ()
    if image.shape[1] != kernel.shape[1]:
        raise ValueError(
            f"channel mismatch: image has {image.shape[1]} channels (shape {image.shape}) but the "
            f"kernel expects {kernel.shape[1]} (shape {kernel.shape})"
        )
    return image, kernel, squeeze


def conv2d(image: ArrayLike, kernel: ArrayLike, stride: IntPair = 1, padding: IntPair = 0) -> np.ndarray:
    """Cross-correlate ``image`` with ``kernel`` with zero padding, as ``torch.nn.functional.conv2d``.

    Shapes accepted (the output drops the axes the input did not have):

    ============== ================ ==================
    image          kernel           output
    ============== ================ ==================
    (H, W)         (kH, kW)         (H', W')
    (C, H, W)      (C, kH, kW)      (H', W')
    (C, H, W)      (O, C, kH, kW)   (O, H', W')
    (N, C, H, W)   (O, C, kH, kW)   (N, O, H', W')
    ============== ================ ==================

    ``stride`` and ``padding`` are an int or a (rows, cols) pair. A float image keeps its dtype
    (float32 in, float32 out: a model's activations should not silently double in size);
    integer images come back as float64. ``H' = (H + 2*pad - kH) // stride + 1``.
    """
    img = np.asarray(image)
    ker = np.asarray(kernel)
    (sh, sw), (ph, pw) = _stride_padding(stride, padding)
    work_dtype, out_dtype = _compute_dtype(img)
    if ker.dtype.kind not in "biuf":
        raise TypeError(f"conv2d needs a real numeric kernel, got dtype {ker.dtype}")
    x, k, squeeze = _as_nchw(img, ker)
    kh, kw = k.shape[-2:]
    _check_fits(x.shape[-2:], (kh, kw), (ph, pw))

    x = x.astype(work_dtype, copy=False)
    k = k.astype(work_dtype, copy=False)
    if ph or pw:
        x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    # (N, C, H'', W'', kH, kW) view of every receptive field, then keep every stride-th one.
    windows = sliding_window_view(x, (kh, kw), axis=(-2, -1))[:, :, ::sh, ::sw]
    # einsum(optimize=True) reshapes the view into an im2col matrix and calls matmul. With one
    # input channel, one image at a time measured several times faster than the 6-D form on
    # NumPy 2.x (the loop is over images, never over pixels).
    if x.shape[1] == 1:
        out = np.empty((x.shape[0], k.shape[0]) + windows.shape[2:4], dtype=work_dtype)
        for n in range(x.shape[0]):
            out[n] = np.einsum("hwij,oij->ohw", windows[n, 0], k[:, 0], optimize=True)
    else:
        out = np.einsum("nchwij,ocij->nohw", windows, k, optimize=True)
    if squeeze:
        out = out.reshape(out.shape[len(squeeze):])
    return out.astype(out_dtype, copy=False)


def conv2d_naive(image: ArrayLike, kernel: ArrayLike, stride: IntPair = 1, padding: IntPair = 0) -> np.ndarray:
    """The notebook's ``conv2d_numpy``: one Python iteration per output pixel.

    Kept as the readable reference that :func:`conv2d` is tested and benchmarked against.
    Corrected from the notebook: non-square kernels (it read the size from ``kernel.shape[0]``
    only), per-axis stride/padding, a clear error instead of a negative-size ``np.zeros`` when
    the kernel does not fit, and the same dtype rule as :func:`conv2d`. Single-channel only.
    """
    img = np.asarray(image)
    ker = np.asarray(kernel)
    if img.ndim != 2 or ker.ndim != 2:
        raise ValueError(
            f"conv2d_naive is single-channel: needs a (H, W) image and a (kH, kW) kernel, "
            f"got shapes {img.shape} and {ker.shape}"
        )
    (sh, sw), (ph, pw) = _stride_padding(stride, padding)
    work_dtype, out_dtype = _compute_dtype(img)
    kh, kw = ker.shape
    _check_fits(img.shape, (kh, kw), (ph, pw))

    img = np.pad(img.astype(work_dtype), ((ph, ph), (pw, pw)))
    ker = ker.astype(work_dtype)
    out_h = (img.shape[0] - kh) // sh + 1
    out_w = (img.shape[1] - kw) // sw + 1
    out = np.zeros((out_h, out_w), dtype=work_dtype)
    for i in range(out_h):
        for j in range(out_w):
            region = img[i * sh : i * sh + kh, j * sw : j * sw + kw]
            out[i, j] = np.sum(region * ker)
    return out.astype(out_dtype, copy=False)
