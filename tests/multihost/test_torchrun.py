"""``torchrun`` across two hosts (network namespaces), c10d rendezvous on host A, gloo, with the
MLflow-tracked launcher ``python -m flows.ddp`` (the pure ``cvlib.training.ddp`` launch plus rank
0's MLflow run) and the same ``--config`` file as ``visionflow retrain``, logging to a real
``mlflow server`` on host A.

Two jobs on the same data, configuration and seed:

- an uninterrupted one;
- one whose node B training process is SIGKILLed in epoch 2, so torchrun (``--max-restarts 1``)
  restarts both nodes, which resume from ``last.pt``.

Checked: after every epoch both ranks hold the same weights (a collective in
:func:`cvlib.training.fit.fit`, each rank logs the agreed digest); rank 0 alone writes checkpoints
and talks to MLflow (the server's access log never shows node B's address); the interrupted job
trains epochs 1..N to completion once each, continues the same MLflow run after the restart (each
epoch once in its metric history) and ends with bit-identical weights to the uninterrupted job.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.multihost.conftest import BIN, host_env, kill_group, tail, wait_http

pytestmark = pytest.mark.slow

EPOCHS = 3
MLFLOW_PORT = 5010  # not the Prefect test's 5000: its server may still be winding down
EXPERIMENT = "multihost-ddp"


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory) -> Path:
    from cvlib.data.demo import write_digits

    out = tmp_path_factory.mktemp("ddp-digits")
    write_digits(out, size=32, per_class=24)
    return out


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    """A retraining configuration file, as ``visionflow retrain --config`` takes it. One DataLoader
    worker per rank: the comparison with the uninterrupted job covers the workers' seeding too."""
    path = tmp_path_factory.mktemp("ddp-config") / "retrain.json"
    path.write_text(json.dumps({
        "model_name": "multihost-ddp", "experiment": EXPERIMENT,
        "augment": {"image_size": 32, "resize_ratio": 1.0, "hflip": 0.0},
        "train": {"arch": "simple_cnn", "weights": "none", "epochs": EPOCHS, "batch_size": 8, "num_workers": 1,
                  "hidden_dim": 32, "warmup_epochs": 0, "progress": False, "seed": 7},
    }))  # fmt: skip
    return path


@pytest.fixture(scope="module")
def mlflow_on_a(hosts, tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """A real ``mlflow server`` (SQLite, proxied artifacts) on host A; yields its URL and access log."""
    a = hosts[0]
    store = tmp_path_factory.mktemp("ddp-mlflow")
    log = store / "mlflow-server.log"
    cmd = [BIN / "mlflow", "server", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
           "--artifacts-destination", store / "artifacts", "--host", a.address, "--port", str(MLFLOW_PORT), "--workers", "1"]  # fmt: skip
    proc = a.popen(cmd, env=host_env(store / "home"), log=log)
    url = f"http://{a.address}:{MLFLOW_PORT}"
    try:
        wait_http(a, f"{url}/health", proc, log)
        yield url, log
    finally:
        kill_group(proc, signal.SIGTERM)


@dataclass
class Job:
    out: Path
    logs: dict[str, Path]
    procs: dict[str, subprocess.Popen]

    def text(self) -> str:
        return "".join(tail(log, 10**7) for log in self.logs.values())

    def wait(self, timeout: float = 420) -> None:
        try:
            for k, p in self.procs.items():
                assert p.wait(timeout) == 0, f"node {k} failed:\n{tail(self.logs[k])}"
        finally:
            self.stop()

    def stop(self) -> None:
        for p in self.procs.values():
            kill_group(p)


def _launch(hosts, root: Path, train_dir: Path, config: Path, mlflow: str, port: int) -> Job:
    """One torchrun agent per host, rendezvous on host A at ``port``, training into ``root/run``."""
    a = hosts[0]
    job = Job(root / "run", {}, {})
    for h in hosts[:2]:
        job.logs[h.label] = root / f"torchrun-{h.label}.log"
        cmd = [BIN / "torchrun", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"{a.address}:{port}", "--rdzv-id", f"visionflow-{port}",
               "--rdzv-conf", f"is_host={int(h is a)}", "--local-addr", h.address, "--max-restarts", "1",
               "--monitor-interval", "1",
               "-m", "flows.ddp", train_dir, "--out", job.out, "--config", config, "--backend", "gloo"]  # fmt: skip
        # A fresh store per rendezvous round: with the agent's shared store, a node restarted for a
        # failure (restart 1) and one restarted for the new membership (restart 0) could meet the
        # old round's keys (a hang on a dead rank's gloo address, seen here once under load).
        env = host_env(
            root / f"{h.label}-home", GLOO_SOCKET_IFNAME=h.ifname, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", LOGLEVEL="INFO",
            MLFLOW_TRACKING_URI=mlflow,
        )  # fmt: skip - INFO: restarts show in the log
        job.procs[h.label] = h.popen(cmd, env=env, log=job.logs[h.label])
    return job


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


_QUERY = """
import json, sys
from mlflow import MlflowClient
c = MlflowClient()
exp = c.get_experiment_by_name(sys.argv[1])
out = {"runs": [r.info.run_id for r in c.search_runs([exp.experiment_id])]}
for run_id in sys.argv[2:]:
    run = c.get_run(run_id)
    out[run_id] = {
        "status": run.info.status,
        "metrics": {k: [m.step for m in c.get_metric_history(run_id, k)] for k in run.data.metrics},
        "params": run.data.params,
        "artifacts": [a.path for a in c.list_artifacts(run_id, "checkpoint")],
    }
print(json.dumps(out))
"""


def _mlflow_runs(host, mlflow: str, root: Path, *run_ids: str) -> dict:
    """What the tracking server holds, read from host A (the root namespace cannot reach it)."""
    proc = host.run([sys.executable, "-c", _QUERY, EXPERIMENT, *run_ids], env=host_env(root / "query-home", MLFLOW_TRACKING_URI=mlflow))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _epoch_lines(log: str) -> list[int]:
    return [int(e) for e in re.findall(r"^epoch (\d+):", log, re.M)]


def _rank0_nodes(job: Job) -> set[str]:
    """The nodes whose trainer was rank 0 in some attempt (its digest lines are in that node's log)."""
    return {k for k, log in job.logs.items() if re.search(r"rank 0: after epoch", tail(log, 10**7))}


@pytest.fixture(scope="module")
def uninterrupted(hosts, train_dir, config, mlflow_on_a, tmp_path_factory) -> Job:
    job = _launch(hosts, tmp_path_factory.mktemp("ddp-uninterrupted"), train_dir, config, mlflow_on_a[0], port=29410)
    job.wait()
    assert _epoch_lines(job.text()) == list(range(1, EPOCHS + 1)), job.text()
    return job


def test_two_nodes_restart_after_a_killed_node_and_end_as_an_uninterrupted_run(
    hosts, train_dir, config, mlflow_on_a, uninterrupted, tmp_path
):
    a = hosts[0]
    mlflow, access_log = mlflow_on_a
    job = _launch(hosts, tmp_path, train_dir, config, mlflow, port=29400)
    try:
        deadline = time.monotonic() + 300
        while not re.search(r"^epoch 1:", job.text(), re.M):
            assert all(p.poll() is None for p in job.procs.values()) and time.monotonic() < deadline, job.text()
            time.sleep(0.05)
        # epoch 1 is checkpointed and its metrics queued (the line follows both); node B's trainer is in epoch 2 now
        trainer = _children(job.procs["b"].pid)
        assert trainer, job.text()
        subprocess.run(["kill", "-KILL", *map(str, trainer)], check=True)
        job.wait()
    finally:
        job.stop()
    log, out = job.text(), job.out
    assert _epoch_lines(log) == list(range(1, EPOCHS + 1)), log  # every epoch trained to completion exactly once
    assert "Worker group FAILED. 1/1 attempts left; will restart worker group" in tail(job.logs["b"], 10**7), log
    log_a = tail(job.logs["a"], 10**7)  # the kill landed in epoch 2: the restarted attempt trained it
    assert log_a.index("continuing MLflow run") < log_a.index("epoch 2:"), log_a
    digests = re.findall(r"rank (\d): after epoch (\d+) the weights of all 2 ranks are (\w+)", log)
    by_epoch: dict[str, set] = {}
    for rank, epoch, digest in digests:
        by_epoch.setdefault(epoch, set()).add((rank, digest))
    for epoch, seen in by_epoch.items():  # both ranks logged the same weights after the epoch
        assert {r for r, _ in seen} == {"0", "1"} and len({d for _, d in seen}) == 1, (epoch, seen)
    assert sorted(out.glob("*.pt")) == [out / "best.pt", out / "last.pt"]  # rank 0's checkpoints, nothing else

    # The same epochs as the uninterrupted job, bit for bit.
    import torch

    from cvlib.training.checkpoint import load_checkpoint

    last, reference = load_checkpoint(out / "last.pt"), load_checkpoint(uninterrupted.out / "last.pt")
    assert last["epoch"] == EPOCHS and [h["epoch"] for h in last["history"]] == list(range(1, EPOCHS + 1))
    assert last["model"].keys() == reference["model"].keys()
    differ = [k for k in last["model"] if not torch.equal(last["model"][k], reference["model"][k])]
    assert not differ, f"weights differ from the uninterrupted run's: {differ}"
    losses = lambda ck: [(h["train_loss"], h["val_loss"], h["val_top1"]) for h in ck["history"]]  # noqa: E731
    assert losses(last) == losses(reference)

    # One MLflow run per job, continued across the restart: each epoch once, the checkpoint logged.
    run_id = (out / "mlflow-run-id").read_text().strip()
    reference_id = (uninterrupted.out / "mlflow-run-id").read_text().strip()
    held = _mlflow_runs(a, mlflow, tmp_path, run_id, reference_id)
    assert sorted(held["runs"]) == sorted({run_id, reference_id}), held["runs"]  # the restart made no second run
    for rid in (run_id, reference_id):
        run = held[rid]
        assert run["status"] == "FINISHED" and run["artifacts"] == ["checkpoint/best.pt"], run
        assert run["params"]["train.epochs"] == str(EPOCHS) and run["params"]["train.seed"] == "7", run["params"]
        assert {"train_loss", "val_loss", "val_top1", "lr"} <= run["metrics"].keys(), run["metrics"]
        for key, steps in run["metrics"].items():  # system/...: rank 0's machine, sampled by time, not by epoch
            assert key.startswith("system/") or steps == list(range(1, EPOCHS + 1)), (rid, key, steps)

    # Rank 0 alone talked to MLflow: it was node A's trainer in every attempt of both jobs, and the
    # server's access log shows requests from node A's address only.
    assert _rank0_nodes(job) == _rank0_nodes(uninterrupted) == {"a"}, log
    clients = set(re.findall(r"(\d+\.\d+\.\d+\.\d+):\d+ - \"", tail(access_log, 10**8)))
    assert clients == {a.address}, f"MLflow requests came from {clients}; node B is {hosts[1].address}"
