"""Fixtures shared by the integration tests: the servers of a backend, and one real retraining
run on them.

The whole integration suite runs on both backends: ``mlflow_server`` and ``prefect_server`` are
here the session servers of the ``backend`` parameter (SQLite, then PostgreSQL: MLflow's store
through psycopg2, Prefect's server through asyncpg; see tests/conftest.py). So every test that
talks to a server, directly or through ``retrained``, ``on_servers`` or ``on_prefect``, runs
once per backend, and its PostgreSQL half carries the ``postgres`` marker.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.conftest import flush_prefect_workers, reset_mlflow_globals
from tests.integration.support import small_config


@pytest.fixture(scope="session")
def mlflow_server(mlflow_server_on: str) -> str:
    return mlflow_server_on


@pytest.fixture(scope="session")
def prefect_server(prefect_server_on: str) -> str:
    return prefect_server_on


@pytest.fixture(scope="session")
def retrained(digits_dir, mlflow_server, prefect_server, tmp_path_factory):
    """One retraining run on the real servers, shared by the integration tests."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.retrain import retrain

    name = f"skeleton-{uuid.uuid4().hex[:8]}"
    out = tmp_path_factory.mktemp("retrain")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    mp.setenv("MLFLOW_REGISTRY_URI", mlflow_server)
    mp.setenv("PREFECT_API_URL", prefect_server)
    flush_prefect_workers()
    try:
        with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
            result = retrain(data_dir=str(digits_dir), config=small_config(name), output_dir=str(out))
            flush_prefect_workers()  # the run's task-run events reach this server, not the next test's
    finally:  # nothing process-wide outlives the fixture's setup
        reset_mlflow_globals()
        mp.undo()
    from tasks.records import IngestResult

    ingest = IngestResult(
        data_dir=str(digits_dir), manifest_path=result.manifest, dataset_hash="h",
        class_names=[str(d) for d in range(10)], summary={},
    )
    return {"result": result, "name": name, "out": out, "ingest": ingest}


@pytest.fixture
def on_servers(mlflow_server, prefect_server, use_mlflow, use_prefect):
    use_mlflow(mlflow_server)
    use_prefect(prefect_server)




DIGIT_CLASSES = [str(d) for d in range(10)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A small untrained SimpleCNN package for the ten digit classes (32 px): enough to run
    scoring and reports end to end without a retraining run."""
    import torch

    from cvlib.models.factory import create_model
    from cvlib.training.checkpoint import save_atomic

    torch.manual_seed(0)
    model = create_model("simple_cnn", 10, weights="none", hidden_dim=32, dropout=0.0)
    meta = {"arch": "simple_cnn", "class_names": DIGIT_CLASSES, "head": {"hidden_dim": 32, "dropout": 0.0},
            "preprocessing": {"image_size": 32, "resize_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}}
    return save_atomic({"model": model.state_dict(), "meta": meta}, tmp_path_factory.mktemp("model") / "digits.pt")


@pytest.fixture
def on_prefect(prefect_server, use_prefect):
    """This test's flows run on the session's real Prefect server."""
    use_prefect(prefect_server)
