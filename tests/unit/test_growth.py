"""Cost that grows with the number of files (issue 15), checked at small N: what must not be
per-row Python objects, quadratic, or a payload that grows with the folder.

The timings themselves are in benchmarks/growth.py; these tests pin the mechanisms.
"""

from __future__ import annotations

import gc
import os

import pandas as pd
import pyarrow as pa
import pytest
from torch.utils.data import Dataset

from cvlib.data import inspection
from cvlib.data.datasets import make_loader
from cvlib.data.ingest import _read_previous, build_manifest, refresh_manifest
from cvlib.data.manifest import read_manifest, write_manifest
from cvlib.data.summary import summarize
from tests.unit.ingest_support import ingest_config, make_classes, picture, put


def _no_row_objects(monkeypatch) -> None:
    """Reading the previous manifest may not turn it into one pandas object per row."""

    def refuse(*args, **kwargs):
        raise AssertionError("the previous manifest was expanded row by row")

    monkeypatch.setattr(pd.DataFrame, "to_dict", refuse)
    monkeypatch.setattr(pd.DataFrame, "iterrows", refuse)
    monkeypatch.setattr(pd.DataFrame, "itertuples", refuse)


def test_reingest_reads_previous_manifest_as_columns(tmp_path, monkeypatch):
    cfg = ingest_config()
    root = tmp_path / "data"
    make_classes(root, {"a": 6, "b": 6})
    put(root, "a/broken.jpg", b"not an image")
    first, _ = build_manifest(root, cfg)
    out = write_manifest(first, tmp_path / "manifest.parquet")

    calls: list[str] = []
    real = inspection.inspect_file
    monkeypatch.setattr(inspection, "inspect_file", lambda r, rel, *a, **k: calls.append(rel) or real(r, rel, *a, **k))
    _no_row_objects(monkeypatch)
    for previous in (out, first):  # a Parquet path and a frame
        prev = _read_previous(previous)
        assert isinstance(prev.table, pa.Table) and len(prev) == len(first)
        again, _ = build_manifest(root, cfg, previous=previous)
        assert calls == []  # every file reused, none read
        assert again.equals(first)
    assert _read_previous(tmp_path / "missing.parquet").table is None


def _counting(monkeypatch) -> list[str]:
    """The files inspected (read, hashed, decoded) from now on."""
    calls: list[str] = []
    real = inspection.inspect_file
    monkeypatch.setattr(inspection, "inspect_file", lambda r, rel, *a, **k: calls.append(rel) or real(r, rel, *a, **k))
    return calls


def test_unchanged_refresh_reads_nothing_and_rewrites_nothing(tmp_path, monkeypatch):
    cfg = ingest_config()
    root, out = tmp_path / "data", tmp_path / "manifest.parquet"
    make_classes(root, {"a": 6, "b": 6})
    put(root, "a/broken.jpg", b"not an image")
    put(root, "b/copy.jpg", (root / "b" / "img_000.jpg").read_bytes())
    first = refresh_manifest(root, out, cfg)
    assert first.changed and first.read == 14
    assert first.summary == summarize(read_manifest(out))
    stamp = out.stat().st_mtime_ns

    calls = _counting(monkeypatch)
    again = refresh_manifest(root, out, cfg)
    assert calls == [] and not again.changed and again.read == 0
    assert out.stat().st_mtime_ns == stamp  # not rewritten
    assert (again.summary, again.dataset_hash, again.class_names) == (first.summary, first.dataset_hash, first.class_names)
    assert again.summary["quarantined"] == 1 and again.summary["duplicates"] == 1  # still listed

    copy = refresh_manifest(root, tmp_path / "elsewhere.parquet", cfg, previous=out)  # the task's cache -> run folder
    assert calls == [] and not copy.changed
    assert (tmp_path / "elsewhere.parquet").read_bytes() == out.read_bytes()

    # other settings: the same files make another manifest (splits), so it is rebuilt, still unread
    salted = refresh_manifest(root, out, cfg.model_copy(update={"split_salt": "other"}))
    assert salted.changed and salted.read == 0 and calls == []


def test_changed_added_and_removed_files_are_handled(tmp_path, monkeypatch):
    cfg = ingest_config()
    root, out = tmp_path / "data", tmp_path / "manifest.parquet"
    make_classes(root, {"a": 6, "b": 6})
    put(root, "a/broken.jpg", b"not an image")
    refresh_manifest(root, out, cfg)
    calls = _counting(monkeypatch)

    same_size = root / "a" / "img_001.jpg"
    os.utime(same_size, ns=(1, 1))  # same size, another mtime
    new_size = put(root, "b/img_002.jpg", picture(777))  # new content, new size
    put(root, "b/added.jpg", picture(778))
    (root / "a" / "img_003.jpg").unlink()
    result = refresh_manifest(root, out, cfg)
    assert sorted(calls) == ["a/img_001.jpg", "b/added.jpg", "b/img_002.jpg"]
    assert result.changed and result.read == 3
    manifest = read_manifest(out)
    assert "a/img_003.jpg" not in set(manifest["path"])  # removed files are dropped
    assert {"b/added.jpg", "a/broken.jpg"} <= set(manifest["path"])  # quarantined files stay listed
    row = manifest.set_index("path").loc["b/img_002.jpg"]
    assert row["bytes"] == new_size.stat().st_size
    assert result.summary["files"] == 13 == len(manifest)

    monkeypatch.undo()
    fresh, _ = build_manifest(root, cfg)
    # the same manifest as a first run
    assert read_manifest(out).equals(read_manifest(write_manifest(fresh, tmp_path / "fresh.parquet")))


def test_unchanged_scored_needs_the_same_stat_version_and_a_row(tmp_path):
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    from cvlib.inference.resume import stat_paths, unchanged_scored, write_stat_table

    names = ["a.jpg", "b.jpg", "c.jpg", "gone.jpg"]
    for name in names[:3]:
        (tmp_path / name).write_bytes(name.encode() * 10)
    size, mtime = stat_paths(tmp_path, names)
    assert size[3] == -1 and mtime[3] == -1  # missing: never taken as unchanged
    index = write_stat_table(tmp_path / "index.parquet", names, size, mtime, "v1")
    rows = tmp_path / "rows.parquet"  # the output holds rows for a, b and gone, not c
    pq.write_table(pa.table({"path": ["a.jpg", "b.jpg", "gone.jpg"], "sha256": ["x", "y", None], "model_version": ["v1"] * 3}), rows)

    assert unchanged_scored(index, [rows], "v1", names, size, mtime).tolist() == [True, True, False, False]
    assert not unchanged_scored(index, [rows], "v2", names, size, mtime).any()  # another model
    assert not unchanged_scored(tmp_path / "none.parquet", [rows], "v1", names, size, mtime).any()

    (tmp_path / "b.jpg").write_bytes(b"changed")
    os.utime(tmp_path / "a.jpg", ns=(5, 5))  # same size, another mtime
    size2, mtime2 = stat_paths(tmp_path, names)
    assert not unchanged_scored(index, [rows], "v1", names, size2, mtime2).any()


class _FreezeCount(Dataset):
    """Each item: how many objects the worker's garbage collector is told to leave alone."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> int:
        return gc.get_freeze_count()


@pytest.mark.parametrize("persistent", [False, True])
def test_loader_workers_fork_with_the_parents_objects_frozen(persistent):
    """Worker processes fork with the parent's objects frozen (a collection there would otherwise
    copy every page of the parent's heap that holds a container); the parent gets them back."""
    assert gc.get_freeze_count() == 0
    loader = make_loader(_FreezeCount(), batch_size=2, num_workers=2, persistent_workers=persistent)
    for _ in range(2):  # a second epoch reuses persistent workers or forks new ones
        counts = [int(c) for batch in loader for c in batch]
        assert len(counts) == 4 and min(counts) > 1000, counts
        assert gc.get_freeze_count() == 0  # unfrozen in the parent as soon as the workers exist
