"""The CLI as a user runs it: a subprocess, embedded defaults (SQLite MLflow store under the
visionflow home, the local Prefect server the first flow command starts there), nothing configured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

VISIONFLOW = str(Path(sys.executable).parent / "visionflow")


def run_cli(*args: str, home: Path, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PREFECT_API_URL")}
    full_env.update(VISIONFLOW_HOME=str(home), PREFECT_HOME=str(home / "prefect"), **env)
    return subprocess.run([VISIONFLOW, *args], env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def home(tmp_path):
    """A fresh visionflow home; a local Prefect server a command starts there is stopped afterwards."""
    home = tmp_path / "home"
    yield home
    run_cli("server", "stop", home=home, timeout=60)


def test_help_works_and_the_cli_imports_nothing_heavy(home):
    proc = run_cli("--help", home=home)
    assert proc.returncode == 0
    assert "retrain" in proc.stdout and "score" in proc.stdout
    # Start-up cost is what users feel: the CLI module itself must not import torch, Prefect or MLflow.
    code = "import sys, flows.cli; heavy = {'torch', 'prefect', 'mlflow'} & set(sys.modules); print(sorted(heavy))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_missing_pretrained_weights_fail_clearly(tmp_path, home, digits_dir):
    """Offline, --weights DEFAULT cannot be had: one clear line naming the remedies, no traceback."""
    proc = run_cli("retrain", str(digits_dir), "--weights", "DEFAULT", home=home, TORCH_HOME=str(tmp_path / "torch"))
    if proc.returncode == 0:
        pytest.skip("pretrained weights were available (network or cache)")
    assert proc.returncode == 2
    assert "--weights none" in proc.stderr and "--weights PATH" in proc.stderr
    assert "Traceback" not in proc.stderr and "Downloading:" not in proc.stdout + proc.stderr


def test_bad_data_folder_is_one_line(tmp_path, home):
    proc = run_cli("retrain", str(tmp_path / "nope"), "--weights", "none", home=home)
    assert proc.returncode == 2
    assert "nope" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_retrain_score_explain_on_embedded_defaults(tmp_path, home):
    data = tmp_path / "digits"
    proc = run_cli("demo-data", str(data), "--per-class", "10", "--image-size", "32", home=home)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli(
        "retrain", str(data), "--epochs", "1", "--image-size", "32", "--batch-size", "16", "--arch", "resnet18",
        "--weights", "none", "--loader-workers", "0", "--model-name", "cli", home=home,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "models:/cli/1" in proc.stdout
    assert f"sqlite:///{home.resolve()}/mlflow.db" in proc.stdout
    assert (home / "mlflow.db").is_file() and (home / "mlartifacts").is_dir()

    out = tmp_path / "pred.parquet"
    proc = run_cli("score", str(data / "4"), "--model", "models:/cli@champion", "--out", str(out), home=home)
    assert proc.returncode == 0, proc.stderr[-4000:]
    df = pd.read_parquet(out)
    assert len(df) == 10 and (df["status"] == "ok").all()

    # The flow runs are recorded by the local Prefect server the first command started.
    status = run_cli("server", "status", home=home)
    assert status.returncode == 0, status.stdout + status.stderr
    info = json.loads((home / "prefect" / "server.json").read_text())
    assert info["api_url"].startswith("http://127.0.0.1:")
    with urllib.request.urlopen(urllib.request.Request(f"{info['api_url']}/flow_runs/filter", data=b"{}", method="POST",
                                                       headers={"Content-Type": "application/json"}), timeout=10) as resp:
        runs = json.loads(resp.read())
    assert {r["state"]["type"] for r in runs} == {"COMPLETED"}
    assert any(r["name"].startswith("retrain-") for r in runs) and any(r["name"].startswith("score-") for r in runs)

    report = tmp_path / "report.html"
    proc = run_cli("explain", str(data), "--model", "models:/cli/1", "--out", str(report), "--samples", "4", home=home)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert report.read_text().count('class="card sample"') == 4
