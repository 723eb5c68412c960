"""Data folders laid out by split (``train/CLASS``, ``val/CLASS``, as torchvision's ants/bees
tutorial set ships): the split folders give the split, their sub-folders are the classes, and an
inconsistent layout is a clear error instead of a model trained to tell "train" from "val".

Before: such a folder was read as two classes, "train" and "val". Folders are built in tmp_path
from small generated images; the whole file runs in a few seconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from cvlib.data.datasets import ManifestDataset
from cvlib.data.ingest import build_manifest
from cvlib.data.layout import detect_layout
from cvlib.data.manifest import class_names, read_manifest, write_manifest
from cvlib.data.options import DataConfig
from cvlib.data.summary import check_trainable, summarize
from cvlib.data.verdicts import DataSetError
from tests.unit.ingest_support import encode, ingest_config, picture, put, row


def _split_set(root: Path, splits: dict[str, dict[str, int]], seed: int = 0) -> None:
    """``splits``: folder -> class -> count, every image different."""
    for s, (folder, per_class) in enumerate(splits.items()):
        for k, (label, n) in enumerate(per_class.items()):
            for i in range(n):
                put(root, f"{folder}/{label}/img_{i:03d}.jpg", picture(seed + 10_000 * s + 1000 * k + i))


ANTS_BEES = {"train": {"ants": 6, "bees": 6}, "val": {"ants": 3, "bees": 3}}


def test_split_folders_give_the_split_and_their_subfolders_the_classes(tmp_path):
    _split_set(tmp_path, ANTS_BEES)
    manifest, _ = build_manifest(tmp_path, ingest_config())
    assert class_names(manifest) == ["ants", "bees"]  # not ["train", "val"]
    ok = manifest[manifest["status"] == "ok"]
    assert len(ok) == 18
    folder = ok["path"].str.split("/").str[0]
    assert (ok["split"] == folder).all(), ok[["path", "split"]]
    assert (ok["given_split"] == folder).all()
    assert (ok["label"] == ok["path"].str.split("/").str[1]).all()
    summary = summarize(manifest)
    assert summary["layout"]["kind"] == "split_folders"
    assert summary["layout"]["split_folders"] == {"train": "train", "val": "val"}
    assert summary["layout"]["note"] == "split folders train/val found: using the given split"
    assert summary["per_class"] == {"ants": {"train": 6, "val": 3}, "bees": {"train": 6, "val": 3}}
    assert summary["leakage"] == {"exact": 0, "near_groups": 0, "near_files": 0, "examples": []}
    check_trainable(manifest, ingest_config())
    # What training reads: the dataset of each split holds exactly that folder's files.
    val = ManifestDataset(tmp_path, manifest, "val", transform=lambda im: im)
    assert len(val) == 6 and all(p.startswith("val/") for p in val.paths)
    # Re-ingestion reuses unchanged files and keeps the given split.
    out = tmp_path.parent / "m.parquet"
    write_manifest(manifest, out)
    again, _ = build_manifest(tmp_path, ingest_config(), previous=out)
    assert again[["path", "split", "given_split"]].equals(read_manifest(out)[["path", "split", "given_split"]])


@pytest.mark.parametrize(
    ("train", "val", "test"), [("Train", "VAL", None), ("train", "valid", "test"), ("TRAIN", "Validation", "Test")]
)
def test_split_folder_names_are_case_insensitive_and_val_has_synonyms(tmp_path, train, val, test):
    layout = {train: {"a": 3, "b": 3}, val: {"a": 2, "b": 2}} | ({test: {"a": 2, "b": 2}} if test else {})
    _split_set(tmp_path, layout)
    manifest, _ = build_manifest(tmp_path, ingest_config())
    expected = {train: "train", val: "val"} | ({test: "test"} if test else {})
    assert summarize(manifest)["layout"]["split_folders"] == expected
    ok = manifest[manifest["status"] == "ok"]
    assert (ok["split"] == ok["path"].str.split("/").str[0].map(expected)).all()
    assert class_names(manifest) == ["a", "b"]


def test_split_folders_with_different_classes_fail_naming_folders_and_classes(tmp_path):
    _split_set(tmp_path, {"train": {"ants": 3, "bees": 3}, "val": {"ants": 2, "wasps": 2}})
    with pytest.raises(DataSetError) as err:
        build_manifest(tmp_path, ingest_config())
    msg = str(err.value)
    assert "'train' has ants, bees" in msg and "'val' has ants, wasps" in msg, msg
    assert "'train' lacks wasps" in msg and "'val' lacks bees" in msg, msg


def test_an_empty_class_folder_in_one_split_is_still_a_different_class_list(tmp_path):
    _split_set(tmp_path, {"train": {"ants": 3, "bees": 3}, "val": {"ants": 2}})
    (tmp_path / "val" / "bees ").mkdir()  # a trailing-space typo
    with pytest.raises(DataSetError, match="'val' lacks bees"):
        build_manifest(tmp_path, ingest_config())


def test_top_level_folders_of_known_classes_are_split_by_content(tmp_path):
    """New, unsplit images of a known class next to the split folders: the hash decides for them
    (and only them); the given split stays as it is."""
    _split_set(tmp_path, ANTS_BEES)
    for i in range(40):
        put(tmp_path, f"ants/new_{i:03d}.jpg", picture(50_000 + i))
    cfg = DataConfig(val_fraction=0.3, test_fraction=0.0, min_images_per_class=2)
    manifest, _ = build_manifest(tmp_path, cfg)
    new = manifest[manifest["path"].str.startswith("ants/")]
    assert (new["label"] == "ants").all() and new["given_split"].isna().all()
    assert set(new["split"]) == {"train", "val"}  # 40 files at 0.3: both sides, by the hash
    given = manifest[manifest["given_split"].notna()]
    assert (given["split"] == given["given_split"]).all()
    note = summarize(manifest)["layout"]["note"]
    assert note == "split folders train/val found: using the given split; 40 files in top-level class folders split by the content hash"


def test_a_top_level_folder_that_is_no_known_class_is_ambiguous(tmp_path):
    _split_set(tmp_path, ANTS_BEES)
    put(tmp_path, "wasps/w.jpg", picture(7))
    with pytest.raises(DataSetError, match=r"'wasps' are neither a split nor one of those classes"):
        build_manifest(tmp_path, ingest_config())


def test_without_a_val_folder_val_is_taken_from_train_and_test_is_given(tmp_path):
    _split_set(tmp_path, {"train": {"a": 30, "b": 30}, "test": {"a": 4, "b": 4}})
    manifest, _ = build_manifest(tmp_path, DataConfig(val_fraction=0.25, test_fraction=0.1, min_images_per_class=2))
    ok = manifest[manifest["status"] == "ok"]
    from_train = ok[ok["given_split"] == "train"]
    assert set(from_train["split"]) == {"train", "val"}  # no test carved: a test folder is given
    assert (ok[ok["given_split"] == "test"]["split"] == "test").all()
    note = summarize(manifest)["layout"]["note"]
    assert note.startswith("split folders train/test found: using the given split") and "no val folder" in note


def test_leakage_across_given_splits_is_reported(tmp_path):
    _split_set(tmp_path, ANTS_BEES)
    copy = (tmp_path / "train/ants/img_000.jpg").read_bytes()
    put(tmp_path, "val/ants/same.jpg", copy)  # byte-identical: the val copy is not used
    near = picture(1001).resize((96, 72), Image.Resampling.BICUBIC)  # train/bees/img_001, rescaled
    put(tmp_path, "val/bees/rescaled.png", encode(near, "PNG"), fmt="PNG")
    manifest, _ = build_manifest(tmp_path, ingest_config())
    assert row(manifest, "val/ants/same.jpg")["status"] == "duplicate"
    near_row = row(manifest, "val/bees/rescaled.png")
    assert (near_row["status"], near_row["split"]) == ("ok", "val")  # the given split is kept, not repaired
    leak = summarize(manifest)["leakage"]
    assert (leak["exact"], leak["near_groups"], leak["near_files"]) == (1, 1, 2), leak
    assert "val/ants/same.jpg = train/ants/img_000.jpg" in leak["examples"]
    assert any("val/bees/rescaled.png" in e and "train/bees/img_001.jpg" in e for e in leak["examples"])


def test_a_class_named_train_that_holds_images_is_a_class(tmp_path):
    """A vehicles set may have a class called "train": images directly inside, so not a split."""
    for i in range(3):
        put(tmp_path, f"train/t{i}.jpg", picture(i))
        put(tmp_path, f"bus/b{i}.jpg", picture(100 + i))
    manifest, _ = build_manifest(tmp_path, ingest_config())
    assert class_names(manifest) == ["bus", "train"]
    assert manifest["given_split"].isna().all()
    assert summarize(manifest)["layout"]["note"] == "class folders: splits from the content hash"


def test_mixed_or_doubled_split_folders_are_errors(tmp_path):
    _split_set(tmp_path / "mixed", {"train": {"a": 2, "b": 2}})
    put(tmp_path / "mixed", "val/loose.jpg", picture(9))
    with pytest.raises(DataSetError, match=r"'train' hold class folders .* 'val' hold images directly"):
        detect_layout(tmp_path / "mixed")
    _split_set(tmp_path / "double", {"train": {"a": 2}, "val": {"a": 2}, "validation": {"a": 2}})
    with pytest.raises(DataSetError, match="'val' and 'validation' .* both name the val split"):
        detect_layout(tmp_path / "double")


def test_a_split_folder_linked_from_outside_the_root_is_refused_unread(tmp_path):
    _split_set(tmp_path / "elsewhere", {"val": {"a": 2, "b": 2}})
    root = tmp_path / "data"
    _split_set(root, {"train": {"a": 3, "b": 3}})
    (root / "val").symlink_to(tmp_path / "elsewhere" / "val")
    manifest, _ = build_manifest(root, ingest_config())
    refused = row(manifest, "val")
    assert (refused["status"], refused["reason"]) == ("quarantined", "symlink_outside_root")
    assert not manifest["path"].str.startswith("val/").any()


def test_an_unsplit_copy_of_a_given_image_follows_its_split(tmp_path):
    """A rescaled copy, at the top level, of an image in val/ goes to val, whatever the hash says
    (val_fraction 0: the hash alone would put it in train, next to its own val original)."""
    _split_set(tmp_path, ANTS_BEES)
    copy = picture(10_000 + 2).resize((96, 72), Image.Resampling.BICUBIC)  # val/ants/img_002, rescaled
    put(tmp_path, "ants/copy.png", encode(copy, "PNG"), fmt="PNG")
    put(tmp_path, "ants/other.jpg", picture(77_777))
    manifest, _ = build_manifest(tmp_path, DataConfig(val_fraction=0.0, min_images_per_class=2))
    assert row(manifest, "ants/copy.png")["split"] == "val"
    assert row(manifest, "ants/other.jpg")["split"] == "train"
    assert summarize(manifest)["leakage"]["near_groups"] == 0
