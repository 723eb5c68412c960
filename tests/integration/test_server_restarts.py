"""Servers that go away mid-run: the MLflow server stopped during training.

A test that kills a server starts its own, on its own free port with a store of its own on the
test's backend (a new SQLite file, or a new PostgreSQL database dropped afterwards:
``fresh_store_url``), so killing it disturbs no other test, and restarts it on the same port with
the same store, as an operator restarting a service would. The outage is short here (``VISIONFLOW_TEST_MLFLOW_OUTAGE_S``,
default 3 s, plus the server's start-up time); set it to 20 to run the issue's 20-second outage.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path

import pytest

from cvlib.data.ingest import build_manifest
from cvlib.data.manifest import class_names, dataset_hash, write_manifest
from cvlib.data.options import DataConfig
from tests import servers
from tests.conftest import BIN, _server_env, mlflow_client, mlflow_command
from tests.integration.support import small_config

pytestmark = pytest.mark.slow

EPOCHS = 6
KILL_AFTER_EPOCH = 2


@pytest.fixture
def ingested(digits_dir: Path, tmp_path: Path):
    """The digits folder's manifest, written without the Prefect task (no API needed)."""
    from tasks.records import IngestResult

    manifest, _ = build_manifest(digits_dir, DataConfig(), near_duplicates=False)
    path = tmp_path / "manifest.parquet"
    write_manifest(manifest, path)
    return IngestResult(data_dir=str(digits_dir), manifest_path=str(path), dataset_hash=dataset_hash(manifest),
                        class_names=class_names(manifest), summary={})


@pytest.fixture
def own_mlflow(tmp_path: Path, fresh_store_url: str, use_mlflow):
    """A real MLflow server on a store of its own that this test may kill and restart on the
    same port."""
    cmd, url = mlflow_command(tmp_path, fresh_store_url, "mlflow-restart", servers.free_port())
    with servers.Restartable(cmd, env=_server_env(), health_url=f"{url}/health", log=tmp_path / "mlflow.log") as server:
        use_mlflow(url)
        yield server, url


def test_mlflow_stopped_during_training_loses_no_metric(ingested, own_mlflow, tmp_path, monkeypatch):
    """The server is killed after epoch 2 and restarted later: training goes on meanwhile, and the
    run's history has every epoch of every metric, in order, once the server is back."""
    from tasks.registry import start_run
    from tasks.tracking import MetricLogger
    from tasks.train import METRICS_SPOOL, fine_tune

    server, url = own_mlflow
    outage = float(os.environ.get("VISIONFLOW_TEST_MLFLOW_OUTAGE_S", "3"))
    config = small_config(f"restart-{uuid.uuid4().hex[:8]}", arch="simple_cnn")
    config.train.epochs = EPOCHS
    run_id = start_run.fn(config, ingested)

    down: dict[str, float] = {}
    logged_at: dict[int, float] = {}
    restarter = threading.Thread(target=lambda: (time.sleep(outage), server.start(), down.update(back=time.monotonic())))
    real_log = MetricLogger.log

    def log(self, metrics, step=None):
        real_log(self, metrics, step)
        logged_at[step] = time.monotonic()
        if step == KILL_AFTER_EPOCH:
            server.kill()
            down["at"] = time.monotonic()
            restarter.start()
        time.sleep(0.5)  # epochs of a few tenths of a second: long enough to fall inside the outage

    monkeypatch.setattr(MetricLogger, "log", log)
    try:
        result = fine_tune.fn(ingested, config, str(tmp_path / "checkpoints"), run_id)
    finally:
        if restarter.is_alive():
            restarter.join()

    assert [h["epoch"] for h in result.history] == list(range(1, EPOCHS + 1))
    during = [e for e, t in logged_at.items() if down["at"] <= t < down["back"]]
    print(f"MLflow away {down['back'] - down['at']:.1f}s; epochs finished meanwhile: {sorted(during)}")
    assert len(during) >= 2, f"training waited for the server: epochs {sorted(logged_at)}, outage {down}"
    c = mlflow_client(url)
    for key in ("train_loss", "val_loss", "val_top1", "lr"):
        history = sorted(c.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
        assert [m.step for m in history] == list(range(1, EPOCHS + 1)), key
    times = [m.timestamp for m in sorted(c.get_metric_history(run_id, "train_loss"), key=lambda m: m.step)]
    assert times == sorted(times)  # stamped when measured, not when delivered
    assert not (tmp_path / "checkpoints" / METRICS_SPOOL).exists()


def test_metrics_unsent_at_the_end_wait_in_the_spool_for_the_next_attempt(mlflow_server, use_mlflow, ingested, tmp_path):
    """The server is still away when training ends (here: its address answers nothing): the
    error says where the metrics are, and the next attempt, which resumes from the checkpoint,
    delivers them first, in order."""
    from tasks.registry import start_run
    from tasks.tracking import MetricLogger, MetricsNotDelivered

    use_mlflow(mlflow_server)
    run_id = start_run.fn(small_config(f"spool-{uuid.uuid4().hex[:8]}", arch="simple_cnn"), ingested)
    spool = tmp_path / "unsent.jsonl"
    use_mlflow(f"http://{servers.LOOPBACK}:{servers.free_port()}")  # nothing listens there
    first = MetricLogger(run_id, spool=spool, flush_timeout=1.0)
    first.log({"train_loss": 0.5}, step=1)
    first.log({"train_loss": 0.25}, step=2)
    with pytest.raises(MetricsNotDelivered, match=str(spool)):
        first.close()
    assert len(spool.read_text().splitlines()) == 2

    use_mlflow(mlflow_server)
    with MetricLogger(run_id, spool=spool) as second:
        second.log({"train_loss": 0.125}, step=3)
    history = sorted(mlflow_client(mlflow_server).get_metric_history(run_id, "train_loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.25), (3, 0.125)]
    assert not spool.exists()

    # A server that answers "no" (here: no such run) is not retried for the whole flush timeout.
    refused = MetricLogger("0" * 32, flush_timeout=300)
    refused.log({"train_loss": 1.0}, step=1)
    started = time.monotonic()
    with pytest.raises(MetricsNotDelivered, match="0{32}"):
        refused.close()
    assert time.monotonic() - started < 60


# --------------------------------------------------------------------------- Prefect server restarted

RETRAIN_WITH_MARKS = """
import sys, time
from pathlib import Path

import tasks.tracking as tracking
from prefect.runtime import flow_run

data_dir, name, marks, epochs, pause = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
real_log = tracking.MetricLogger.log

def log(self, metrics, step=None):  # each finished epoch leaves a mark, then the next one waits a little
    real_log(self, metrics, step)
    (marks / f"epoch-{step}").write_text(str(flow_run.id))
    time.sleep(pause)

tracking.MetricLogger.log = log
from flows.retrain import retrain
from tests.integration.support import small_config

config = small_config(name, arch="simple_cnn")
config.train.epochs = epochs
result = retrain(data_dir=data_dir, config=config, output_dir=str(marks / "run"))
print("VERSION", result.version)
"""


def _wait_for(path: Path, timeout: float, proc, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the flow ended before {path.name}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {path.name} within {timeout}s")
        time.sleep(0.2)


def test_prefect_server_restarted_during_a_retrain(digits_dir, mlflow_server, fresh_store_url, tmp_path):
    """The Prefect server (on a database of its own) is killed after the first epoch and started again on the same
    port. The flow either finishes (the client retries its calls: PREFECT_CLIENT_MAX_RETRIES=5
    with 2, 4, 8... s backoff, ConnectError included once a client has connected), or it ends
    crashed and `prefect flow-run retry` resumes it from the checkpoint, training no finished
    epoch again. Either way the model is registered and the server shows the run completed."""
    import subprocess
    import sys

    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from cvlib.training.checkpoint import load_checkpoint
    from tests.conftest import prefect_command, prefect_database_env

    epochs = 4
    cmd, env, url = prefect_command(tmp_path, "prefect-restart", servers.free_port(), **prefect_database_env(fresh_store_url))
    name = f"prefect-restart-{uuid.uuid4().hex[:8]}"
    marks = tmp_path / "marks"
    marks.mkdir()
    root = Path(__file__).parents[2]
    flow_env = _server_env(PREFECT_API_URL=url, MLFLOW_TRACKING_URI=mlflow_server, MLFLOW_REGISTRY_URI=mlflow_server,
                           PYTHONPATH=str(root))  # fmt: skip
    with servers.Restartable(cmd, env=env, health_url=f"{url}/health", log=tmp_path / "prefect.log") as server:
        flow_log = tmp_path / "flow.log"
        with open(flow_log, "w") as log:
            proc = subprocess.Popen([sys.executable, "-c", RETRAIN_WITH_MARKS, str(digits_dir), name, str(marks), str(epochs), "1.5"],
                                    env=flow_env, cwd=root, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            _wait_for(marks / "epoch-1", 600, proc, flow_log)
            server.kill()
            time.sleep(2)
            server.start()
            proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
        out = flow_log.read_text()
        flow_run_id = (marks / "epoch-1").read_text()
        first = load_checkpoint(marks / "run" / "checkpoints" / "last.pt")["history"]

        with temporary_settings(updates={PREFECT_API_URL: url}), get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run_id).state
        print(f"after the restart: exit {proc.returncode}, flow run {state.type.value}")
        if not state.is_completed():  # crashed or failed: the operator retries it
            assert state.is_final(), f"{state.type.value}: neither finished nor marked crashed\n{out[-3000:]}"
            retry = subprocess.run([str(BIN / "prefect"), "flow-run", "retry", flow_run_id, "--entrypoint", "flows/retrain.py:retrain"],
                                   env=flow_env, cwd=root, capture_output=True, text=True, timeout=600)  # fmt: skip
            assert retry.returncode == 0, retry.stdout[-3000:] + retry.stderr[-3000:]
            with temporary_settings(updates={PREFECT_API_URL: url}), get_client(sync_client=True) as client:
                state = client.read_flow_run(flow_run_id).state
        else:
            assert proc.returncode == 0 and "VERSION 1" in out, out[-3000:]
        assert state.is_completed()

    final = load_checkpoint(marks / "run" / "checkpoints" / "last.pt")
    assert final["epoch"] == epochs
    assert final["history"][: len(first)] == first, "a finished epoch was trained again"
    assert len(mlflow_client(mlflow_server).search_model_versions(f"name = '{name}'")) == 1
