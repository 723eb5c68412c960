"""Sweep: folder -> manifest -> N fine-tuning trials, K at a time (Optuna) -> best trial ->
registered model -> champion gate, with one MLflow parent run and a child run per trial.

The ``sweep-trials`` subflow asks the Optuna study for trials and runs each as a ``sweep-trial``
task on its task runner: Prefect's thread pool (``parallel`` threads) on this machine, or an
existing Dask cluster (``dask_address``) across hosts, whose workers must see the data, the
sweep's folder and the study's storage (use PostgreSQL there; SQLite is for one machine).
``options.runner="processes"`` runs the trials in a local Dask cluster of ``parallel`` processes
instead of threads: each trial then has its own torch seeds and threads (in threads, trials
share torch's process-wide random state, so a trial is not reproducible on its own).
Rerunning a sweep on the same folder continues its study (see :mod:`cvlib.sweep.study`).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.futures import as_completed
from prefect.runtime import flow_run

from cvlib.config import RetrainConfig
from cvlib.sweep import study as studies
from cvlib.sweep.options import SweepConfig
from cvlib.sweep.space import DEFAULT_SPACE, SearchSpace, suggest, trial_config
from flows.naming import run_name
from tasks.environment import mlflow_tracking_uri, runs_dir
from tasks.ingest import ingest
from tasks.records import IngestResult
from tasks.registry import champion_gate, end_run, register_model
from tasks.sweep import (
    SweepResult,
    TrialOutcome,
    TrialRef,
    prepare_study,
    remove_checkpoints,
    run_trial,
    start_parent_run,
    summarise,
)
from tasks.train import validate


def default_output_dir(data_dir: str) -> Path:
    """One folder per data folder: running the same sweep again continues its study."""
    return runs_dir() / "sweeps" / (Path(data_dir).name or "data")


def task_runner(parallel: int, dask_address: str | None = None, runner: str = "threads"):
    """Threads of this process; a local Dask cluster of ``parallel`` processes (the same one
    ``score`` starts: loopback only); or an existing Dask cluster."""
    if dask_address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=dask_address)
    if runner == "processes" and parallel > 1:
        from prefect_dask import DaskTaskRunner

        from flows.score import local_cluster

        return DaskTaskRunner(cluster_class=local_cluster, cluster_kwargs={"n_workers": parallel})
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=parallel)


@flow(name="sweep-trials", log_prints=True)
def sweep_trials(
    data: IngestResult, config: RetrainConfig, space: SearchSpace, options: SweepConfig, storage: str, study_name: str,
    parent_run_id: str, output_dir: str,
) -> list[TrialOutcome]:
    """Keep ``options.parallel`` trials running until the study has ``options.trials`` finished
    ones (earlier runs' included): ask Optuna for the next trial as soon as one ends."""
    from optuna.trial import TrialState

    logger = get_run_logger()
    study = studies.open_study(storage, study_name, options, space)
    budget = studies.trial_budget(options, space)
    running: dict = {}
    outcomes: list[TrialOutcome] = []
    while True:
        while len(running) < options.parallel and studies.finished(study) + len(running) < budget:
            trial = study.ask()
            params = suggest(trial, space)
            ref = TrialRef(storage=storage, study=study_name, trial_id=trial._trial_id, number=trial.number, params=params)
            folder = Path(output_dir) / "trials" / studies.checkpoint_key(trial)
            future = run_trial.with_options(task_run_name=f"trial-{trial.number:03d}").submit(
                data, trial_config(config, space.fixed() | params), ref, parent_run_id, str(folder), options
            )
            running[future] = trial.number
        if not running:
            return outcomes
        future = next(as_completed(list(running)))
        number = running.pop(future)
        try:
            outcomes.append(future.result())
        except Exception as exc:  # one failed trial does not end the sweep; it counts as failed
            study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
            logger.warning("trial %d failed: %s", number, f"{type(exc).__name__}: {exc}".splitlines()[0])


def _example_image(data: IngestResult) -> str | None:
    from cvlib.data.manifest import read_manifest

    manifest = read_manifest(data.manifest_path)
    val = manifest[(manifest["status"] == "ok") & (manifest["split"] == "val")]
    return str(Path(data.data_dir) / val["path"].iloc[0]) if len(val) else None


@flow(name="sweep", flow_run_name=run_name("sweep", "data_dir"), log_prints=True)
def sweep(
    data_dir: str,
    config: RetrainConfig = RetrainConfig(),
    space: SearchSpace = DEFAULT_SPACE,
    options: SweepConfig = SweepConfig(),
    output_dir: str | None = None,
    dask_address: str | None = None,
) -> SweepResult:
    """Search ``space`` around the base ``config`` with Optuna; register the best trial's model."""
    from optuna.trial import TrialState

    logger = get_run_logger()
    out = Path(output_dir) if output_dir else default_output_dir(data_dir)
    out.mkdir(parents=True, exist_ok=True)
    storage, name = studies.storage_url(out, options), studies.study_name(out, options)
    data = ingest(data_dir, str(out / "manifest.parquet"), config.data)
    state = prepare_study(storage, name, options, space)
    parent = start_parent_run(config, options, space, data, storage, name, existing=state["parent_run_id"], flow_run_id=flow_run.id)
    logger.info("study %r (%s): %d of %d trials finished", name, studies.shown_storage(storage), state["finished"], options.trials)
    try:
        runner = task_runner(options.parallel, dask_address, options.runner)
        sweep_trials.with_options(task_runner=runner, flow_run_name=f"sweep-trials-{Path(data_dir).name}")(
            data, config, space, options, storage, name, parent, str(out)
        )
        study = studies.open_study(storage, name, options, space)
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not complete:
            raise RuntimeError(f"no trial of study {name!r} completed (all pruned or failed): nothing to register")
        best = study.best_trial
        best_run = best.user_attrs[studies.RUN_ID]
        checkpoint = best.user_attrs[studies.BEST_CHECKPOINT]
        base = trial_config(config, space.fixed() | best.params)
        validation = validate(data, checkpoint, best_run, best.user_attrs.get(studies.HISTORY, []), str(out / "evaluation"),
                              batch_size=base.train.batch_size, num_workers=base.train.num_workers)  # fmt: skip
        registered = register_model(best_run, checkpoint, config.model_name, validation, example_image=_example_image(data))
        decision = champion_gate(registered, data, validation, config.gate, batch_size=base.train.batch_size,
                                 num_workers=base.train.num_workers)  # fmt: skip
        summarise(storage, name, options, space, parent, validation.metrics, str(out))
        if not options.keep_checkpoints:
            removed = remove_checkpoints(str(out / "trials"), str(Path(checkpoint).parent))
            logger.info("removed %d other trials' checkpoint folders (they stay in the trials' MLflow runs)", removed)
    except BaseException:
        end_run(parent, "FAILED")
        raise
    end_run(parent)
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        if not t.user_attrs.get(studies.REQUEUED):
            counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
    result = SweepResult(
        parent_run_id=parent, study_name=name, storage=studies.shown_storage(storage), output_dir=str(out),
        best_trial=best.number, best_value=best.value, best_params=best.params, best_run_id=best_run,
        model_uri=registered.model_uri, version=registered.version, promoted=decision.promoted, trials=counts,
        mlflow_tracking_uri=mlflow_tracking_uri(),
    )
    logger.info("sweep %s: best trial %d (%s %.4f, %s) registered as %s (%s)", name, best.number, options.objective, best.value,
                best.params, registered.model_uri, "champion" if decision.promoted else "challenger")  # fmt: skip
    return result
