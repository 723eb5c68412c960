"""The walking skeleton on real servers: retrain, score and explain as Prefect flows recorded by a
real Prefect server, with the model registered in a real MLflow server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cvlib.explain.options import ReportConfig
from cvlib.inference.options import ScoreConfig
from tests.conftest import mlflow_client
from tests.integration.support import small_config

pytestmark = pytest.mark.slow


def test_registered_version_is_champion(retrained, on_servers):

    client = mlflow_client(os.environ["MLFLOW_TRACKING_URI"])
    name, version = retrained["name"], retrained["result"].version
    mv = client.get_model_version(name, version)
    assert mv.tags["visionflow.run_id"] == retrained["result"].run_id
    assert str(client.get_model_version_by_alias(name, "champion").version) == version
    gate = retrained["result"].gate
    assert retrained["result"].promoted and gate.champion_version is None, "the flow's result carries the gate's decision"
    assert mv.tags["visionflow.gate.reason"] == gate.reason == "no champion yet: the first version becomes champion"
    run = client.get_run(retrained["result"].run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.arch"] == "simple_cnn"
    assert "val_top1" in run.data.metrics and "train_loss" in run.data.metrics
    assert json.loads(run.data.tags["visionflow.class_names"]) == [str(d) for d in range(10)]


def test_prefect_server_recorded_the_flow_and_tasks(retrained, on_servers):
    from prefect import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterFlowRunId

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(retrained["result"].flow_run_id)
        # Only this flow run's: the server holds every test's task runs, and a page of them
        # (the default limit) may not reach back to this one's.
        tasks = client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[run.id])))
    assert run.name == "retrain-digits" and run.state.is_completed()
    names = {t.name.rsplit("-", 1)[0] for t in tasks if t.flow_run_id == run.id}
    assert {"ingest", "start-mlflow-run", "fine-tune", "validate", "register-model", "champion-gate"} <= names


def test_model_loads_from_registry_in_a_fresh_process(retrained, mlflow_server, digits_dir, tmp_path):
    """No access to the training run's files: a new home and only the registry URI."""
    image = sorted((digits_dir / "7").glob("*.png"))[0]
    code = (
        "import mlflow, pandas as pd, sys\n"
        f"m = mlflow.pyfunc.load_model('models:/{retrained['name']}@champion')\n"
        f"out = m.predict(pd.DataFrame({{'path': [{str(image)!r}]}}))\n"
        "print(out.to_json(orient='records'))\n"
    )
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server, MLFLOW_REGISTRY_URI=mlflow_server, VISIONFLOW_HOME=str(tmp_path / "elsewhere"))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rows[0]["status"] == "ok"
    assert rows[0]["top1_label"] in [str(d) for d in range(10)]
    assert len(rows[0]["top5_labels"]) == 5


@pytest.mark.store_agnostic
def test_score_flow_writes_one_row_per_file(retrained, on_servers, digits_dir, tmp_path):
    from flows.score import score

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for src in sorted((digits_dir / "3").glob("*.png"))[:5]:
        (inputs / src.name).write_bytes(src.read_bytes())
    (inputs / "broken.jpg").write_text("not an image")
    (inputs / "empty.png").write_bytes(b"")
    out = tmp_path / "pred.parquet"
    result = score(input_dir=str(inputs), model_uri=f"models:/{retrained['name']}@champion", out=str(out), config=ScoreConfig(num_workers=0))
    df = pd.read_parquet(out)
    assert len(df) == result.files == 7
    assert sorted(df["path"]) == sorted(p.name for p in inputs.iterdir())
    bad = df.set_index("path").loc[["broken.jpg", "empty.png"]]
    assert list(bad["status"]) == ["not_an_image", "empty"]
    assert bad["error"].notna().all() and bad["top1_label"].isna().all()
    good = df[df["status"] == "ok"]
    assert len(good) == 5
    for probs, labels, top1 in zip(good["top5_probs"], good["top5_labels"], good["top1_label"], strict=True):
        probs = np.asarray(probs)
        assert len(probs) == 5 and probs.sum() <= 1 + 1e-5
        assert np.all(np.diff(probs) <= 0), "probabilities must be in descending order"
        assert labels[0] == top1
    assert (df["model_version"] == retrained["result"].version).all()


@pytest.mark.store_agnostic
def test_explain_flow_report_has_one_image_per_sample(retrained, on_servers, digits_dir, tmp_path):
    from flows.explain import explain

    out = tmp_path / "report.html"
    explain(input_dir=str(digits_dir), model_uri=f"models:/{retrained['name']}/{retrained['result'].version}", out=str(out), config=ReportConfig(samples=5))
    html = out.read_text()
    assert html.count('class="card sample"') == 5
    assert "http://" not in html.replace("http://www.w3.org", "") and "https://" not in html, "report must be self-contained"


def test_retrain_report_attached_to_the_run(retrained, on_servers):

    report = Path(retrained["result"].report)
    assert report.read_text().count('class="card sample"') == 6
    artifacts = [a.path for a in mlflow_client(os.environ["MLFLOW_TRACKING_URI"]).list_artifacts(retrained["result"].run_id, "report")]
    assert "report/report.html" in artifacts


def test_retried_registration_then_resolved_by_alias(retrained, on_servers):
    """Register the same checkpoint from a new run twice (a retried task): one version; it passes
    the gate, resolves by alias and loads. On each backend's registry."""
    from cvlib.promotion import GateConfig
    from cvlib.training.checkpoint import load_package
    from tasks.records import IngestResult, Validation
    from tasks.registry import champion_gate, register_model, resolve_model, start_run

    name = f"again-{uuid.uuid4().hex[:8]}"
    config = small_config(name)
    ingest = IngestResult(data_dir="d", manifest_path="m", dataset_hash="h", class_names=[str(d) for d in range(10)], summary={})
    run_id = start_run.fn(config, ingest)
    registered = register_model.fn(run_id, retrained["result"].checkpoint, name, Validation(metrics={"val_top1": 0.5}, n=1))
    again = register_model.fn(run_id, retrained["result"].checkpoint, name, Validation(metrics={"val_top1": 0.5}, n=1))
    assert again.version == registered.version, "a retried registration must not create a second version"
    assert champion_gate.fn(registered, ingest, Validation(metrics={"val_top1": 0.5}, n=1), GateConfig()).promoted
    local, version = resolve_model(f"models:/{name}@champion")
    model, meta = load_package(local)
    assert version == registered.version and meta["arch"] == "simple_cnn"
