"""`visionflow ingest` on a folder laid out by split (train/CLASS, val/CLASS) says so, and a split
layout whose class lists differ is one clear line, not a traceback. No servers: ingest is local."""

from __future__ import annotations

import json

import pandas as pd

from tests.e2e.test_cli import run_cli
from tests.unit.ingest_support import picture, put


def _ants_bees(root, val_classes=("ants", "bees")) -> None:
    for i in range(4):
        put(root, f"train/ants/a{i}.jpg", picture(i))
        put(root, f"train/bees/b{i}.jpg", picture(100 + i))
    for j, label in enumerate(val_classes):
        for i in range(2):
            put(root, f"val/{label}/v{i}.jpg", picture(1000 + 10 * j + i))


def test_ingest_names_the_split_layout(tmp_path):
    _ants_bees(tmp_path / "data")
    out = tmp_path / "manifest.parquet"
    proc = run_cli("ingest", str(tmp_path / "data"), "--out", str(out), home=tmp_path / "home", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "split folders train/val found: using the given split" in proc.stdout
    printed = json.loads(proc.stdout[proc.stdout.index("{") : proc.stdout.rindex("}") + 1])
    assert printed["classes"] == 2 and printed["splits"] == {"train": 8, "val": 4}
    manifest = pd.read_parquet(out)
    assert sorted(set(manifest["label"])) == ["ants", "bees"]


def test_split_folders_with_different_classes_fail_in_one_line(tmp_path):
    _ants_bees(tmp_path / "data", val_classes=("ants", "wasps"))
    proc = run_cli("ingest", str(tmp_path / "data"), "--out", str(tmp_path / "m.parquet"), home=tmp_path / "home", timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "'val' lacks bees" in proc.stderr and "'train' lacks wasps" in proc.stderr
    assert "Traceback" not in proc.stderr
