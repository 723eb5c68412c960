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
