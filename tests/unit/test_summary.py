"""What the manifest says about the data set: counts for a person, and a clear error naming the
class when the data cannot be trained on."""

from __future__ import annotations

import pytest

from cvlib.data.ingest import build_manifest
from cvlib.data.manifest import class_names
from cvlib.data.options import DataConfig
from cvlib.data.summary import check_trainable, summarize
from cvlib.data.verdicts import DataSetError
from tests.unit.ingest_support import ingest_config, make_classes, picture, put


@pytest.fixture
def cfg() -> DataConfig:
    return ingest_config()


def test_summary_counts_sizes_and_imbalance(tmp_path, cfg):
    for i in range(6):
        put(tmp_path, f"big/{i}.jpg", picture(i, (40 + 10 * i, 30)))
    for i in range(2):
        put(tmp_path, f"small/{i}.png", picture(100 + i, (20, 20 + i)), "PNG")
    put(tmp_path, "small/broken.jpg", b"nope")
    m, _ = build_manifest(tmp_path, cfg)
    s = summarize(m)
    assert (s["files"], s["ok"], s["quarantined"], s["classes"]) == (9, 8, 1, 2)
    assert s["class_counts"] == {"big": 6, "small": 2}
    assert s["imbalance_ratio"] == 3.0
    assert s["image_size"]["width"] == {"min": 20, "median": 55.0, "max": 90}
    assert s["image_size"]["height"] == {"min": 20, "median": 30.0, "max": 30}
    assert s["formats"] == {"JPEG": 6, "PNG": 2}
    assert s["reasons"] == {"not_an_image": 1}
    assert sum(sum(v.values()) for v in s["per_class"].values()) == 8
    assert sum(s["splits"].values()) == 8


def test_check_trainable_names_the_small_class(tmp_path):
    cfg = DataConfig(min_images_per_class=3, val_fraction=0.0)
    make_classes(tmp_path, {"cats": 4, "dogs": 4, "newts": 1})
    put(tmp_path, "axolotls/a.jpg", b"")
    put(tmp_path, "axolotls/b.jpg", b"text")
    m, _ = build_manifest(tmp_path, cfg)
    with pytest.raises(DataSetError) as info:
        check_trainable(m, cfg)
    msg = str(info.value)
    assert "'newts' has 1" in msg and "'axolotls' has 0 (2 quarantined: " in msg
    assert "empty x1" in msg and "not_an_image x1" in msg
    assert "'cats'" not in msg


def test_check_trainable_needs_two_classes(tmp_path):
    cfg = DataConfig(val_fraction=0.0)
    make_classes(tmp_path, {"only": 5})
    m, _ = build_manifest(tmp_path, cfg)
    with pytest.raises(DataSetError, match="at least two classes"):
        check_trainable(m, cfg)
    make_classes(tmp_path, {"other": 5}, seed=50)
    m, _ = build_manifest(tmp_path, cfg)
    check_trainable(m, cfg)
    assert class_names(m) == ["only", "other"]
