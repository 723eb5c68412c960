"""cvlib.toolkit.conv against PyTorch's conv2d, the definition the rest of visionflow trusts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cvlib.toolkit.conv import conv2d, conv2d_naive, output_size

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)


def torch_conv(x: np.ndarray, k: np.ndarray, stride, padding) -> np.ndarray:
    """Reference: lift to NCHW / OCkk, run torch, return in float64."""
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))
    kt = torch.from_numpy(np.ascontiguousarray(k, dtype=np.float64))
    return F.conv2d(xt, kt, stride=stride, padding=padding).numpy()


@st.composite
def conv_case(draw, layout: str):
    """Shapes, stride and padding such that the kernel fits the padded input."""
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    h = draw(st.integers(max(1, kh - 2 * ph), 12))
    w = draw(st.integers(max(1, kw - 2 * pw), 12))
    n, c, o = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**32 - 1))
    # Exercise both spellings: an int when the pair is symmetric, a tuple otherwise.
    stride = sh if sh == sw else (sh, sw)
    padding = ph if ph == pw else (ph, pw)
    rng = np.random.default_rng(seed)
    shapes = {
        "hw": ((h, w), (kh, kw)),
        "chw_single": ((c, h, w), (c, kh, kw)),
        "chw_multi": ((c, h, w), (o, c, kh, kw)),
        "nchw": ((n, c, h, w), (o, c, kh, kw)),
    }[layout]
    return rng.standard_normal(shapes[0]), rng.standard_normal(shapes[1]), stride, padding


@SETTINGS
@given(conv_case("hw"))
def test_single_channel_matches_torch(case):
    x, k, stride, padding = case
    got = conv2d(x, k, stride, padding)
    want = torch_conv(x[None, None], k[None, None], stride, padding)[0, 0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@SETTINGS
@given(conv_case("chw_single"))
def test_multichannel_single_output_matches_torch(case):
    x, k, stride, padding = case
    got = conv2d(x, k, stride, padding)
    want = torch_conv(x[None], k[None], stride, padding)[0, 0]
    assert got.shape == want.shape and got.ndim == 2
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@SETTINGS
@given(conv_case("chw_multi"))
def test_multichannel_multi_output_matches_torch(case):
    x, k, stride, padding = case
    got = conv2d(x, k, stride, padding)
    want = torch_conv(x[None], k, stride, padding)[0]
    assert got.shape == want.shape and got.ndim == 3
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@SETTINGS
@given(conv_case("nchw"))
def test_batched_matches_torch(case):
    x, k, stride, padding = case
    got = conv2d(x, k, stride, padding)
    want = torch_conv(x, k, stride, padding)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@SETTINGS
@given(conv_case("hw"))
def test_naive_reference_agrees(case):
    x, k, stride, padding = case
    np.testing.assert_allclose(conv2d_naive(x, k, stride, padding), conv2d(x, k, stride, padding), atol=1e-10)


@pytest.mark.parametrize("stride", [1, 2, 3, (1, 2), (3, 1)])
@pytest.mark.parametrize("padding", [0, 1, 2, (0, 2), (2, 1)])
def test_float32_grid_matches_torch(stride, padding):
    """Deterministic sweep (non-square kernel, odd image) in float32, the dtype models run in."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 3, 11, 9)).astype(np.float32)
    k = rng.standard_normal((4, 3, 3, 2)).astype(np.float32)
    got = conv2d(x, k, stride, padding)
    assert got.dtype == np.float32
    want = F.conv2d(torch.from_numpy(x), torch.from_numpy(k), stride=stride, padding=padding).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_output_size_formula():
    assert output_size(256, 3, 1, 1) == 256
    assert output_size(7, 3, 2, 0) == 3
    assert conv2d(np.zeros((7, 10)), np.ones((3, 4)), stride=(2, 3), padding=(0, 1)).shape == (3, 3)


def test_is_cross_correlation_not_flipped():
    """A kernel with a single 1 at the top-left picks the pixel up-left of centre (with padding),
    which only holds if the kernel is not flipped."""
    x = np.arange(25, dtype=np.float64).reshape(5, 5)
    k = np.zeros((3, 3))
    k[0, 0] = 1
    out = conv2d(x, k, padding=1)
    assert out[2, 2] == x[1, 1]


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        (np.float32, np.float32),
        (np.float64, np.float64),
        (np.float16, np.float16),
        (np.uint8, np.float64),
        (np.int32, np.float64),
        (np.bool_, np.float64),
    ],
)
def test_dtype_rule(dtype, expected):
    x = np.ones((6, 6), dtype=dtype)
    k = np.ones((3, 3), dtype=np.float64)  # a float64 kernel must not upcast a float32 image
    assert conv2d(x, k).dtype == expected
    assert conv2d_naive(x, k).dtype == expected


def test_uint8_sums_are_exact():
    x = np.full((4, 4), 255, dtype=np.uint8)
    np.testing.assert_array_equal(conv2d(x, np.ones((3, 3), dtype=np.int64)), np.full((2, 2), 9 * 255.0))


def test_accepts_non_contiguous_and_lists():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((10, 12))[:, ::2]  # a strided view
    k = [[1.0, 0.0], [0.0, -1.0]]
    np.testing.assert_allclose(conv2d(x, k), conv2d_naive(np.ascontiguousarray(x), np.array(k)))


@pytest.mark.parametrize(
    ("image_shape", "kernel_shape", "match"),
    [
        ((3, 8, 8), (2, 3, 3), "channel mismatch"),
        ((2, 3, 8, 8), (4, 1, 3, 3), "channel mismatch"),
        ((3, 8, 8), (4, 2, 3, 3), "channel mismatch"),
        ((8,), (3,), "image must be"),
        ((1, 1, 1, 8, 8), (1, 1, 3, 3), "image must be"),
        ((8, 8), (1, 3, 3), "takes a"),
        ((8, 8), (1, 1, 3, 3), "takes a"),
        ((3, 8, 8), (3, 3), "takes a"),
        ((1, 3, 8, 8), (3, 3, 3), "takes a"),
        ((4, 4), (5, 3), "larger than the padded input"),
        ((4, 4), (3, 0), "positive size"),
    ],
)
def test_shape_errors(image_shape, kernel_shape, match):
    with pytest.raises(ValueError, match=match):
        conv2d(np.zeros(image_shape), np.zeros(kernel_shape))


def test_kernel_fits_once_padded():
    assert conv2d(np.ones((4, 4)), np.ones((6, 6)), padding=1).shape == (1, 1)
    with pytest.raises(ValueError, match="larger than the padded input 6x6"):
        conv2d(np.ones((4, 4)), np.ones((7, 6)), padding=1)


@pytest.mark.parametrize("stride", [0, -1, (1, 0), (2, -2)])
def test_non_positive_stride(stride):
    with pytest.raises(ValueError, match="stride must be positive"):
        conv2d(np.ones((5, 5)), np.ones((3, 3)), stride=stride)
    with pytest.raises(ValueError, match="stride must be positive"):
        conv2d_naive(np.ones((5, 5)), np.ones((3, 3)), stride=stride)


def test_negative_padding():
    with pytest.raises(ValueError, match="padding must be non-negative"):
        conv2d(np.ones((5, 5)), np.ones((3, 3)), padding=(-1, 0))


@pytest.mark.parametrize("bad", [(1, 2, 3), (1,)])
def test_pair_length(bad):
    with pytest.raises(ValueError, match="pair of 2"):
        conv2d(np.ones((5, 5)), np.ones((3, 3)), stride=bad)


@pytest.mark.parametrize("bad", [1.5, True, "2", (1, 2.0), None])
def test_pair_type(bad):
    with pytest.raises(TypeError):
        conv2d(np.ones((5, 5)), np.ones((3, 3)), padding=bad)


def test_numpy_ints_accepted():
    assert conv2d(np.ones((5, 5)), np.ones((3, 3)), stride=np.int64(2), padding=(np.int32(1), 0)).shape == (3, 2)


def test_non_numeric_rejected():
    with pytest.raises(TypeError):
        conv2d(np.ones((5, 5), dtype=complex), np.ones((3, 3)))
    with pytest.raises(TypeError):
        conv2d(np.ones((5, 5)), np.array([["a"]]))


def test_naive_is_single_channel():
    with pytest.raises(ValueError, match="single-channel"):
        conv2d_naive(np.ones((3, 5, 5)), np.ones((3, 3, 3)))


def test_naive_fixes_notebook_square_kernel_bug():
    """The notebook read K from kernel.shape[0] only; a 1x3 kernel must slide 1 row, 3 columns."""
    x = np.arange(12, dtype=np.float64).reshape(3, 4)
    out = conv2d_naive(x, np.ones((1, 3)))
    assert out.shape == (3, 2)
    np.testing.assert_array_equal(out[:, 0], x[:, :3].sum(axis=1))
