"""Bad input, tried as a new user would: every mistake is one line on stderr that names the flag or
the file, a non-zero exit, no traceback, and no Prefect server started for nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.e2e.test_cli import run_cli


@pytest.fixture(scope="module")
def files(tmp_path_factory, digits_dir) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad-input")
    (root / "bad.json").write_text("{not json")
    (root / "zero-epochs.json").write_text(json.dumps({"train": {"epochs": 0}}))
    (root / "typo.json").write_text(json.dumps({"data": {"val_fractoin": 0.3}}))
    (root / "not-a-section.json").write_text(json.dumps({"train": 5}))
    (root / "no-validation.json").write_text(json.dumps({"data": {"val_fraction": 0}}))
    torch.save({"not": "a model"}, root / "empty.pt")
    return {"DIR": str(digits_dir), "IMG": str(next(Path(digits_dir, "3").iterdir())), "TMP": str(root)}


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """One visionflow home for the module: its MLflow store is created once. No case may start a
    Prefect server there (each asserts so)."""
    return tmp_path_factory.mktemp("home")


# (arguments, what the one line must name). DIR: a real image folder; TMP: a scratch folder.
CASES = [
    ("retrain DIR --epochs -3", "--epochs"),
    ("retrain DIR --epochs abc", "--epochs"),
    ("retrain DIR --lr 0", "--lr"),
    ("retrain DIR --precision fp8", "--precision"),
    ("retrain DIR --epoch 3", "--epoch"),
    ("retrain TMP/nope", "TMP/nope"),
    ("retrain DIR --config TMP/missing.json", "TMP/missing.json"),
    ("retrain DIR --config TMP/bad.json", "TMP/bad.json"),
    ("retrain DIR --config TMP/zero-epochs.json", "train.epochs"),
    ("retrain DIR --config TMP/not-a-section.json", "train"),
    ("retrain DIR --config TMP/no-validation.json", "val_fraction"),
    ("ingest DIR --out TMP/m.parquet --config TMP/typo.json", "data.val_fractoin"),
    ("score DIR --model models:/nope@champion --out TMP/p.parquet", "models:/nope@champion"),
    ("score DIR --model models:/nope --out TMP/p.parquet", "models:/NAME/VERSION"),
    ("score DIR --model /etc/passwd --out TMP/p.parquet", "/etc/passwd"),
    ("score DIR --model torchvision/resnet18 --weights none --dask-workers 0 --out TMP/p", "--dask-workers"),
    ("score TMP/nope --model /etc/passwd --out TMP/p.parquet", "TMP/nope"),
    ("score DIR --model TMP/empty.pt --out TMP/p.parquet --batch-size 0", "--batch-size"),
    ("score DIR --model TMP/empty.pt --out TMP/p.parquet --loader-workers -1", "--loader-workers"),
    ("explain DIR --model /etc/passwd --out TMP/r.html", "/etc/passwd"),
    ("explain DIR --model TMP --out TMP/r.html", "visionflow.json"),
    ("explain DIR --model TMP/empty.pt --out TMP/r.html --samples 0", "--samples"),
    ("featuremaps IMG --model /etc/passwd --layer x --out TMP/f.png", "/etc/passwd"),
    ("demo-data TMP/d --image-size 0", "--image-size"),
]


@pytest.mark.parametrize(("argv", "named"), CASES, ids=[c[0].split()[0] + ":" + c[1] for c in CASES])
def test_bad_input_is_one_line(files, home, argv, named):
    args = [files.get(a, a) for a in argv.split()]
    args = [a.replace("TMP/", files["TMP"] + "/") for a in args]
    proc = run_cli(*args, home=home, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("warning:")]
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: ") and named.replace("TMP/", files["TMP"] + "/") in lines[0], lines[0]
    assert "Traceback" not in proc.stderr and "Prefect API" not in proc.stdout


def test_old_flag_names_work_for_one_release_with_a_warning(files, tmp_path):
    out = tmp_path / "digits"
    proc = run_cli("demo-data", str(out), "--size", "16", "--per-class", "1", home=tmp_path / "home")
    assert proc.returncode == 0, proc.stderr
    assert "--size is deprecated" in proc.stderr and "--image-size" in proc.stderr
    from PIL import Image

    with Image.open(next((out / "0").iterdir())) as im:
        assert im.size == (16, 16)
