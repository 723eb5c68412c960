"""Both backends are what they claim to be.

The whole integration suite runs once per backend (``backend``: SQLite, then PostgreSQL for the
MLflow store and for the Prefect server, see tests/integration/conftest.py). These tests check
the PostgreSQL half from the database side: the session's retraining run is rows in PostgreSQL,
not in some SQLite file a misconfigured server fell back to. A store-level test runs on a
database of its own (``fresh_postgres_db``), made and dropped around it.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def _rows(url: str, sql: str, *args) -> list[tuple]:
    import psycopg2

    name = url.rsplit("/", 1)[1]
    with psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname=name) as conn, conn.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchall()


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_the_postgres_servers_keep_the_run_in_postgres(backend, retrained, postgres_url, prefect_postgres_url):
    """The retraining run of the PostgreSQL half: its MLflow run, model version and alias are
    rows of the MLflow database, and its flow run and task runs rows of the Prefect one."""
    result, name = retrained["result"], retrained["name"]
    assert _rows(postgres_url, "SELECT status FROM runs WHERE run_uuid = %s", result.run_id) == [("FINISHED",)]
    assert _rows(postgres_url, "SELECT version FROM model_versions WHERE name = %s", name) == [(int(result.version),)]
    aliases = _rows(postgres_url, "SELECT alias, version FROM registered_model_aliases WHERE name = %s", name)
    assert ("champion", int(result.version)) in aliases
    assert _rows(prefect_postgres_url, "SELECT state_type FROM flow_run WHERE id = %s", result.flow_run_id) == [("COMPLETED",)]
    tasks = _rows(prefect_postgres_url, "SELECT count(*) FROM task_run WHERE flow_run_id = %s", result.flow_run_id)[0][0]
    assert tasks >= 6, "ingest, start run, fine-tune, validate, register, gate"


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
