"""Failures a scheduled retraining must survive: a transient registry error is retried without a
second version, and a run killed mid-training resumes from its checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from cvlib.training.checkpoint import load_checkpoint
from tests.conftest import mlflow_client
from tests.integration.support import small_config

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_transient_registry_failure_is_retried(digits_dir, on_servers, monkeypatch, tmp_path):
    import mlflow

    from flows.retrain import retrain

    real = mlflow.register_model
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("registry briefly unreachable")
        return real(*args, **kwargs)

    monkeypatch.setattr(mlflow, "register_model", flaky)
    name = f"flaky-{uuid.uuid4().hex[:6]}"
    result = retrain(data_dir=str(digits_dir), config=small_config(name), output_dir=str(tmp_path / "run"))
    assert calls["n"] == 2
    versions = mlflow_client(os.environ["MLFLOW_TRACKING_URI"]).search_model_versions(f"name = '{name}'")
    assert [v.version for v in versions] == [result.version] == ["1"]


DIE_AFTER_FIRST_EPOCH = """
import os, sys
import cvlib.training.fit as train
real_fit = train.fit
def fit(**kwargs):
    on_epoch = kwargs["on_epoch"]
    def die(record):
        on_epoch(record)
        if record.epoch == 1:
            os._exit(17)  # the process is killed: no exception, no cleanup, the run is Crashed
    return real_fit(**{**kwargs, "on_epoch": die})
train.fit = fit
from flows.retrain import retrain
from tests.integration.support import small_config
cfg = small_config(sys.argv[2], arch="resnet18")
cfg.train.epochs = 2
retrain(data_dir=sys.argv[1], config=cfg, output_dir=sys.argv[3])
"""


def test_run_killed_during_training_resumes_from_checkpoint(digits_dir, on_servers, tmp_path):
    from flows.retrain import retrain

    name = f"killed-{uuid.uuid4().hex[:6]}"
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", DIE_AFTER_FIRST_EPOCH, str(digits_dir), name, str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 17, proc.stderr[-3000:]
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["epoch"] == 1
    first_epoch = state["history"][0]

    cfg = small_config(name, arch="resnet18")
    cfg.train.epochs = 2
    result = retrain(data_dir=str(digits_dir), config=cfg, output_dir=str(out))
    final = load_checkpoint(out / "checkpoints" / "last.pt")
    assert final["epoch"] == 2
    assert final["history"][0] == first_epoch, "epoch 1 was not trained again"
    assert result.version == "1"


def test_flow_retry_resumes_from_the_failed_task(digits_dir, on_servers, monkeypatch, tmp_path):
    """Task results are persisted: when the flow run is retried after its last task failed,
    the completed tasks (training above all) are not run again."""
    import cvlib.explain.samples
    import cvlib.training.fit
    from flows.retrain import retrain

    real_fit, real_explain = cvlib.training.fit.fit, cvlib.explain.samples.explain_files
    calls = {"fit": 0, "explain": 0}

    def counting_fit(**kwargs):
        calls["fit"] += 1
        return real_fit(**kwargs)

    def failing_explain(*args, **kwargs):
        calls["explain"] += 1
        if calls["explain"] <= 2:  # the task and its one task-level retry both fail
            raise OSError("report disk full")
        return real_explain(*args, **kwargs)

    monkeypatch.setattr(cvlib.training.fit, "fit", counting_fit)
    monkeypatch.setattr(cvlib.explain.samples, "explain_files", failing_explain)
    name = f"retried-{uuid.uuid4().hex[:6]}"
    flow = retrain.with_options(retries=1, retry_delay_seconds=0)
    result = flow(data_dir=str(digits_dir), config=small_config(name), output_dir=str(tmp_path / "run"))
    assert calls == {"fit": 1, "explain": 3}
    assert result.version == "1" and Path(result.report).is_file()
