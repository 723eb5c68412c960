"""What a user does with deployments: a real `prefect server start`, `prefect deploy` from
deployments/prefect.yaml, a process worker, and `prefect deployment run` through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pandas as pd
import pytest

from tests import servers
from tests.conftest import mlflow_client

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).parent / "prefect")


def prefect_cli(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([PREFECT, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"prefect {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture
def user_env(prefect_server, mlflow_server, tmp_path, digits_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(
        PREFECT_API_URL=prefect_server,
        MLFLOW_TRACKING_URI=mlflow_server, MLFLOW_REGISTRY_URI=mlflow_server,
        VISIONFLOW_HOME=str(tmp_path / "home"),
        VISIONFLOW_ROOT=str(ROOT),
        VISIONFLOW_DATA_DIR=str(digits_dir),
        PREFECT_WORKER_QUERY_SECONDS="2",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    return env


@pytest.fixture
def worker(user_env, tmp_path):
    prefect_cli("work-pool", "create", "visionflow", "--type", "process", "--overwrite", env=user_env)
    prefect_cli("--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml", env=user_env)
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([PREFECT, "worker", "start", "--pool", "visionflow", "--type", "process"],
                                env=user_env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield log
    finally:
        servers.stop(proc)


def test_deployment_run_retrains_and_scores(user_env, worker, mlflow_server, digits_dir, tmp_path):

    name = f"deployed-{uuid.uuid4().hex[:6]}"
    params = {
        "data_dir": str(digits_dir),
        "config": {
            "model_name": name,
            "augment": {"image_size": 32, "resize_ratio": 1.0, "hflip": 0.0},
            "train": {"arch": "resnet18", "weights": "none", "epochs": 1, "batch_size": 16, "num_workers": 0, "progress": False},
            "report": {"samples": 4},
        },
        "output_dir": str(tmp_path / "run"),
    }
    proc = prefect_cli("deployment", "run", "retrain/scheduled", "--params", json.dumps(params),
                       "--watch", "--watch-timeout", "600", env=user_env, timeout=700)
    assert "Completed" in proc.stdout, proc.stdout[-2000:] + worker.read_text()[-3000:]
    client = mlflow_client(mlflow_server)
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.version == "1"
    assert (tmp_path / "run" / "report.html").is_file() and (tmp_path / "run" / "manifest.parquet").is_file()

    out = tmp_path / "pred.parquet"
    params = {"input_dir": str(digits_dir / "2"), "model_uri": f"models:/{name}@champion", "out": str(out)}
    proc = prefect_cli("deployment", "run", "score/on-demand", "--params", json.dumps(params),
                       "--watch", "--watch-timeout", "300", env=user_env, timeout=400)
    assert "Completed" in proc.stdout, proc.stdout[-2000:] + worker.read_text()[-3000:]
    df = pd.read_parquet(out)
    assert len(df) == len(list((digits_dir / "2").glob("*.png"))) and (df["status"] == "ok").all()
