"""cvlib.data.demo: scikit-learn's real handwritten digits written as an image folder, so the
demo goes through the same ingestion path as a user's photos."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cvlib.data.demo import write_digits


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    counts = write_digits(out, per_class=3, size=32)
    return out, counts


def test_ten_class_folders_of_three(digits):
    out, counts = digits
    assert counts == {str(d): 3 for d in range(10)}
    assert list(counts) == [str(d) for d in range(10)]
    assert sorted(p.name for p in out.iterdir()) == [str(d) for d in range(10)]
    files = sorted(out.rglob("*.png"))
    assert len(files) == 30
    assert all(len(list((out / str(d)).glob("digit_*.png"))) == 3 for d in range(10))


def test_images_are_32px_greyscale_pngs(digits):
    out, _ = digits
    for path in out.rglob("*.png"):
        with Image.open(path) as im:
            assert im.format == "PNG"
            assert im.size == (32, 32)
            assert im.mode == "L"


def test_images_have_real_content(digits):
    """Not blank: dark background with bright strokes, and the images differ from each other."""
    out, _ = digits
    arrays = [np.asarray(Image.open(p)) for p in sorted(out.rglob("*.png"))]
    for a in arrays:
        assert a.min() < 40 and a.max() > 150
        assert 0.05 < (a > 128).mean() < 0.8  # strokes cover part of the image, not all of it
    assert len({a.tobytes() for a in arrays}) == 30
    # Classes look different: mean images of 0 and 1 are far apart.
    zero = np.mean([np.asarray(Image.open(p), dtype=float) for p in (out / "0").glob("*.png")], axis=0)
    one = np.mean([np.asarray(Image.open(p), dtype=float) for p in (out / "1").glob("*.png")], axis=0)
    assert np.abs(zero - one).mean() > 20


def test_rewriting_is_idempotent(digits, tmp_path):
    """Same call, same bytes: re-running the demo does not change the data set's hash."""
    out, _ = digits
    again = tmp_path / "again"
    write_digits(again, per_class=3, size=32)
    for path in out.rglob("*.png"):
        assert (again / path.relative_to(out)).read_bytes() == path.read_bytes()


def test_size_parameter(tmp_path):
    counts = write_digits(tmp_path, per_class=1, size=20)
    assert sum(counts.values()) == 10
    with Image.open(next(tmp_path.rglob("*.png"))) as im:
        assert im.size == (20, 20)
