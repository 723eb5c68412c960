"""``visionflow export`` on a local package: the OpenVINO files land in the package, the figures
are printed, and a bad input is one line."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    import torch

    from cvlib.models.factory import create_model
    from cvlib.training.checkpoint import save_package

    torch.manual_seed(0)
    model = create_model("simple_cnn", 10, weights="none", hidden_dim=16, dropout=0.0, width=8).eval()
    meta = {"arch": "simple_cnn", "class_names": [str(d) for d in range(10)], "head": {"hidden_dim": 16, "dropout": 0.0},
            "model_kwargs": {"width": 8},
            "preprocessing": {"image_size": 32, "resize_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}}  # fmt: skip
    return save_package(model, meta, tmp_path_factory.mktemp("export") / "package")


def test_export_a_local_package_fp32_by_default(package, digits_dir, capsys):
    from flows.cli import main

    assert main(["export", str(package), "--data", str(digits_dir)]) == 0
    record = json.loads((package / "openvino" / "export.json").read_text())
    assert record["calibration_images"] == 0 and not (package / "openvino" / "model_int8.xml").exists()
    assert record["candidates"][0]["precision"] in ("bf16", "fp32")
    out = capsys.readouterr().out
    assert "export finished" in out and record["status"] in out


def test_export_errors_are_one_line(package, tmp_path, capsys):
    from flows.cli import main

    assert main(["export", str(package)]) == 2
    assert "--data DIR is needed" in capsys.readouterr().err
    assert main(["export", str(package), "--data", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["export", str(package), "--data", str(tmp_path), "--min-agreement", "1.5"]) == 2
    err = capsys.readouterr().err
    assert "--min-agreement" in err and len(err.strip().splitlines()) == 1
