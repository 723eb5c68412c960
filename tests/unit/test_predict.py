"""cvlib.predict: one row per input file, readable or not, in a stable order; top-k that is a
real probability ranking; Parquet output with the documented schema and metadata.

The model is an untrained resnet18 (random init, 3 classes): predictions are meaningless but
their structure is exactly what scoring a trained model produces.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from cvlib.models import create_model
from cvlib.parquet import read_metadata
from cvlib.predict import (
    PREDICTIONS_SCHEMA,
    list_input_files,
    predict_sources,
    score_folder,
    write_predictions,
)

CLASSES = ["apple", "banana", "cherry"]
META = {
    "arch": "resnet18",
    "class_names": CLASSES,
    "preprocessing": {"image_size": 16, "resize_size": 18, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    "head": {"hidden_dim": 512, "dropout": 0.3},
}
GOOD = ["a_red.png", "b_green.jpg", "sub/c_blue.png", "sub/d_wide.png"]
BAD = {"e_empty.jpg": "empty", "f_notes.jpg": "not_an_image", "g_truncated.png": "truncated"}


def _png_bytes(color, size=(24, 24)) -> bytes:
    rng = np.random.default_rng(sum(color))
    arr = np.clip(np.array(color, dtype=np.int16) + rng.integers(-20, 21, (size[1], size[0], 3)), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("resnet18", len(CLASSES), weights="none").eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    (root / "sub").mkdir()
    (root / "a_red.png").write_bytes(_png_bytes((220, 30, 30)))
    Image.new("RGB", (30, 20), (20, 200, 40)).save(root / "b_green.jpg", quality=90)
    (root / "sub" / "c_blue.png").write_bytes(_png_bytes((30, 30, 220)))
    (root / "sub" / "d_wide.png").write_bytes(_png_bytes((200, 200, 30), size=(40, 12)))
    (root / "e_empty.jpg").write_bytes(b"")
    (root / "f_notes.jpg").write_text("shopping list: eggs, milk\n")
    full = _png_bytes((90, 90, 90), size=(32, 32))
    (root / "g_truncated.png").write_bytes(full[: len(full) // 2])
    # Not inputs: hidden files and folders, and names that do not claim an image.
    (root / ".hidden.png").write_bytes(_png_bytes((1, 2, 3)))
    (root / ".thumbs").mkdir()
    (root / ".thumbs" / "x.png").write_bytes(_png_bytes((4, 5, 6)))
    (root / "readme.txt").write_text("not an input")
    return root


@pytest.fixture(scope="module")
def scored(model, folder) -> pd.DataFrame:
    return score_folder(
        model, META, folder, model_uri="models:/m@champion", model_version="7", batch_size=3, num_workers=0, device="cpu"
    )


def test_list_input_files_skips_hidden_and_non_images(folder):
    files = list_input_files(folder)
    assert files == sorted(GOOD + list(BAD))
    assert ".hidden.png" not in files and not any(f.startswith(".thumbs") for f in files)
    assert "readme.txt" not in files


def test_list_input_files_single_file_and_missing(folder, tmp_path):
    assert list_input_files(folder / "a_red.png") == ["a_red.png"]
    with pytest.raises(FileNotFoundError):
        list_input_files(tmp_path / "nope")


def test_one_row_per_file_in_sorted_order(scored, folder):
    assert list(scored.columns) == PREDICTIONS_SCHEMA.names
    assert scored["path"].tolist() == list_input_files(folder)
    assert scored["path"].is_unique


def test_bad_files_get_an_error_row_naming_the_file(scored):
    bad = scored.set_index("path").loc[list(BAD)]
    for path, reason in BAD.items():
        row = bad.loc[path]
        assert row["status"] == reason
        assert row["status"] != "ok"
        assert path in row["error"]
        assert pd.isna(row["top1_label"]) and row["top5_labels"] is None
    # An empty file has nothing to hash... but the text and the truncated PNG have bytes.
    assert bad.loc["f_notes.jpg", "bytes"] > 0 and isinstance(bad.loc["f_notes.jpg", "sha256"], str)


def test_good_files_get_a_top_k_ranking(scored, folder):
    good = scored[scored["status"] == "ok"]
    assert sorted(good["path"]) == sorted(GOOD)
    assert good["error"].isna().all()
    for row in good.itertuples():
        assert len(row.top5_labels) == len(row.top5_indices) == len(row.top5_probs) == min(5, len(CLASSES))
        probs = list(row.top5_probs)
        assert probs == sorted(probs, reverse=True)
        assert all(0 <= p <= 1 for p in probs) and sum(probs) <= 1 + 1e-6
        assert row.top1_label == row.top5_labels[0] and row.top1_index == row.top5_indices[0]
        assert row.top1_prob == pytest.approx(probs[0])
        assert [CLASSES[i] for i in row.top5_indices] == list(row.top5_labels)
        assert sorted(row.top5_indices) == [0, 1, 2]  # all classes once when k == classes
        assert row.model_uri == "models:/m@champion" and row.model_version == "7"
    wide = good.set_index("path").loc["sub/d_wide.png"]
    assert (wide["width"], wide["height"]) == (40, 12)
    import hashlib

    assert wide["sha256"] == hashlib.sha256((folder / "sub/d_wide.png").read_bytes()).hexdigest()


def test_rows_do_not_depend_on_batching(model, folder, scored):
    """A bad file in a batch must not shift a neighbour's prediction onto it."""
    one_by_one = score_folder(model, META, folder, batch_size=1, num_workers=0, device="cpu")
    for a, b in zip(scored.itertuples(), one_by_one.itertuples()):
        assert a.path == b.path and a.status == b.status
        if a.status == "ok":
            assert a.top5_indices == b.top5_indices
            assert np.allclose(a.top5_probs, b.top5_probs, atol=1e-5)


def test_top_k_smaller_than_classes(model, folder):
    df = score_folder(model, META, folder, files=["a_red.png"], top_k=2, num_workers=0, device="cpu")
    assert len(df) == 1 and len(df.loc[0, "top5_probs"]) == 2 and sum(df.loc[0, "top5_probs"]) < 1


def test_write_predictions_schema_and_metadata(scored, tmp_path):
    out = write_predictions(scored, tmp_path / "out" / "predictions.parquet", class_names=CLASSES, config={"top_k": 5})
    assert out.is_file()
    assert pq.read_schema(out).remove_metadata().equals(PREDICTIONS_SCHEMA)
    meta = read_metadata(out)
    assert json.loads(meta["visionflow.class_names"]) == CLASSES
    assert json.loads(meta["visionflow.scoring"]) == {"top_k": 5}
    back = pd.read_parquet(out)
    assert back["path"].tolist() == scored["path"].tolist()
    assert back["status"].tolist() == scored["status"].tolist()
    assert str(back["scored_at"].dt.tz) == "UTC"
    assert [p.name for p in out.parent.iterdir()] == ["predictions.parquet"]  # no temp file left


def test_predict_sources_paths_and_bytes(model, folder, scored):
    sources = [str(folder / "a_red.png"), (folder / "sub/c_blue.png").read_bytes(), b"", b"not an image", str(folder / "nope.png")]
    df = predict_sources(model, META, sources)
    assert len(df) == len(sources)
    assert df["status"].tolist()[:2] == ["ok", "ok"]
    assert df["status"].tolist()[2:] == ["empty", "not_an_image", "missing"]
    assert df["error"].iloc[:2].isna().all() and df["error"].iloc[2:].notna().all()
    assert df["top1_label"].iloc[2:].isna().all()
    # Same preprocessing and model as batch scoring: the same answer.
    by_path = scored.set_index("path")
    for i, name in [(0, "a_red.png"), (1, "sub/c_blue.png")]:
        assert df.loc[i, "top5_labels"] == list(by_path.loc[name, "top5_labels"])
        assert np.allclose(df.loc[i, "top5_probs"], by_path.loc[name, "top5_probs"], atol=1e-5)
        assert df.loc[i, "top1_label"] == df.loc[i, "top5_labels"][0]


def test_predict_sources_all_bad_still_one_row_each(model):
    df = predict_sources(model, META, [b"", b"xx"])
    assert df["status"].tolist() == ["empty", "not_an_image"]


def test_unsupported_image_formats_still_get_a_row(model, tmp_path):
    (tmp_path / "photo.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + b"\x00" * 64)
    (tmp_path / "ok.png").write_bytes(_png_bytes((10, 10, 10)))
    df = score_folder(model, META, tmp_path, num_workers=0, device="cpu")
    assert df["path"].tolist() == ["ok.png", "photo.heic"]
    assert df.set_index("path").loc["photo.heic", "status"] != "ok"
