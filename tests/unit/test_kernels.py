"""cvlib.toolkit.kernels against OpenCV's filter2D on a real photo, and the gallery PNG."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_image

from cvlib.toolkit.kernels import (
    GAUSSIAN_BLUR,
    KERNELS,
    SOBEL_X,
    apply_kernel,
    gaussian_kernel,
    get_kernel,
    render_gallery,
    sobel_magnitude,
    to_gray,
)

EXPECTED_NAMES = {"identity", "sharpen", "box_blur", "gaussian_blur", "sobel_x", "sobel_y", "laplacian", "emboss"}


@pytest.fixture(scope="module")
def china_u8() -> np.ndarray:
    """scikit-learn's sample photo (427x640 RGB), downscaled to keep the tests fast."""
    img = load_sample_image("china.jpg")
    return cv2.resize(img, (160, 107), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def china(china_u8) -> np.ndarray:
    return china_u8.astype(np.float32) / 255.0


def filter2d(img: np.ndarray, k: np.ndarray) -> np.ndarray:
    """OpenCV's filter2D is correlation too; BORDER_CONSTANT (value 0) is our zero padding."""
    return cv2.filter2D(img.astype(np.float32), cv2.CV_32F, np.asarray(k, np.float32), borderType=cv2.BORDER_CONSTANT)


def test_kernel_table():
    assert set(KERNELS) == EXPECTED_NAMES
    for name, k in KERNELS.items():
        assert k.dtype == np.float32, name
        assert k.ndim == 2 and k.shape[0] % 2 == 1 and k.shape[1] % 2 == 1, name
        assert not k.flags.writeable, name
    assert GAUSSIAN_BLUR.shape == (5, 5)
    assert GAUSSIAN_BLUR.sum() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(GAUSSIAN_BLUR, GAUSSIAN_BLUR.T)
    np.testing.assert_allclose(GAUSSIAN_BLUR, cv2.getGaussianKernel(5, 1.0) @ cv2.getGaussianKernel(5, 1.0).T, atol=1e-7)
    for name in ("identity", "sharpen", "box_blur", "gaussian_blur", "emboss"):
        assert KERNELS[name].sum() == pytest.approx(1.0, abs=1e-6), name  # keep mean brightness
    for name in ("sobel_x", "sobel_y", "laplacian"):
        assert KERNELS[name].sum() == 0.0, name  # flat regions -> 0


def test_shared_kernels_cannot_be_mutated():
    k = KERNELS["sobel_x"]
    with pytest.raises(ValueError):
        k *= 2
    assert k is SOBEL_X and SOBEL_X[0, 0] == -1


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_matches_filter2d_rgb(china, name):
    got = apply_kernel(china, name)
    assert got.dtype == np.float32 and got.shape == china.shape
    np.testing.assert_allclose(got, filter2d(china, KERNELS[name]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_matches_filter2d_gray(china, name):
    gray = to_gray(china)
    got = apply_kernel(gray, name)
    assert got.shape == gray.shape
    np.testing.assert_allclose(got, filter2d(gray, KERNELS[name]), atol=1e-4, rtol=0)


def test_uint8_keeps_its_units(china_u8):
    """uint8 in -> float32 on the 0..255 scale (no hidden /255); float32 rounding at that scale
    is ~1e-5 relative, so compare relatively."""
    for name, k in KERNELS.items():
        got = apply_kernel(china_u8, name)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, filter2d(china_u8, k), rtol=1e-5, atol=1e-3, err_msg=name)


@pytest.mark.parametrize("shape", [(4, 4), (2, 3), (1, 5), (6, 1)])
def test_arbitrary_and_even_kernels_match_opencv_anchor(china, shape):
    k = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    np.testing.assert_allclose(apply_kernel(china, k), filter2d(china, k), atol=1e-4, rtol=0)


def test_single_channel_last_axis(china):
    gray = to_gray(china)
    np.testing.assert_allclose(apply_kernel(gray[..., None], "laplacian")[..., 0], apply_kernel(gray, "laplacian"))


def test_sobel_magnitude_matches_opencv(china):
    gray_cv = cv2.cvtColor(china, cv2.COLOR_RGB2GRAY)
    np.testing.assert_allclose(to_gray(china), gray_cv, atol=1e-6)
    gx = cv2.Sobel(gray_cv, cv2.CV_32F, 1, 0, ksize=3, borderType=cv2.BORDER_CONSTANT)
    gy = cv2.Sobel(gray_cv, cv2.CV_32F, 0, 1, ksize=3, borderType=cv2.BORDER_CONSTANT)
    got = sobel_magnitude(china)
    assert got.dtype == np.float32 and got.shape == china.shape[:2]
    np.testing.assert_allclose(got, np.hypot(gx, gy), atol=1e-4)


def test_sobel_x_finds_vertical_edges():
    step = np.zeros((5, 6), np.float32)
    step[:, 3:] = 1.0  # dark left, bright right
    gx = apply_kernel(step, "sobel_x")
    gy = apply_kernel(step, "sobel_y")
    assert gx[2, 2] > 0 and gx[2, 3] > 0  # positive where brightness rises to the right
    assert np.all(gy[1:-1] == 0)


def test_get_kernel_names_and_arrays():
    assert get_kernel("Gaussian blur") is GAUSSIAN_BLUR
    assert get_kernel("sobel-x") is SOBEL_X
    assert get_kernel([[1, 2]]).dtype == np.float32
    with pytest.raises(KeyError, match="known: identity"):
        get_kernel("unsharp")
    with pytest.raises(ValueError):
        get_kernel(np.ones((3, 3, 3)))


def test_gaussian_kernel_validation():
    assert gaussian_kernel(3, 0.5).sum() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        gaussian_kernel(4)
    with pytest.raises(ValueError):
        gaussian_kernel(5, 0)


def test_apply_kernel_rejects_bad_images():
    with pytest.raises(ValueError):
        apply_kernel(np.zeros((2, 3, 4, 5)), "identity")
    with pytest.raises(ValueError):
        apply_kernel(np.zeros((8, 8, 7)), "identity")


def _panel_count(png: np.ndarray, min_area: int) -> int:
    """Panels are the large non-white blobs; titles are small ones."""
    mask = (png[..., :3].min(axis=-1) < 250).astype(np.uint8)
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    return int(sum(stats[i, cv2.CC_STAT_AREA] >= min_area for i in range(1, n)))


def _check_png(path: Path, n_panels: int, panel_hw: tuple[int, int]) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    ncols = math.ceil(math.sqrt(n_panels))
    nrows = math.ceil(n_panels / ncols)
    ph, pw = panel_hw
    height, width = arr.shape[:2]
    # Each panel is drawn at the image's own size, plus small gaps and a title row.
    assert ncols * pw <= width <= ncols * pw + 20 * (ncols + 1)
    assert nrows * ph <= height <= nrows * (ph + 40) + 20 * (nrows + 1)
    assert arr.std() > 20, "gallery looks blank"
    assert _panel_count(arr, min_area=ph * pw // 2) == n_panels
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")], "temp file left behind"


def test_gallery_default_kernels(tmp_path, china_u8):
    out = render_gallery(china_u8, tmp_path / "nested" / "gallery.png", size=128)
    assert out == tmp_path / "nested" / "gallery.png" and out.is_file()
    _check_png(out, 1 + len(KERNELS), (85, 128))  # 107x160 photo -> longer side 128


def test_gallery_from_path_with_chosen_kernels(tmp_path, china_u8):
    src = tmp_path / "photo.jpg"
    Image.fromarray(china_u8).save(src, quality=95)
    out = tmp_path / "g.png"
    out.write_bytes(b"stale")  # replaced atomically, not appended to
    result = render_gallery(src, out, kernels=["sobel_x", "gaussian_blur", "emboss"], size=96)
    _check_png(result, 4, (64, 96))


def test_gallery_custom_mapping_and_gray_input(tmp_path, china):
    gray = to_gray(china)  # float in 0..1, (H, W)
    out = render_gallery(gray, tmp_path / "g.png", kernels={"my edge": [[1, -1]], "blur": np.ones((3, 3)) / 9}, size=80)
    _check_png(out, 3, (53, 80))


def test_gallery_rejects_unknown_kernel(tmp_path, china_u8):
    with pytest.raises(KeyError):
        render_gallery(china_u8, tmp_path / "g.png", kernels=["nope"])
    assert not (tmp_path / "g.png").exists()


def test_import_is_light():
    """cvlib stays a pure library: no Prefect/MLflow, and matplotlib only when a gallery is drawn."""
    import subprocess
    import sys

    code = (
        "import sys, cvlib.toolkit.kernels, cvlib.toolkit.conv; "
        "bad = [m for m in ('prefect', 'mlflow', 'matplotlib', 'torch') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
