"""The manifest file and what identifies it: schema, atomic round trip, and a data-set hash
that follows what training sees."""

from __future__ import annotations

import hashlib
import os

import pyarrow.parquet as pq
import pytest

from cvlib.data.ingest import build_manifest
from cvlib.data.manifest import MANIFEST_SCHEMA, dataset_hash, read_manifest, write_manifest
from cvlib.data.options import DataConfig
from tests.unit.ingest_support import ingest_config, make_classes, picture, put


@pytest.fixture
def cfg() -> DataConfig:
    return ingest_config()


def test_manifest_columns_and_atomic_roundtrip(tmp_path, cfg):
    make_classes(tmp_path / "d", {"a": 3, "b": 2})
    put(tmp_path / "d", "a/bad.jpg", b"")
    m, _ = build_manifest(tmp_path / "d", cfg)
    assert list(m.columns) == MANIFEST_SCHEMA.names
    out = write_manifest(m, tmp_path / "out" / "manifest.parquet", metadata={"root": "d"})
    assert pq.read_schema(out).names == MANIFEST_SCHEMA.names
    assert [p.name for p in out.parent.iterdir()] == ["manifest.parquet"]  # no temp file left
    back = read_manifest(out)
    assert back["path"].tolist() == m["path"].tolist()
    assert back["status"].tolist() == m["status"].tolist()
    assert dataset_hash(back) == dataset_hash(m)
    assert int(back.loc[back["path"] == "a/img_000.jpg", "width"].iloc[0]) == 64


def test_dataset_hash_tracks_what_training_sees(tmp_path, cfg):
    make_classes(tmp_path, {"a": 3, "b": 3})
    m, _ = build_manifest(tmp_path, cfg)
    h = dataset_hash(m)
    os.utime(tmp_path / "a" / "img_000.jpg", ns=(5, 5))
    assert dataset_hash(build_manifest(tmp_path, cfg)[0]) == h  # touching is not changing
    put(tmp_path, "a/broken.jpg", b"")
    assert dataset_hash(build_manifest(tmp_path, cfg)[0]) == h  # quarantined files are not seen
    put(tmp_path, "a/new.jpg", picture(77))
    assert dataset_hash(build_manifest(tmp_path, cfg)[0]) != h


def _hash_by_definition(manifest) -> str:
    """The data set hash as documented: "label\\0sha256\\0split\\n" per usable row in path order."""
    ok = manifest[manifest["status"] == "ok"].sort_values("path")
    text = "".join(f"{a}\0{b}\0{c}\n" for a, b, c in zip(ok["label"], ok["sha256"], ok["split"], strict=True))
    return hashlib.sha256(text.encode()).hexdigest()


def test_dataset_hash_is_its_definition_for_any_text(tmp_path, cfg):
    """The hash is joined by Arrow in one buffer; it must stay byte-for-byte the documented text
    (hashes already stored with runs and models compare against it), non-ASCII names included."""
    make_classes(tmp_path / "d", {"a": 3, "b": 2})
    make_classes(tmp_path / "d", {"größe": 2, "日本": 2}, seed=50)
    put(tmp_path / "d", "a/bad.jpg", b"")
    m, _ = build_manifest(tmp_path / "d", cfg)
    assert dataset_hash(m) == _hash_by_definition(m)
    back = read_manifest(write_manifest(m, tmp_path / "m.parquet"))  # Arrow-backed strings, not objects
    assert dataset_hash(back) == _hash_by_definition(m)
    assert dataset_hash(m.iloc[:0]) == hashlib.sha256(b"").hexdigest()
    nothing_usable = m.assign(status="quarantined")
    assert dataset_hash(nothing_usable) == hashlib.sha256(b"").hexdigest()
