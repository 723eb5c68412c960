"""Sweep stage: one Optuna trial as an MLflow child run, the sweep's parent run, and the tidy-up.

A trial reports its per-epoch objective to the stored Optuna study from wherever it runs (a
thread, a process, a Dask worker) and stops when the pruner says so: the child run is then
tagged ``visionflow.pruned=true`` with the reason and ends KILLED. The trial itself tells the
study how it ended, so a sweep killed right after a trial finished does not run it again.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from prefect import task
from pydantic import BaseModel

from cvlib.config import RetrainConfig, flatten
from cvlib.sweep import study as studies
from cvlib.sweep.options import SweepConfig
from cvlib.sweep.space import SearchSpace
from tasks.log import run_logger
from tasks.records import IngestResult
from tasks.registry import client, end_run, ensure_experiment, log_artifact, log_metrics, set_run_tag

PARENT_TAG = "mlflow.parentRunId"
PRUNED_TAG = "visionflow.pruned"


class TrialRef(BaseModel):
    """Where a trial lives: the study's storage and name, and the trial's id and number."""

    storage: str
    study: str
    trial_id: int
    number: int
    params: dict


class TrialOutcome(BaseModel):
    number: int
    state: str  # complete, pruned
    value: float | None
    run_id: str
    checkpoint_dir: str
    started: float  # unix seconds
    ended: float
    reason: str | None = None


class SweepResult(BaseModel):
    """What a sweep returns: the best trial, its registered model and the gate's verdict."""

    parent_run_id: str
    study_name: str
    storage: str
    output_dir: str
    best_trial: int
    best_value: float
    best_params: dict
    best_run_id: str
    model_uri: str
    version: str
    promoted: bool
    trials: dict[str, int]  # state -> count
    mlflow_tracking_uri: str


@task(name="open-study", retries=2, retry_delay_seconds=[2, 10], timeout_seconds=600)
def prepare_study(storage: str, name: str, options: SweepConfig, space: SearchSpace) -> dict:
    """Open or continue the study; re-enqueue trials a killed sweep left running; add the space's
    first trials. Returns how many trials are finished and the parent run of an earlier attempt."""
    study = studies.open_study(storage, name, options, space)
    requeued = studies.recover(study)
    studies.enqueue_first(study, space)
    if requeued:
        run_logger().info("trials %s were left running by a killed sweep: enqueued again, to resume from their checkpoints", requeued)
    return {"finished": studies.finished(study), "parent_run_id": study.user_attrs.get(studies.PARENT_RUN_ID), "requeued": requeued}


@task(name="start-sweep-run", retries=3, retry_delay_seconds=[1, 5, 15], timeout_seconds=300)
def start_parent_run(
    config: RetrainConfig, options: SweepConfig, space: SearchSpace, ingest: IngestResult, storage: str, name: str,
    existing: str | None = None, flow_run_id: str | None = None,
) -> str:
    """The sweep's MLflow run (the parent of every trial's): the base configuration and the
    search as params. An earlier attempt's parent run is reopened, so one sweep is one parent."""
    from mlflow.entities import Param

    c = client()
    if existing:
        c.update_run(existing, status="RUNNING")
        return existing
    exp_id = ensure_experiment(config.experiment)
    tags = {
        "visionflow.dataset_hash": ingest.dataset_hash, "visionflow.data_dir": ingest.data_dir,
        "visionflow.class_names": json.dumps(ingest.class_names), "mlflow.source.name": "visionflow sweep",
        "visionflow.sweep.study": name, "visionflow.sweep.storage": studies.shown_storage(storage),
    }
    if flow_run_id:
        tags["prefect.flow_run_id"] = flow_run_id
    run = c.create_run(exp_id, run_name=f"sweep-{Path(ingest.data_dir).name}-{name[-8:]}", tags=tags)
    params = {**flatten(config), **{f"sweep.{k}": v for k, v in options.model_dump(exclude={"storage"}).items()},
              "sweep.space": json.dumps(space.model_dump(exclude_none=True))}
    batch = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(batch), 100):
        c.log_batch(run.info.run_id, params=batch[i : i + 100])
    studies.open_study(storage, name, options, space).set_user_attr(studies.PARENT_RUN_ID, run.info.run_id)
    return run.info.run_id


# No timeout: in a worker thread Prefect could not enforce one anyway (it only warns about it).
@task(name="sweep-trial")
def run_trial(
    ingest: IngestResult, config: RetrainConfig, trial: TrialRef, parent_run_id: str, checkpoint_dir: str, options: SweepConfig
) -> TrialOutcome:
    """Fine-tune with one trial's values as a child run of the sweep; report every epoch's
    objective to the study and stop when the pruner says so. A requeued trial (its sweep was
    killed) reuses its MLflow run and resumes from ``checkpoint_dir/last.pt``."""
    import optuna
    from optuna.trial import TrialState

    from cvlib.training.records import EpochRecord
    from tasks.train import train_tracked

    logger = run_logger()
    started = time.time()
    handle = studies.trial_handle(trial.storage, trial.study, options, trial.trial_id)
    run_id = _child_run(handle, config, ingest, trial, parent_run_id)

    def on_epoch(record: EpochRecord) -> None:  # after the epoch's metrics are queued for the child run
        value = getattr(record, options.objective)
        handle.report(value, record.epoch)
        logger.info("trial %d epoch %d: %s %.4f", trial.number, record.epoch, options.objective, value)
        if handle.should_prune():
            handle.set_user_attr(studies.PRUNED_AT, record.epoch)
            raise optuna.TrialPruned(f"pruned by the {options.pruner} pruner after epoch {record.epoch}: "
                                     f"{options.objective} {value:.4f} worse than its peers at that epoch")  # fmt: skip

    try:
        result = train_tracked(ingest, config, checkpoint_dir, run_id, on_epoch=on_epoch)
    except optuna.TrialPruned as exc:
        set_run_tag(run_id, PRUNED_TAG, "true")
        set_run_tag(run_id, "visionflow.pruned_reason", str(exc))
        end_run(run_id, "KILLED")
        handle.study.tell(trial.number, state=TrialState.PRUNED, skip_if_finished=True)
        logger.info("trial %d: %s", trial.number, exc)
        return TrialOutcome(number=trial.number, state="pruned", value=None, run_id=run_id, checkpoint_dir=checkpoint_dir,
                            started=started, ended=time.time(), reason=str(exc))  # fmt: skip
    except BaseException as exc:
        set_run_tag(run_id, "visionflow.failed_reason", f"{type(exc).__name__}: {exc}"[:5000])
        end_run(run_id, "FAILED")
        handle.study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
        raise
    history = [asdict(h) for h in result.history]
    values = [h[options.objective] for h in history]
    value = (min if options.direction == "minimize" else max)(values) if values else float("nan")
    handle.set_user_attr(studies.HISTORY, history)
    handle.set_user_attr(studies.BEST_CHECKPOINT, result.best_checkpoint)
    log_metrics(run_id, {"objective": value, "best_epoch": result.best_epoch})
    log_artifact(run_id, result.best_checkpoint, "checkpoint")
    # The run ends before the study hears of it: killed in between, the trial is requeued and
    # resumes from its last checkpoint (nothing left to train) to tell the study. The other way
    # round, a finished trial kept a RUNNING run for ever.
    end_run(run_id)
    handle.study.tell(trial.number, value, skip_if_finished=True)
    logger.info("trial %d finished: %s %.4f (params %s)", trial.number, options.objective, value, trial.params)
    return TrialOutcome(number=trial.number, state="complete", value=value, run_id=run_id, checkpoint_dir=checkpoint_dir,
                        started=started, ended=time.time())  # fmt: skip


def _child_run(handle, config: RetrainConfig, ingest: IngestResult, trial: TrialRef, parent_run_id: str) -> str:
    """The trial's MLflow run under the sweep's: reopened when the trial is a requeued one."""
    from mlflow.entities import Param

    c = client()
    existing = handle.user_attrs.get(studies.RUN_ID)
    if existing:
        c.update_run(existing, status="RUNNING")
        c.set_tag(existing, "visionflow.sweep.trial", str(trial.number))
        return existing
    parent = c.get_run(parent_run_id)
    tags = {
        PARENT_TAG: parent_run_id, "visionflow.sweep.trial": str(trial.number), "visionflow.sweep.study": trial.study,
        "visionflow.dataset_hash": ingest.dataset_hash, "mlflow.source.name": "visionflow sweep",
        "visionflow.sweep.params": json.dumps(trial.params),
    }
    run = c.create_run(parent.info.experiment_id, run_name=f"trial-{trial.number:03d}", tags=tags)
    run_id = run.info.run_id
    handle.set_user_attr(studies.RUN_ID, run_id)
    batch = [Param(k, str(v)[:6000]) for k, v in flatten(config).items()]
    for i in range(0, len(batch), 100):
        c.log_batch(run_id, params=batch[i : i + 100])
    return run_id


@task(name="summarise-sweep", retries=2, retry_delay_seconds=[2, 10], timeout_seconds=1800)
def summarise(storage: str, name: str, options: SweepConfig, space: SearchSpace, parent_run_id: str,
              validation_metrics: dict[str, float], out_dir: str) -> list[dict]:
    """The parent run gets the best trial's values (tags ``best.<name>``) and metrics, and Optuna's
    figures; Prefect gets a table ranking the trials. Returns the ranking."""
    from prefect.artifacts import create_table_artifact

    study = studies.open_study(storage, name, options, space)
    best = study.best_trial
    c = client()
    for key, value in best.params.items():
        c.set_tag(parent_run_id, f"best.{key}", str(value))
    c.set_tag(parent_run_id, "best.trial", str(best.number))
    c.set_tag(parent_run_id, "best.run_id", best.user_attrs.get(studies.RUN_ID, ""))
    log_metrics(parent_run_id, {"best_objective": best.value, **{f"best_{k}": v for k, v in validation_metrics.items()}})
    for path in studies.write_figures(study, Path(out_dir) / "figures").values():
        log_artifact(parent_run_id, path, "figures")
    rows = studies.ranking(study)
    shown = [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()} for row in rows]
    create_table_artifact(key="sweep-trials", table=shown, description=f"Trials of study {name}, best first ({options.objective})")
    (Path(out_dir) / "trials.json").write_text(json.dumps(rows, indent=2, default=str))
    log_artifact(parent_run_id, Path(out_dir) / "trials.json", "trials")
    return rows


@task(name="remove-trial-checkpoints", timeout_seconds=600)
def remove_checkpoints(trials_dir: str, keep: str) -> int:
    """Delete every trial's checkpoint folder but ``keep`` (the best trial's); they stay in the
    trials' MLflow runs. Returns how many folders went."""
    removed = 0
    root = Path(trials_dir)
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if folder.is_dir() and folder.resolve() != Path(keep).resolve():
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed
