"""Prefect across hosts: the servers on host A, a process worker on host B, a user on host C.

Host A runs ``prefect server`` and ``mlflow server --artifacts-destination`` (proxied artifacts:
clients upload and download through the server, so B and C need no path of A's). Host B runs
``prefect worker start --pool visionflow`` with its own ``VISIONFLOW_HOME``. The deployments of
deployments/prefect.yaml are deployed from B; ``prefect deployment run 'retrain/scheduled'`` and
``'score/on-demand'`` complete; the new version's artifacts are in A's artifact store; from host
C, ``visionflow score --model models:/NAME@champion`` fetches the model from A and scores.
"""

from __future__ import annotations

import json
import signal
import sys
import uuid
from pathlib import Path

import pandas as pd
import pytest

from tests.multihost.conftest import BIN, MLFLOW_PORT, REPO, host_env, kill_group, tail, wait_http

pytestmark = pytest.mark.slow


@pytest.fixture
def mlflow_on_a(hosts, tmp_path):
    a = hosts[0]
    store = tmp_path / "a-mlflow"
    store.mkdir()
    log = tmp_path / "mlflow-server.log"
    cmd = [BIN / "mlflow", "server", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
           "--artifacts-destination", store / "artifacts", "--host", a.address, "--port", str(MLFLOW_PORT), "--workers", "1"]  # fmt: skip
    proc = a.popen(cmd, env=host_env(store / "home"), log=log)
    url = f"http://{a.address}:{MLFLOW_PORT}"
    try:
        wait_http(a, f"{url}/health", proc, log)
        yield url, store / "artifacts"
    finally:
        kill_group(proc, signal.SIGTERM)


def _user_env(tmp_path: Path, label: str, prefect: str, mlflow: str, **extra: str) -> dict[str, str]:
    return host_env(tmp_path / f"{label}-home", PREFECT_API_URL=prefect, MLFLOW_TRACKING_URI=mlflow,
                    MLFLOW_REGISTRY_URI=mlflow, VISIONFLOW_ROOT=str(REPO), PREFECT_WORKER_QUERY_SECONDS="2", **extra)  # fmt: skip


def _prefect(host, env, *args: str, timeout: float = 300) -> str:
    proc = host.run([BIN / "prefect", *args], env=env, cwd=REPO, timeout=timeout, check=False)
    assert proc.returncode == 0, f"prefect {' '.join(args)} on host {host.label}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_worker_on_b_retrains_and_scores_and_c_scores_the_champion(hosts, prefect_on_a, mlflow_on_a, digits_dir, tmp_path):
    a, b, c = hosts
    mlflow, artifacts = mlflow_on_a
    b_env = _user_env(tmp_path, "b", prefect_on_a, mlflow, VISIONFLOW_DATA_DIR=str(digits_dir))
    _prefect(b, b_env, "work-pool", "create", "visionflow", "--type", "process", "--overwrite")
    _prefect(b, b_env, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
    worker_log = tmp_path / "worker-b.log"
    worker = b.popen([BIN / "prefect", "worker", "start", "--pool", "visionflow", "--type", "process"], env=b_env,
                     log=worker_log, cwd=REPO)  # fmt: skip
    try:
        a_env = _user_env(tmp_path, "a", prefect_on_a, mlflow)
        name = f"multihost-{uuid.uuid4().hex[:6]}"
        params = {
            "data_dir": str(digits_dir), "output_dir": str(tmp_path / "run"),
            "config": {"model_name": name, "augment": {"image_size": 32, "resize_ratio": 1.0, "hflip": 0.0},
                       "train": {"arch": "simple_cnn", "weights": "none", "epochs": 1, "batch_size": 16, "num_workers": 0,
                                 "hidden_dim": 32, "progress": False},
                       "report": {"samples": 4}},
        }  # fmt: skip
        out = _prefect(a, a_env, "deployment", "run", "retrain/scheduled", "--params", json.dumps(params), "--watch",
                       "--watch-timeout", "400", timeout=450)  # fmt: skip
        assert "Completed" in out, out[-2000:] + tail(worker_log)
        pred = tmp_path / "deployed.parquet"
        params = {"input_dir": str(digits_dir / "2"), "model_uri": f"models:/{name}@champion", "out": str(pred)}
        out = _prefect(a, a_env, "deployment", "run", "score/on-demand", "--params", json.dumps(params), "--watch",
                       "--watch-timeout", "300", timeout=350)  # fmt: skip
        assert "Completed" in out, out[-2000:] + tail(worker_log)
    finally:
        kill_group(worker, signal.SIGTERM)
    n = len(list((digits_dir / "2").glob("*.png")))
    assert len(pd.read_parquet(pred)) == n
    # the version's files went through the server into A's artifact store
    assert any(p.name == "MLmodel" for p in artifacts.rglob("MLmodel")), sorted(artifacts.rglob("*"))[:20]

    c_env = _user_env(tmp_path, "c", prefect_on_a, mlflow)
    c_out = tmp_path / "from-c.parquet"
    proc = c.run([sys.executable, "-m", "flows.cli", "score", digits_dir / "2", "--model", f"models:/{name}@champion",
                  "--out", c_out, "--loader-workers", "0"], env=c_env, check=False, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    df = pd.read_parquet(c_out)
    assert len(df) == n and (df["status"] == "ok").all() and (df["model_version"] == "1").all()
    assert not (tmp_path / "c-home").joinpath("mlruns").exists()  # C read the model over HTTP, from no shared store
