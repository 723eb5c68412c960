"""The MLflow side of retraining on a real `mlflow server`: the champion gate re-measures the
champion, concurrent registrations, REST access to metric histories, and `mlflow models serve`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests import servers
from tests.conftest import mlflow_client

pytestmark = pytest.mark.slow


def _register_copy(retrained, name: str, run_tag: str):
    """Register the retrained checkpoint again under ``name`` from a fresh MLflow run."""
    from tasks.records import Validation
    from tasks.registry import register_model, start_run
    from tests.integration.support import small_config

    run_id = start_run.fn(small_config(name), retrained["ingest"])
    return register_model.fn(run_id, retrained["result"].checkpoint, name, Validation(metrics={"val_top1": 0.0}, n=1))


def test_gate_re_evaluates_the_champion(retrained, on_servers):
    """A challenger claiming a better score than the champion re-measured on the same split
    wins; one claiming a worse score does not. Decision and scores are version tags.

    On a model of its own: moving the champion of the session's shared model made other tests
    (the flow's version is champion, scoring @champion) pass only when they ran first."""
    import uuid

    from cvlib.promotion import GateConfig
    from tasks.records import Validation
    from tasks.registry import champion_gate

    name = f"gate-{uuid.uuid4().hex[:8]}"
    client = mlflow_client(os.environ["MLFLOW_TRACKING_URI"])
    first = _register_copy(retrained, name, "first")
    assert champion_gate.fn(first, retrained["ingest"], Validation(metrics={"val_top1": 0.0}, n=1), GateConfig()).promoted
    champion_before = client.get_model_version_by_alias(name, "champion").version
    assert champion_before == first.version

    worse = _register_copy(retrained, name, "worse")
    decision = champion_gate.fn(worse, retrained["ingest"], Validation(metrics={"val_top1": -1.0}, n=1), GateConfig())
    assert decision.promoted is False
    measured = decision.champion_score
    assert measured == pytest.approx(retrained["result"].metrics["val_top1"], abs=1e-6), "champion re-measured on the same split"
    assert decision.champion_version == str(champion_before) and decision.reason.endswith("champion stays")
    tags = client.get_model_version(name, worse.version).tags
    assert tags["visionflow.gate.promoted"] == "false"
    assert tags["visionflow.gate.champion_version"] == str(champion_before)
    assert client.get_model_version_by_alias(name, "champion").version == champion_before
    assert client.get_model_version_by_alias(name, "challenger").version == worse.version

    better = _register_copy(retrained, name, "better")
    margin_blocked = champion_gate.fn(better, retrained["ingest"], Validation(metrics={"val_top1": measured + 0.01}, n=1), GateConfig(margin=0.05))
    assert margin_blocked.promoted is False, "the margin must be beaten, not just the score"
    decision = champion_gate.fn(better, retrained["ingest"], Validation(metrics={"val_top1": measured + 0.1}, n=1), GateConfig(margin=0.05))
    assert decision.promoted is True
    assert client.get_model_version_by_alias(name, "champion").version == better.version
    assert client.get_model_version(name, better.version).tags["visionflow.gate.promoted"] == "true"


CONCURRENT = """
import os, sys
from cvlib.promotion import GateConfig
from tasks.records import IngestResult, Validation
from tasks.registry import champion_gate, register_model, start_run
from tests.integration.support import small_config
name, checkpoint, manifest, data_dir, score = sys.argv[1:6]
ingest = IngestResult(data_dir=data_dir, manifest_path=manifest, dataset_hash="h", class_names=[str(d) for d in range(10)], summary={})
run_id = start_run.fn(small_config(name), ingest)
v = register_model.fn(run_id, checkpoint, name, Validation(metrics={"val_top1": float(score)}, n=1))
champion_gate.fn(v, ingest, Validation(metrics={"val_top1": float(score)}, n=1), GateConfig())
print("VERSION", v.version)
"""


def test_concurrent_registrations_leave_one_champion(retrained, mlflow_server, prefect_server, tmp_path):
    """Two retraining runs registering at the same time both get a version; exactly one of them
    holds the champion alias."""
    import uuid

    name = f"concurrent-{uuid.uuid4().hex[:6]}"
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server, MLFLOW_REGISTRY_URI=mlflow_server, PREFECT_API_URL=prefect_server, PYTHONPATH=str(Path(__file__).parents[2]))
    args = [name, retrained["result"].checkpoint, retrained["ingest"].manifest_path, retrained["ingest"].data_dir]
    procs = [
        subprocess.Popen([sys.executable, "-c", CONCURRENT, *args, score], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for score in ("0.5", "0.6")
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    versions = sorted(int(out.split("VERSION")[1].split()[0]) for out, _ in outs)
    assert versions == [1, 2]
    client = mlflow_client(mlflow_server)
    assert len(client.search_model_versions(f"name = '{name}'")) == 2
    champion = client.get_model_version_by_alias(name, "champion")
    assert int(champion.version) in versions
    promoted = [v for v in client.search_model_versions(f"name = '{name}'") if v.tags.get("visionflow.gate.promoted") == "true"]
    assert str(champion.version) in {v.version for v in promoted}


def _rest(url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST" if data else "GET")
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def test_two_learning_rates_compare_over_rest(digits_dir, on_servers, mlflow_server, tmp_path):
    """What the UI's compare view plots for two runs that differ in learning rate: both runs in
    one experiment, their lr params and per-epoch histories, read through the server's REST API."""
    import uuid

    from cvlib.config import RetrainConfig
    from cvlib.data.options import AugmentConfig
    from cvlib.training.options import TrainConfig
    from flows.retrain import retrain

    experiment = f"compare-{uuid.uuid4().hex[:6]}"
    for lr in (1e-3, 3e-3):
        config = RetrainConfig(
            model_name=experiment, experiment=experiment,
            augment=AugmentConfig(image_size=32, resize_ratio=1.0, hflip=0.0),
            train=TrainConfig(arch="simple_cnn", weights="none", epochs=2, batch_size=16, lr=lr, num_workers=0, progress=False),
        )
        config.report.samples = 4
        retrain(data_dir=str(digits_dir), config=config, output_dir=str(tmp_path / f"lr{lr:g}"))

    exp = _rest(f"{mlflow_server}/api/2.0/mlflow/experiments/get-by-name?experiment_name={experiment}")["experiment"]
    runs = _rest(f"{mlflow_server}/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
    assert len(runs) == 2
    lrs = sorted(float({p["key"]: p["value"] for p in r["data"]["params"]}["train.lr"]) for r in runs)
    assert lrs == [1e-3, 3e-3]
    assert len({r["info"]["run_name"] for r in runs}) == 2, "run names say which run is which"
    for run in runs:
        run_id = run["info"]["run_id"]
        for key in ("train_loss", "val_loss", "val_top1", "lr"):
            history = _rest(f"{mlflow_server}/api/2.0/mlflow/metrics/get-history?run_id={run_id}&metric_key={key}")["metrics"]
            assert [m["step"] for m in history] == [1, 2], key
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        assert "visionflow.dataset_hash" in tags and "prefect.flow_run_id" in tags


def test_experiment_opens_on_the_training_view(retrained, on_servers, mlflow_server):
    """The MLflow 3 UI chooses its view from the experiment's kind tag: the retraining experiment
    is a model-training one, an older experiment without the tag gets it, a kind chosen by hand stays."""
    import uuid

    from tasks.registry import ensure_experiment

    kind = "mlflow.experimentKind"
    exp = _rest(f"{mlflow_server}/api/2.0/mlflow/experiments/get-by-name?experiment_name=visionflow")["experiment"]
    assert {t["key"]: t["value"] for t in exp["tags"]}[kind] == "custom_model_development"
    client = mlflow_client(mlflow_server)
    older = client.create_experiment(f"older-{uuid.uuid4().hex[:6]}")
    assert ensure_experiment(client.get_experiment(older).name) == older
    assert client.get_experiment(older).tags[kind] == "custom_model_development"
    chosen = client.create_experiment(f"chosen-{uuid.uuid4().hex[:6]}", tags={kind: "genai_development"})
    assert ensure_experiment(client.get_experiment(chosen).name) == chosen
    assert client.get_experiment(chosen).tags[kind] == "genai_development"


def test_evaluation_artifacts_logged(retrained, on_servers):

    files = {a.path for a in mlflow_client(os.environ["MLFLOW_TRACKING_URI"]).list_artifacts(retrained["result"].run_id, "evaluation")}
    for name in ("confusion_matrix.png", "per_class_f1.png", "reliability.png", "training_curves.png", "val_metrics.json",
                 "augmentation_preview.png"):
        assert f"evaluation/{name}" in files
    metrics = mlflow_client(os.environ["MLFLOW_TRACKING_URI"]).get_run(retrained["result"].run_id).data.metrics
    for key in ("best_val_top1", "best_val_top5", "best_val_macro_f1", "best_val_balanced_accuracy", "best_val_ece"):
        assert key in metrics


@pytest.mark.store_agnostic
def test_mlflow_models_serve_answers_rest(retrained, mlflow_server, digits_dir, tmp_path):
    """`mlflow models serve` on the registered champion (local env manager: offline) scores an
    image sent as base64 bytes and one sent as a path."""
    import base64

    port = servers.free_port()
    # The serving command execs `uvicorn` by name: the virtual environment must be on PATH,
    # as it is for a user who activated it.
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server, MLFLOW_REGISTRY_URI=mlflow_server, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    cmd = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", f"models:/{retrained['name']}@champion",
           "--env-manager", "local", "-h", servers.LOOPBACK, "-p", str(port)]
    image = sorted((digits_dir / "5").glob("*.png"))[0]
    with servers.running(cmd, env=env, health_url=f"http://{servers.LOOPBACK}:{port}/ping", log=tmp_path / "serve.log", timeout=240):
        body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(image.read_bytes()).decode()]]}}
        req = urllib.request.Request(f"http://{servers.LOOPBACK}:{port}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=60) as resp:
            rows = json.loads(resp.read())["predictions"]
        body = {"dataframe_split": {"columns": ["path"], "data": [[str(image)]]}}
        req = urllib.request.Request(f"http://{servers.LOOPBACK}:{port}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=60) as resp:
            rows += json.loads(resp.read())["predictions"]
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert rows[0]["top5_labels"] == rows[1]["top5_labels"]


@pytest.mark.parametrize(
    ("uri", "parsed"),
    [("models:/m@champion", ("m", "champion", None)), ("models:/m/3", ("m", None, "3")), ("models:/a.b@x/y", ("a.b", "x/y", None))],
)
def test_model_uris_parse_in_one_place(uri, parsed):
    from tasks.registry import parse_model_uri
    from tasks.score import _pinned

    assert parse_model_uri(uri) == parsed
    assert _pinned(uri, "7") == f"models:/{parsed[0]}/7"


@pytest.mark.parametrize("uri", ["models:/m", "models:/@champion", "models://3", "models:/m/", "runs:/abc/model"])
def test_malformed_model_uris_say_which_forms_work(uri):
    from tasks.registry import parse_model_uri, resolve_model

    with pytest.raises(ValueError, match="models:/NAME/VERSION or models:/NAME@ALIAS"):
        parse_model_uri(uri)
    if uri.startswith("models:/"):
        with pytest.raises(ValueError, match="models:/NAME/VERSION or models:/NAME@ALIAS"):
            resolve_model(uri)  # before any server is asked
