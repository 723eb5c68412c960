"""Ingestion of real-world image folders: every kind of bad file gets its exact status and
reason, nothing stops the scan, splits never move, and re-ingestion reads only what changed.

Folders are built in tmp_path from small generated images, so the whole file runs in seconds.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cvlib.data import inspection
from cvlib.data.ingest import build_manifest
from cvlib.data.manifest import MANIFEST_SCHEMA, read_manifest, write_manifest
from cvlib.data.options import DataConfig
from cvlib.data.splits import split_for
from cvlib.data.summary import check_trainable, summarize
from cvlib.data.verdicts import DataSetError, nfc
from tests.unit.ingest_support import assert_verdict, encode, ingest_config, make_classes, picture, put, row


@pytest.fixture
def cfg() -> DataConfig:
    return ingest_config()


# --------------------------------------------------------------------------- scanning


def test_scan_recursive_case_insensitive_and_hostile_names(tmp_path, cfg):
    root = tmp_path / "data"
    names = [
        "cats/plain.jpg",
        "cats/UPPER.JPG",
        "cats/with space.jpeg",
        "cats/<b>bold</b> & 'quote'.png",
        "cats/line\nbreak.jpg",
        "cats/sub/deeper/nested.webp",
        "dogs/ünïcødé 猫.jpg",
        "dogs/e\u0301cole.jpg",  # NFD on disk; kept as is in `path`
        "dogs/x.Tiff",
    ]
    for i, name in enumerate(names):
        fmt = {".png": "PNG", ".webp": "WEBP", ".tiff": "TIFF"}.get(Path(name).suffix.lower(), "JPEG")
        put(root, name, picture(i), fmt)
    put(root, "cats/.DS_Store", b"\x00\x01")
    put(root, "cats/.hidden/x.jpg", picture(50))
    put(root, ".git/config.jpg", picture(51))
    put(root, "cats/notes.txt", b"some notes")
    put(root, "dogs/labels.csv", b"a,b")
    put(root, "README.jpg", picture(52))  # no class
    (root / "birds").mkdir()  # empty class folder

    manifest, skipped = build_manifest(root, cfg)
    assert sorted(manifest["path"]) == sorted(names)
    assert (manifest["status"] == "ok").all(), manifest[["path", "reason", "detail"]]
    assert skipped == {"hidden": 3, "non_image": 2, "outside_class": 1, "symlink_loop": 0, "empty_class": 1}
    assert set(manifest.loc[manifest["path"].str.startswith("cats/"), "label"]) == {"cats"}
    assert row(manifest, "cats/sub/deeper/nested.webp")["label"] == "cats"
    assert row(manifest, "dogs/x.Tiff")["format"] == "TIFF"
    # deterministic: sorted by NFC path, identical on a second run and with one thread
    again, _ = build_manifest(root, cfg, workers=1)
    assert again.equals(manifest)
    keys = [nfc(p) for p in manifest["path"]]
    assert keys == sorted(keys)


def test_missing_data_root_is_a_clear_error(tmp_path):
    with pytest.raises(DataSetError, match="does not exist"):
        build_manifest(tmp_path / "nope")


def test_png_named_jpg_is_fine_and_recorded_as_png(tmp_path, cfg):
    put(tmp_path, "a/really_png.jpg", picture(1), "PNG")
    m, _ = build_manifest(tmp_path, cfg)
    r = assert_verdict(m, "a/really_png.jpg", "ok", None)
    assert (r["format"], r["width"], r["height"]) == ("PNG", 64, 48)


# --------------------------------------------------------------------------- bad files


def test_every_bad_file_gets_its_own_reason(tmp_path):
    cfg = DataConfig(max_image_pixels=200 * 150)
    good = encode(picture(1))
    put(tmp_path, "a/good.jpg", good)
    put(tmp_path, "a/empty.jpg", b"")
    put(tmp_path, "a/truncated.jpg", good[: len(good) // 2])
    png = encode(picture(2), "PNG")
    put(tmp_path, "a/truncated.png", png[: len(png) // 2])
    put(tmp_path, "a/text.jpg", b"just some text, not an image\n")
    put(tmp_path, "a/corrupt.jpg", b"\xff\xd8\xff\xe0\x00\x10" + b"\x00" * 3000)
    put(tmp_path, "a/bomb.png", Image.new("L", (201, 150)), "PNG")
    put(tmp_path, "a/at_limit.png", Image.new("L", (200, 150)), "PNG")
    put(tmp_path, "a/portable.png", picture(3), "PPM")  # a valid image in a format we refuse
    put(tmp_path, "a/icon.ico", picture(4), "ICO")
    put(tmp_path, "a/targa.tga", picture(5), "TGA")
    put(tmp_path, "a/phone.heic", b"\x00\x00\x00\x18ftypheic" + b"\x00" * 64)

    m, skipped = build_manifest(tmp_path, cfg)
    assert skipped["non_image"] == 0  # .ico/.tga/.heic are looked at, not skipped
    assert_verdict(m, "a/good.jpg", "ok", None)
    assert_verdict(m, "a/at_limit.png", "ok", None)
    assert_verdict(m, "a/empty.jpg", "quarantined", "empty")
    assert_verdict(m, "a/truncated.jpg", "quarantined", "truncated")
    assert_verdict(m, "a/truncated.png", "quarantined", "truncated")
    assert_verdict(m, "a/text.jpg", "quarantined", "not_an_image")
    assert_verdict(m, "a/corrupt.jpg", "quarantined", "corrupt")
    r = assert_verdict(m, "a/bomb.png", "quarantined", "decompression_bomb")
    assert "30150" in r["detail"]
    for name in ("a/portable.png", "a/icon.ico", "a/targa.tga", "a/phone.heic"):
        assert_verdict(m, name, "quarantined", "unsupported_format")
    # a readable bad file still has its hash (so the same broken upload is recognisable)
    assert row(m, "a/truncated.jpg")["sha256"] == hashlib.sha256(good[: len(good) // 2]).hexdigest()


def test_a_file_error_escaping_the_decoder_quarantines_only_that_file(tmp_path, cfg, monkeypatch):
    """An error a file can cause (Pillow's "truncated" OSError, a parser's ValueError) that got
    past probe's mapping is still that file's verdict; the other files are read as usual."""
    make_classes(tmp_path, {"a": 4})
    real = inspection.inspect_file
    errors = {"img_001.jpg": OSError("image file is truncated (3 bytes not processed)"), "img_002.jpg": ValueError("tile cannot extend outside image")}

    def flaky(root, rel, label, *args, **kwargs):
        for name, exc in errors.items():
            if rel.endswith(name):
                raise exc
        return real(root, rel, label, *args, **kwargs)

    monkeypatch.setattr(inspection, "inspect_file", flaky)
    m, _ = build_manifest(tmp_path, cfg)
    assert assert_verdict(m, "a/img_001.jpg", "quarantined", "unreadable")["detail"] == "OSError: image file is truncated (3 bytes not processed)"
    assert assert_verdict(m, "a/img_002.jpg", "quarantined", "unreadable")["detail"] == "ValueError: tile cannot extend outside image"
    assert (m.loc[~m["path"].isin(["a/img_001.jpg", "a/img_002.jpg"]), "status"] == "ok").all()


@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("bug", [TypeError("unsupported operand type(s) for +: 'int' and 'str'"), AttributeError("'NoneType' object has no attribute 'width'"), KeyError("mode"), RuntimeError("libfoo exploded")])
def test_a_bug_in_our_inspector_fails_loudly_instead_of_quarantining(tmp_path, cfg, monkeypatch, bug, workers):
    """A bug in our own code is not a bad file: it stops ingestion with the original error and a
    note naming the file, instead of quietly quarantining every image. Once fixed, all are ok."""
    make_classes(tmp_path, {"a": 3, "b": 3})

    def broken(root, rel, label, *args, **kwargs):
        raise bug

    monkeypatch.setattr(inspection, "inspect_file", broken)
    with pytest.raises(type(bug)) as raised:
        build_manifest(tmp_path, cfg, workers=workers)
    assert raised.value is bug
    note = raised.value.__notes__[-1]
    assert "raised while inspecting" in note and str(tmp_path) in note and "img_" in note
    monkeypatch.undo()  # the bug is fixed: nothing was recorded as quarantined in the meantime
    m, _ = build_manifest(tmp_path, cfg, workers=workers)
    assert len(m) == 6 and (m["status"] == "ok").all()


def test_unreadable_file_is_quarantined(tmp_path, cfg, monkeypatch):
    """Permission denied (faked: tests may run as root, who reads everything)."""
    put(tmp_path, "a/locked.jpg", picture(1))
    put(tmp_path, "a/fine.jpg", picture(2))

    def guarded_open(path, *args, **kwargs):
        if str(path).endswith("locked.jpg"):
            raise PermissionError(13, "Permission denied", str(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(inspection, "open", guarded_open, raising=False)
    m, _ = build_manifest(tmp_path, cfg)
    r = assert_verdict(m, "a/locked.jpg", "quarantined", "unreadable")
    assert r["detail"] == "Permission denied"
    assert_verdict(m, "a/fine.jpg", "ok", None)
    # a transient verdict is never reused: once readable again, the file is read again
    monkeypatch.undo()
    again, _ = build_manifest(tmp_path, cfg, previous=m)
    assert_verdict(again, "a/locked.jpg", "ok", None)


def test_fifo_with_an_image_name_does_not_hang(tmp_path, cfg):
    (tmp_path / "a").mkdir()
    os.mkfifo(tmp_path / "a" / "pipe.jpg")
    put(tmp_path, "a/good.jpg", picture(1))
    m, _ = build_manifest(tmp_path, cfg)
    assert_verdict(m, "a/pipe.jpg", "quarantined", "not_a_regular_file")


def test_undecodable_file_name_is_quarantined_and_storable(tmp_path, cfg):
    (tmp_path / "a").mkdir()
    bad = os.path.join(os.fsencode(tmp_path / "a"), b"caf\xe9.jpg")  # Latin-1 bytes, not UTF-8
    with open(bad, "wb") as f:
        f.write(encode(picture(1)))
    put(tmp_path, "a/good.jpg", picture(2))
    m, _ = build_manifest(tmp_path, cfg)
    assert_verdict(m, "a/caf\\xe9.jpg", "quarantined", "undecodable_name")
    write_manifest(m, tmp_path / "m.parquet")  # must not fail on the name
    assert "a/caf\\xe9.jpg" in set(read_manifest(tmp_path / "m.parquet")["path"])


# --------------------------------------------------------------------------- symbolic links


def test_symlinks_leaving_the_root_are_refused_without_reading(tmp_path, cfg, monkeypatch):
    outside = tmp_path / "outside"
    put(outside, "secret.jpg", picture(99))
    put(outside, "folder/inner.jpg", picture(98))
    (outside / "passwd").write_text("root:x:0:0\n")
    root = tmp_path / "data"
    make_classes(root, {"a": 2, "b": 2})
    (root / "a" / "stolen.jpg").symlink_to(outside / "secret.jpg")
    (root / "a" / "linked_dir").symlink_to(outside / "folder", target_is_directory=True)
    (root / "a" / "notes.txt").symlink_to(outside / "passwd")
    (root / "c").symlink_to(outside / "folder", target_is_directory=True)  # a whole class
    (root / "a" / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")

    seen: list[str] = []
    real = inspection.inspect_file
    monkeypatch.setattr(inspection, "inspect_file", lambda r, rel, *a, **k: seen.append(rel) or real(r, rel, *a, **k))
    m, skipped = build_manifest(root, cfg)

    for path in ("a/stolen.jpg", "a/linked_dir", "c"):
        r = assert_verdict(m, path, "quarantined", "symlink_outside_root")
        assert pd.isna(r["sha256"])  # the target was never read
    assert row(m, "c")["label"] == "c"
    assert_verdict(m, "a/dangling.jpg", "quarantined", "broken_symlink")
    assert "a/notes.txt" not in set(m["path"]) and skipped["non_image"] == 1
    assert not [p for p in seen if "stolen" in p or "linked_dir" in p or p.startswith("c")]
    with pytest.raises(DataSetError, match="'c' has 0"):
        check_trainable(m, cfg)


def test_symlinks_inside_the_root_are_followed(tmp_path, cfg):
    root = tmp_path / "data"
    make_classes(root, {"a": 2, "b": 2})
    put(root, "a/sub/deep.jpg", picture(500))
    (root / "a" / "z_alias.jpg").symlink_to(root / "a" / "img_000.jpg")  # same class: a duplicate
    (root / "b" / "borrowed.jpg").symlink_to(root / "a" / "img_001.jpg")  # other class: conflict
    (root / "b" / "sub_alias").symlink_to(Path("..") / "a" / "sub", target_is_directory=True)
    (root / "a" / "loop").symlink_to(root / "a", target_is_directory=True)  # would never end
    (root / "a" / "up").symlink_to(root, target_is_directory=True)

    m, skipped = build_manifest(root, cfg)
    r = assert_verdict(m, "a/z_alias.jpg", "duplicate", "exact_duplicate")
    assert r["duplicate_of"] == "a/img_000.jpg"
    assert_verdict(m, "a/img_001.jpg", "quarantined", "label_conflict")
    assert_verdict(m, "b/borrowed.jpg", "quarantined", "label_conflict")
    assert_verdict(m, "b/sub_alias/deep.jpg", "quarantined", "label_conflict")
    assert skipped["symlink_loop"] == 2


# --------------------------------------------------------------------------- duplicates


def test_exact_duplicates_inside_a_class_keep_one(tmp_path, cfg):
    data = encode(picture(7))
    for name in ("a/z_copy.jpg", "a/m_copy.jpg", "a/a_original.jpg"):
        put(tmp_path, name, data)
    put(tmp_path, "a/other.jpg", picture(8))
    m, _ = build_manifest(tmp_path, cfg)
    assert_verdict(m, "a/a_original.jpg", "ok", None)
    for name in ("a/m_copy.jpg", "a/z_copy.jpg"):
        r = assert_verdict(m, name, "duplicate", "exact_duplicate")
        assert r["duplicate_of"] == "a/a_original.jpg"
        assert r["split"] == row(m, "a/a_original.jpg")["split"]
    assert summarize(m)["duplicates"] == 2


def test_same_bytes_in_two_classes_is_a_label_conflict(tmp_path, cfg):
    data = encode(picture(7))
    put(tmp_path, "cats/x.jpg", data)
    put(tmp_path, "cats/x_again.jpg", data)
    put(tmp_path, "dogs/y.jpg", data)
    make_classes(tmp_path, {"cats": 2, "dogs": 2}, seed=100)
    m, _ = build_manifest(tmp_path, cfg)
    for name in ("cats/x.jpg", "cats/x_again.jpg", "dogs/y.jpg"):
        r = assert_verdict(m, name, "quarantined", "label_conflict")
        assert "'cats', 'dogs'" in r["detail"]
    assert summarize(m)["reasons"]["label_conflict"] == 3


def _salt_splitting(a: str, b: str, cfg: DataConfig) -> DataConfig:
    """A salt under which two hashes fall into different splits on their own."""
    for i in range(1000):
        c = cfg.model_copy(update={"split_salt": f"s{i}"})
        if split_for(a, c) != split_for(b, c):
            return c
    raise AssertionError("no salt separates them")


def test_near_duplicate_lands_in_the_same_split(tmp_path, cfg):
    base = picture(11, (320, 240))
    original = encode(base, quality=95)
    reencoded = encode(base.resize((200, 150)), quality=40)
    put(tmp_path, "a/original.jpg", original)
    put(tmp_path, "a/reencoded.jpg", reencoded)
    put(tmp_path, "b/as_png.png", base, "PNG")  # the same picture filed under another class
    make_classes(tmp_path, {"a": 3, "b": 3}, seed=200)
    shas = sorted(hashlib.sha256(d).hexdigest() for d in (original, reencoded))
    cfg = _salt_splitting(*shas, cfg)

    m, _ = build_manifest(tmp_path, cfg)
    group = m[m["path"].isin(["a/original.jpg", "a/reencoded.jpg", "b/as_png.png"])]
    assert (group["status"] == "ok").all()
    assert group["split"].nunique() == 1
    leader = group.loc[group["near_duplicate_of"].isna(), "path"].tolist()
    assert len(leader) == 1 and set(group["near_duplicate_of"].dropna()) == set(leader)
    assert m["near_duplicate_of"].notna().sum() == 2  # the unrelated pictures are not grouped
    s = summarize(m)
    assert s["near_duplicate_groups"] == 1 and s["largest_near_duplicate_group"] == 3
    assert s["cross_class_near_duplicate_groups"] == 1  # probably a labelling mistake: worth a look

    off, _ = build_manifest(tmp_path, cfg, near_duplicates=False)
    assert off["near_duplicate_of"].isna().all() and off["phash"].isna().all()
    assert row(off, "a/original.jpg")["split"] != row(off, "a/reencoded.jpg")["split"]


def _reference_phash(data: bytes) -> int:
    """pHash as documented, written the plain way: the 1/8 greyscale draft for a JPEG, 32x32
    box average, 2-D DCT, the 8x8 lowest frequencies against their median."""
    from cvlib.data.imageio import _DCT8

    with Image.open(io.BytesIO(data)) as im:
        if im.format == "JPEG":
            w, h = im.size
            im.draft("L", (min(w, max(w // 8, 64)), min(h, max(h // 8, 64))))
        gray = im.convert("L")
    pixels = np.asarray(gray.resize((32, 32), Image.Resampling.BOX), dtype=np.float64)
    coeffs = (_DCT8 @ pixels @ _DCT8.T).ravel()
    bits = coeffs > np.median(coeffs)
    return int("".join("1" if b else "0" for b in bits), 2)


def test_manifest_phash_is_the_documented_hash_bit_for_bit(tmp_path, cfg):
    files = {
        "a/big.jpg": encode(picture(1, (1024, 768)), quality=80),
        "a/progressive.jpg": encode(picture(2, (900, 700)), quality=70, progressive=True),
        "a/small.jpg": encode(picture(3, (40, 30))),
        "b/photo.png": encode(picture(4, (300, 200)), "PNG"),
        "b/grey.png": encode(picture(5, (257, 129)).convert("L"), "PNG"),
    }
    for rel, data in files.items():
        put(tmp_path, rel, data)
    m, _ = build_manifest(tmp_path, cfg)
    for rel, data in files.items():
        assert row(m, rel)["phash"] == f"{_reference_phash(data):016x}", rel


# --------------------------------------------------------------------------- splits


def test_split_depends_on_content_not_name_or_position(tmp_path, cfg):
    make_classes(tmp_path / "one", {"a": 6, "b": 6})
    first, _ = build_manifest(tmp_path / "one", cfg)
    # same content under new names and with more files in between
    for _, r in first.iterrows():
        (tmp_path / "two" / r["label"]).mkdir(parents=True, exist_ok=True)
        (tmp_path / "two" / r["label"] / ("renamed_" + Path(r["path"]).name)).write_bytes(
            (tmp_path / "one" / r["path"]).read_bytes()
        )
    make_classes(tmp_path / "two", {"a": 4, "b": 4}, seed=700)
    second, _ = build_manifest(tmp_path / "two", cfg)
    a = first.set_index("sha256")["split"]
    b = second.set_index("sha256")["split"]
    assert (b.reindex(a.index) == a).all()


# --------------------------------------------------------------------------- incremental


def _count_inspections(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = inspection.inspect_file

    def counting(root, rel, *args, **kwargs):
        calls.append(rel)
        return real(root, rel, *args, **kwargs)

    monkeypatch.setattr(inspection, "inspect_file", counting)
    return calls


def test_reingest_reads_only_new_or_changed_files(tmp_path, cfg, monkeypatch):
    root = tmp_path / "data"
    make_classes(root, {"a": 5, "b": 5})
    put(root, "a/broken.jpg", b"not an image")
    put(root, "a/copy.jpg", (root / "a" / "img_000.jpg").read_bytes())
    first, _ = build_manifest(root, cfg)
    out = write_manifest(first, tmp_path / "manifest.parquet")

    calls = _count_inspections(monkeypatch)
    unchanged, _ = build_manifest(root, cfg, previous=out)
    assert calls == []
    assert unchanged.equals(first)

    put(root, "a/img_001.jpg", picture(4242))  # changed content (and size/mtime)
    os.utime(root / "a" / "img_001.jpg", ns=(1, 1))
    put(root, "b/new.jpg", picture(4243))
    (root / "b" / "img_004.jpg").unlink()
    (root / "a" / "img_000.jpg").unlink()  # the kept copy goes: its duplicate becomes the image
    second, _ = build_manifest(root, cfg, previous=first)
    assert sorted(calls) == ["a/img_001.jpg", "b/new.jpg"]
    assert_verdict(second, "a/copy.jpg", "ok", None)
    assert_verdict(second, "a/broken.jpg", "quarantined", "not_an_image")

    monkeypatch.undo()
    fresh, _ = build_manifest(root, cfg)
    assert second.equals(fresh)


def test_reingest_rechecks_verdicts_that_depend_on_settings(tmp_path, monkeypatch):
    put(tmp_path, "a/big.png", Image.new("L", (100, 100)), "PNG")
    put(tmp_path, "a/small.png", Image.new("L", (10, 10), 3), "PNG")
    first, _ = build_manifest(tmp_path, DataConfig(), near_duplicates=False)
    calls = _count_inspections(monkeypatch)
    # a lower pixel limit: the big image must be re-judged; near-duplicates on: hashes needed
    second, _ = build_manifest(tmp_path, DataConfig(max_image_pixels=5000), previous=first)
    assert sorted(calls) == ["a/big.png", "a/small.png"]
    assert_verdict(second, "a/big.png", "quarantined", "decompression_bomb")
    calls.clear()
    third, _ = build_manifest(tmp_path, DataConfig(), previous=second)
    assert calls == ["a/big.png"]  # a bomb verdict is never reused
    assert_verdict(third, "a/big.png", "ok", None)


def test_previous_may_be_a_missing_path_or_an_old_layout(tmp_path, cfg):
    make_classes(tmp_path / "d", {"a": 2})
    m, _ = build_manifest(tmp_path / "d", cfg, previous=tmp_path / "not_yet.parquet")
    old = m.drop(columns=["mtime_ns", "phash"])
    again, _ = build_manifest(tmp_path / "d", cfg, previous=old)
    assert again.equals(m)


def test_progress_is_reported(tmp_path, cfg):
    make_classes(tmp_path, {"a": 3})
    seen: list[tuple[int, int]] = []
    build_manifest(tmp_path, cfg, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]


@pytest.mark.parametrize("workers", [1, 2, 5])
def test_every_file_is_read_once_whatever_the_thread_count(tmp_path, cfg, monkeypatch, workers):
    make_classes(tmp_path, {"a": 7, "b": 6})
    calls = _count_inspections(monkeypatch)
    seen: list[tuple[int, int]] = []
    m, _ = build_manifest(tmp_path, cfg, workers=workers, progress=lambda d, t: seen.append((d, t)))
    assert sorted(calls) == sorted(m["path"]) and len(calls) == 13
    assert seen == [(d, 13) for d in range(1, 14)]
    assert (m["status"] == "ok").all()


def test_a_failing_progress_callback_stops_ingestion_and_is_raised(tmp_path, cfg, monkeypatch):
    make_classes(tmp_path, {"a": 30})
    calls: list[str] = []
    real = inspection.inspect_file

    def slow(root, rel, *args, **kwargs):  # 30 files x 20 ms on 2 threads: the failure comes first
        calls.append(rel)
        time.sleep(0.02)
        return real(root, rel, *args, **kwargs)

    monkeypatch.setattr(inspection, "inspect_file", slow)

    def fail(done: int, total: int) -> None:
        if done == 2:
            raise RuntimeError("progress bar closed")

    before = threading.active_count()
    with pytest.raises(RuntimeError, match="progress bar closed"):
        build_manifest(tmp_path, cfg, workers=2, progress=fail)
    assert threading.active_count() == before  # no worker left running
    assert len(calls) < 30  # the files not yet taken were not read


def test_an_error_that_escapes_a_worker_is_raised_not_lost(tmp_path, cfg, monkeypatch):
    class Stop(BaseException):  # not an Exception: _inspect_safely lets it through
        pass

    make_classes(tmp_path, {"a": 6})
    real = inspection.inspect_file

    def boom(root, rel, *args, **kwargs):
        if rel.endswith("img_003.jpg"):
            raise Stop
        return real(root, rel, *args, **kwargs)

    monkeypatch.setattr(inspection, "inspect_file", boom)
    before = threading.active_count()
    for progress in (None, lambda d, t: None):
        with pytest.raises(Stop):
            build_manifest(tmp_path, cfg, workers=3, progress=progress)
    assert threading.active_count() == before


# --------------------------------------------------------------------------- the result


def test_library_does_not_import_prefect_or_mlflow():
    code = "import sys, cvlib.data.ingest, cvlib.data.imageio; print(sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'mlflow')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_folder_without_images_gives_an_empty_manifest_and_a_clear_error(tmp_path, cfg):
    (tmp_path / "a").mkdir()
    put(tmp_path, "a/readme.txt", b"nothing here")
    m, skipped = build_manifest(tmp_path, cfg)
    assert m.empty and list(m.columns) == MANIFEST_SCHEMA.names
    assert skipped["empty_class"] == 1 and skipped["non_image"] == 1
    assert summarize(m)["files"] == 0
    assert read_manifest(write_manifest(m, tmp_path / "m.parquet")).empty
    with pytest.raises(DataSetError, match="at least two classes"):
        check_trainable(m, cfg)
