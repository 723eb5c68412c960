"""Cost that grows with the number of files (issue 15), checked at small N: what must not be
per-row Python objects, quadratic, or a payload that grows with the folder.

The timings themselves are in benchmarks/growth.py; these tests pin the mechanisms.
"""

from __future__ import annotations

import pandas as pd

from cvlib.data import inspection
from cvlib.data.ingest import PreviousRows, _previous_rows, build_manifest
from cvlib.data.manifest import write_manifest
from tests.unit.ingest_support import ingest_config, make_classes, put


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
        prev = _previous_rows(previous)
        assert isinstance(prev, PreviousRows) and len(prev) == len(first)
        assert all(isinstance(v, list) for v in prev.columns.values())
        again, _ = build_manifest(root, cfg, previous=previous)
        assert calls == []  # every file reused, none read
        assert again.equals(first)
    assert _previous_rows(tmp_path / "missing.parquet").get("a/img_000.jpg") is None


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
