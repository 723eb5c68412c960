"""`visionflow sweep` on the session's real MLflow and Prefect servers, with tiny SimpleCNN trials
on digits: child runs under one parent read back through MLflow's REST API, a pruned trial, a
resumed sweep, one registered version, and trials that overlap with ``parallel=2``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from cvlib.config import RetrainConfig
from cvlib.sweep.options import SweepConfig
from cvlib.sweep.space import parse_space
from tests.conftest import mlflow_client

pytestmark = pytest.mark.slow


def base_config(model_name: str, epochs: int = 2) -> RetrainConfig:
    return RetrainConfig.model_validate({
        "model_name": model_name,
        "augment": {"image_size": 32, "resize_ratio": 1.0, "hflip": 0.0},
        "train": {"arch": "simple_cnn", "weights": "none", "epochs": epochs, "batch_size": 16, "num_workers": 0,
                  "progress": False, "warmup_epochs": 0.0, "hidden_dim": 32},
        "report": {"samples": 2},
        "log_system_metrics": False,
    })  # fmt: skip


def rest(server: str, endpoint: str, body: dict) -> dict:
    req = urllib.request.Request(f"{server}/api/2.0/mlflow/{endpoint}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")  # fmt: skip
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def child_runs(server: str, parent_run_id: str) -> list[dict]:
    """The sweep's child runs, through MLflow's REST API as the UI reads them."""
    parent = mlflow_client(server).get_run(parent_run_id)
    found = rest(server, "runs/search", {"experiment_ids": [parent.info.experiment_id],
                                         "filter": f"tags.mlflow.parentRunId = '{parent_run_id}'", "max_results": 100})  # fmt: skip
    return found.get("runs", [])


def tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def params(run: dict) -> dict[str, str]:
    return {p["key"]: p["value"] for p in run["data"].get("params", [])}


def versions(server: str, name: str) -> list:
    return mlflow_client(server).search_model_versions(f"name = '{name}'")


def test_pruned_trial_and_resume_without_rerunning(on_servers, mlflow_server, digits_dir, tmp_path):
    """Two trials, then the same sweep asked for four: the first two are not run again, one
    parent holds four children, and the enqueued lr of 1.0 is pruned (tag and KILLED status)."""
    from flows.sweep import sweep

    name = f"sweep-{uuid.uuid4().hex[:6]}"
    # An lr of 1.0 blows the loss up (to ~1e3 after one epoch, while good ones are near 5): pruned
    # on the validation loss. (On digits, two short epochs leave top-1 near chance for every lr.)
    space = parse_space({"lr": {"low": 1e-3, "high": 3e-2, "log": True},
                         "enqueue": [{"lr": 1e-2}, {"lr": 3e-2}, {"lr": 1.0}]})  # fmt: skip
    options = SweepConfig(trials=2, parallel=1, objective="val_loss", pruner_startup_trials=2)
    out = tmp_path / "sweep"

    first = sweep(data_dir=str(digits_dir), config=base_config(name), space=space, options=options, output_dir=str(out))
    assert first.trials["complete"] == 2 and first.trials.get("waiting") == 1  # lr 1.0 is still enqueued
    assert len(versions(mlflow_server, name)) == 1  # only the best trial's model
    runs = child_runs(mlflow_server, first.parent_run_id)
    assert len(runs) == 2
    before = {tags(r)["visionflow.sweep.trial"]: (r["info"]["run_id"], r["info"]["end_time"]) for r in runs}
    assert {params(r)["train.lr"] for r in runs} == {"0.01", "0.03"}
    assert first.best_run_id in {run_id for run_id, _ in before.values()}

    second = sweep(data_dir=str(digits_dir), config=base_config(name), space=space,
                   options=options.model_copy(update={"trials": 4}), output_dir=str(out))  # fmt: skip
    assert second.parent_run_id == first.parent_run_id  # the same sweep, continued
    runs = child_runs(mlflow_server, second.parent_run_id)
    assert len(runs) == 4
    by_trial = {tags(r)["visionflow.sweep.trial"]: r for r in runs}
    for number, (run_id, end_time) in before.items():  # not run again: same run, same end
        assert by_trial[number]["info"]["run_id"] == run_id and by_trial[number]["info"]["end_time"] == end_time
    bad = by_trial["2"]
    assert params(bad)["train.lr"] == "1.0"
    assert tags(bad).get("visionflow.pruned") == "true" and bad["info"]["status"] == "KILLED", tags(bad)
    assert "pruned by the median pruner after epoch 1" in tags(bad)["visionflow.pruned_reason"]
    assert second.trials.get("pruned", 0) >= 1 and sum(second.trials.values()) == 4  # TPE's trial 3 may be pruned too
    # The parent carries the best trial's values and metrics, and Optuna's figures.
    parent = mlflow_client(mlflow_server).get_run(second.parent_run_id)
    assert parent.data.tags["best.trial"] == str(second.best_trial) and "best.lr" in parent.data.tags
    assert "best_val_top1" in parent.data.metrics
    figures = {a.path for a in mlflow_client(mlflow_server).list_artifacts(second.parent_run_id, "figures")}
    assert figures == {"figures/parallel_coordinate.png", "figures/param_importances.png"}
    # Only the best trial's checkpoints stay on disk.
    assert [p.name for p in (out / "trials").iterdir()] == [f"trial-{second.best_trial:04d}"]


@pytest.mark.parametrize("runner", ["threads", "processes"])
def test_parallel_trials_overlap_and_one_version(on_servers, mlflow_server, digits_dir, tmp_path, runner):
    """With parallel=2 two trials run at once (their child runs overlap in time), in threads or in
    a local Dask cluster's processes; only the best trial's model is registered."""
    from flows.sweep import sweep

    name = f"sweep-par-{uuid.uuid4().hex[:6]}"
    space = parse_space({"lr": [2e-3, 4e-3, 8e-3], "label_smoothing": {"low": 0.0, "high": 0.2}})
    options = SweepConfig(trials=3, parallel=2, runner=runner, sampler="random", pruner="none", keep_checkpoints=True)
    result = sweep(data_dir=str(digits_dir), config=base_config(name, epochs=1), space=space, options=options, output_dir=str(tmp_path / "s"))
    runs = child_runs(mlflow_server, result.parent_run_id)
    assert len(runs) == 3 and all(r["info"]["status"] == "FINISHED" for r in runs)
    spans = sorted((int(r["info"]["start_time"]), int(r["info"]["end_time"])) for r in runs)
    assert any(a_end > b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:])), spans  # two ran at once
    assert [v.version for v in versions(mlflow_server, name)] == ["1"]
    assert versions(mlflow_server, name)[0].run_id == result.best_run_id
    assert len(list((tmp_path / "s" / "trials").iterdir())) == 3  # --keep-checkpoints
    # Each child run carries its per-epoch metrics and checkpoint.
    history = mlflow_client(mlflow_server).get_metric_history(result.best_run_id, "val_top1")
    assert [m.step for m in history] == [1]
    assert [a.path for a in mlflow_client(mlflow_server).list_artifacts(result.best_run_id, "checkpoint")] == ["checkpoint/best.pt"]


CHILD = """
import json, os, pathlib, sys, time
import optuna
from cvlib.config import RetrainConfig
from cvlib.sweep.options import SweepConfig
from cvlib.sweep.space import parse_space
from flows.sweep import sweep
a = json.loads(sys.argv[1])
mark = pathlib.Path(a["mark"])

# Hold the second trial where the test kills the process: after its first epoch is reported, or
# right after the study has heard that it finished.
report, tell = optuna.trial.Trial.report, optuna.study.Study.tell
def held_report(self, value, step):
    report(self, value, step)
    if a["kill_at"] == "epoch-1" and self.number == 1 and step == 1:
        mark.write_text("held"); time.sleep(600)
def held_tell(self, trial, *args, **kwargs):
    out = tell(self, trial, *args, **kwargs)
    if a["kill_at"] == "told" and (trial if isinstance(trial, int) else trial.number) == 1:
        mark.write_text("held"); time.sleep(600)
    return out
optuna.trial.Trial.report, optuna.study.Study.tell = held_report, held_tell

sweep(data_dir=a["data"], config=RetrainConfig.model_validate(a["config"]), space=parse_space(a["space"]),
      options=SweepConfig.model_validate(a["options"]), output_dir=a["out"])
"""


@pytest.mark.parametrize("kill_at", ["epoch-1", "told"])
def test_sigkilled_sweep_resumes_the_killed_trial(kill_at, on_servers, mlflow_server, prefect_server, digits_dir, tmp_path):
    """SIGKILL a sweep process while its second trial is between epochs (``epoch-1``): the rerun
    leaves the first trial alone and resumes the second from its checkpoint, in the same MLflow
    run, without training its first epoch again. Killed just after the study heard that the
    second trial finished (``told``): the rerun trains nothing, and no run is left RUNNING (the
    trial's run ends before the study is told)."""
    from cvlib.sweep import study as studies
    from flows.sweep import sweep

    name = f"sweep-kill-{uuid.uuid4().hex[:6]}"
    space = {"lr": {"low": 1e-3, "high": 3e-2, "log": True}, "enqueue": [{"lr": 1e-2}, {"lr": 3e-2}]}
    options = SweepConfig(trials=2, pruner="none")
    out, mark = tmp_path / "sweep", tmp_path / "held"
    args = {"data": str(digits_dir), "config": base_config(name, epochs=3).model_dump(mode="json"), "space": space,
            "options": options.model_dump(), "out": str(out), "mark": str(mark), "kill_at": kill_at}  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(args)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 600
    try:
        while not mark.exists():
            assert proc.poll() is None, "the sweep ended before it could be killed"
            assert time.monotonic() < deadline, f"the second trial did not reach {kill_at} in time"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    import optuna

    killed = optuna.load_study(study_name=studies.study_name(out, options), storage=studies.storage_url(out, options)).trials[1]
    killed_run = killed.user_attrs[studies.RUN_ID]
    assert max(killed.intermediate_values) == (1 if kill_at == "epoch-1" else 3)

    result = sweep(data_dir=str(digits_dir), config=base_config(name, epochs=3), space=parse_space(space), options=options,
                   output_dir=str(out))  # fmt: skip
    assert result.trials == {"complete": 2}  # trial 0, and trial 1 (finished as trial 2 when it was requeued)
    runs = child_runs(mlflow_server, result.parent_run_id)
    statuses = {r["info"]["run_name"]: r["info"]["status"] for r in runs}
    assert statuses == {"trial-000": "FINISHED", "trial-001": "FINISHED"}
    history = mlflow_client(mlflow_server).get_metric_history(killed_run, "train_loss")
    assert sorted(m.step for m in history) == [1, 2, 3]  # each epoch once
