"""The core flows on both backends: MLflow and the Prefect server on SQLite, and both on
PostgreSQL (the production backend; Prefect's server through asyncpg).

The round trip (retrain -> register -> champion -> score by alias) runs once per backend on
that backend's session servers; the ``postgres`` half carries the ``postgres`` marker (see
tests/conftest.py). A store-level test runs on a database of its own (``fresh_postgres_db``).
"""

from __future__ import annotations

import uuid

import pandas as pd
import pytest

from cvlib.inference.options import ScoreConfig
from tests.conftest import mlflow_client
from tests.integration.support import small_config

pytestmark = pytest.mark.slow


def test_retrain_register_and_score_round_trip(backend, mlflow_server_on, prefect_server_on, use_mlflow, use_prefect,
                                               digits_dir, tmp_path):  # fmt: skip
    from prefect import get_client

    from flows.retrain import retrain
    from flows.score import score
    from tasks.registry import register_model

    use_mlflow(mlflow_server_on)
    use_prefect(prefect_server_on)
    name = f"{backend}-{uuid.uuid4().hex[:8]}"
    result = retrain(data_dir=str(digits_dir), config=small_config(name, arch="simple_cnn"), output_dir=str(tmp_path / "run"))
    assert result.version == "1" and result.promoted

    client = mlflow_client(mlflow_server_on)
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in sorted(client.get_metric_history(result.run_id, "train_loss"), key=lambda m: m.step)] == [1]
    # A retried registration finds the version of its run: still exactly one.
    again = register_model.fn(result.run_id, result.checkpoint, name, _validation(result))
    assert again.version == "1" and len(client.search_model_versions(f"name = '{name}'")) == 1

    with get_client(sync_client=True) as prefect:
        flow_run = prefect.read_flow_run(result.flow_run_id)
    assert flow_run.state.is_completed()

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for src in sorted((digits_dir / "7").glob("*.png"))[:3]:
        (inputs / src.name).write_bytes(src.read_bytes())
    out = tmp_path / "pred.parquet"
    score(input_dir=str(inputs), model_uri=f"models:/{name}@champion", out=str(out), config=ScoreConfig(num_workers=0))
    df = pd.read_parquet(out)
    assert len(df) == 3 and (df["status"] == "ok").all() and (df["model_version"] == "1").all()


def _validation(result):
    from tasks.records import Validation

    return Validation(metrics=result.metrics, n=1)


def test_mlflow_registry_on_a_fresh_postgres_database(fresh_postgres_db, tmp_path):
    """MLflow's own store on a database of this test alone: the schema is created from nothing,
    and versions, tags and aliases behave as on the server."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=fresh_postgres_db, registry_uri=fresh_postgres_db)
    exp = client.create_experiment("fresh", artifact_location=(tmp_path / "artifacts").as_uri())
    runs = [client.create_run(exp).info.run_id for _ in range(2)]
    client.create_registered_model("m")
    versions = [client.create_model_version("m", f"runs:/{r}/model", run_id=r, tags={"visionflow.run_id": r}) for r in runs]
    client.set_registered_model_alias("m", "champion", versions[1].version)
    assert [str(v.version) for v in versions] == ["1", "2"]  # the SQL store says 1, the REST one "1"
    assert client.get_model_version_by_alias("m", "champion").tags["visionflow.run_id"] == runs[1]
    assert {str(v.version) for v in client.search_model_versions("name = 'm'")} == {"1", "2"}
