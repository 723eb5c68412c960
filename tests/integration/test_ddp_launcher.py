"""``python -m flows.ddp``, the MLflow-tracked torchrun launcher, in one process against the
session's real MLflow server: the flags of ``visionflow retrain``, one run per launch continued
by a relaunch into the same ``--out`` (as torchrun's restart does), each epoch once in its
history even when an attempt died between an epoch's checkpoint and its metrics; and the other
ranks' side of the rule that rank 0 alone talks to MLflow (the launcher imports no MLflow or
Prefect outside rank 0's tracker). The two-node version with a SIGKILLed node is
``tests/multihost/test_torchrun.py``; rank 0 alone building the tracker under a real process group
is ``tests/unit/test_ddp.py``."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import mlflow_client

pytestmark = pytest.mark.slow

EPOCHS = 3


def _options(parser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def test_the_launcher_takes_every_flag_of_visionflow_retrain():
    from cvlib.training.ddp import make_parser as launch_parser
    from flows.ddp import PROG
    from flows.parser import make_parser

    sub = next(a for a in make_parser()._actions if a.dest == "command")
    retrain = _options(sub.choices["retrain"]) - {"--output-dir"}  # the launcher's is --out: torchrun needs it on every node
    assert "--config" in retrain and "--epochs" in retrain
    assert retrain <= _options(launch_parser(PROG))


def test_importing_the_launcher_loads_neither_mlflow_nor_prefect():
    """Ranks other than 0 run this module without building a tracker: nothing there can reach MLflow."""
    code = "import sys, flows.ddp; print(sorted(m for m in ('mlflow', 'prefect') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr


@pytest.fixture
def digits(tmp_path) -> Path:
    from cvlib.data.demo import write_digits

    write_digits(tmp_path / "digits", size=16, per_class=10)
    return tmp_path / "digits"


def test_a_relaunch_continues_the_run_and_each_epoch_is_logged_once(mlflow_server, use_mlflow, digits, tmp_path, monkeypatch, capsys):
    import flows.ddp as launcher

    use_mlflow(mlflow_server)
    experiment = f"ddp-{uuid.uuid4().hex[:8]}"
    config = tmp_path / "retrain.json"
    config.write_text(json.dumps({
        "experiment": experiment,  # log_system_metrics on (the default): the monitor runs on rank 0 too
        "augment": {"image_size": 16, "resize_ratio": 1.0, "hflip": 0.0},
        "train": {"arch": "simple_cnn", "weights": "none", "batch_size": 16, "num_workers": 0, "hidden_dim": 16,
                  "warmup_epochs": 0, "progress": False},
    }))  # fmt: skip
    out = tmp_path / "run"
    argv = [str(digits), "--out", str(out), "--config", str(config), "--epochs", str(EPOCHS), "--lr", "0.002"]

    # Attempt 1 dies right after epoch 2's last.pt is written, before its metrics are queued: the
    # window a SIGKILL can hit. Epoch 2 is never trained again, so its metrics must come from the
    # checkpoint's history.
    real_epoch = launcher.MlflowTracker.epoch

    def dying_epoch(self, record):
        if record.epoch == 2:
            raise RuntimeError("killed between the checkpoint and the metrics")
        real_epoch(self, record)

    monkeypatch.setattr(launcher.MlflowTracker, "epoch", dying_epoch)
    with pytest.raises(RuntimeError, match="killed between"):
        launcher.main(argv)
    run_id = (out / launcher.RUN_ID_FILE).read_text().strip()
    c = mlflow_client(mlflow_server)
    assert c.get_run(run_id).info.status == "FAILED"
    assert [m.step for m in c.get_metric_history(run_id, "val_top1")] == [1]

    monkeypatch.setattr(launcher.MlflowTracker, "epoch", real_epoch)
    assert launcher.main(argv) == 0  # the relaunch: resumes from last.pt (epoch 2) and trains epoch 3
    assert [json.loads(line)["best_epoch"] for line in capsys.readouterr().out.splitlines() if line.startswith("{")]

    assert (out / launcher.RUN_ID_FILE).read_text().strip() == run_id
    exp = c.get_experiment_by_name(experiment)
    assert [r.info.run_id for r in c.search_runs([exp.experiment_id])] == [run_id]  # no second run
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.source.name"] == "visionflow ddp" and run.data.tags["visionflow.world_size"] == "1"
    # params: the flattened configuration, as visionflow retrain logs it
    assert run.data.params["train.epochs"] == str(EPOCHS) and run.data.params["train.lr"] == "0.002"
    assert run.data.params["experiment"] == experiment
    for key in ("train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr", "seconds"):
        assert [m.step for m in c.get_metric_history(run_id, key)] == list(range(1, EPOCHS + 1)), key
    assert [a.path for a in c.list_artifacts(run_id, "checkpoint")] == ["checkpoint/best.pt"]
