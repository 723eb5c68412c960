"""The Optuna study behind a sweep: sampler, pruner, storage, resume, ranking and figures.

A study lives in persistent storage (PostgreSQL when configured, else a SQLite file in the
sweep's folder) under a name derived from that folder, so running the same sweep again
continues it: finished trials stay finished, and a trial a killed sweep left RUNNING is marked
failed and enqueued again with the same values and the same checkpoint folder, so it resumes
from its last epoch (see :func:`recover`).
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any

from cvlib.sweep.options import SweepConfig
from cvlib.sweep.space import SearchSpace

STORAGE_ENV = "VISIONFLOW_SWEEP_STORAGE"
# Trial user attributes: where a trial checkpoints, and its MLflow run, kept across a requeue.
CHECKPOINT_KEY = "visionflow.checkpoint_key"
RUN_ID = "visionflow.mlflow_run_id"
REQUEUED = "visionflow.requeued"
HISTORY = "visionflow.history"
BEST_CHECKPOINT = "visionflow.best_checkpoint"
PRUNED_AT = "visionflow.pruned_at"
# Study user attribute: the MLflow parent run of the sweep, reused when the sweep is run again.
PARENT_RUN_ID = "visionflow.parent_run_id"


def study_name(out_dir: str | Path, config: SweepConfig) -> str:
    """The configured name, else the folder's name and a hash of its absolute path: one study per
    sweep folder, stable across reruns."""
    if config.study_name:
        return config.study_name
    path = Path(out_dir).expanduser().resolve()
    return f"{path.name}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"


def storage_url(out_dir: str | Path, config: SweepConfig) -> str:
    """The configured storage, else ``$VISIONFLOW_SWEEP_STORAGE``, else ``OUT/optuna.db`` (SQLite)."""
    url = config.storage or os.environ.get(STORAGE_ENV)
    if url:
        return url
    return f"sqlite:///{Path(out_dir).expanduser().resolve() / 'optuna.db'}"


def shown_storage(url: str) -> str:
    """A storage URL without its password, fit for logs and tags."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy reads: show the part after any credentials
        return url.split("@")[-1]


def _storage(url: str):
    import optuna

    # SQLite: trials running in threads write at once; wait for the lock instead of failing.
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


def make_sampler(config: SweepConfig, space: SearchSpace):
    import optuna

    if config.sampler == "grid":
        return optuna.samplers.GridSampler(space.grid(), seed=config.seed)
    if config.sampler == "random":
        return optuna.samplers.RandomSampler(seed=config.seed)
    # constant_liar: trials running at once do not all get the same suggestion.
    return optuna.samplers.TPESampler(seed=config.seed, constant_liar=config.parallel > 1)


def make_pruner(config: SweepConfig):
    import optuna

    if config.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=config.pruner_startup_trials, n_warmup_steps=config.pruner_warmup_epochs)
    if config.pruner == "successive-halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2)
    return optuna.pruners.NopPruner()


def open_study(url: str, name: str, config: SweepConfig, space: SearchSpace):
    """Create the study, or load it when it exists (a rerun continues it)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(
        storage=_storage(url), study_name=name, sampler=make_sampler(config, space), pruner=make_pruner(config),
        direction=config.direction, load_if_exists=True,
    )


def trial_handle(url: str, name: str, config: SweepConfig, trial_id: int):
    """The live trial ``trial_id`` of the stored study, for reporting per-epoch values and asking
    whether to prune from wherever the trial runs (a thread, a process, a Dask worker)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage=_storage(url), pruner=make_pruner(config))
    return optuna.trial.Trial(study, trial_id)


def checkpoint_key(trial) -> str:
    """A trial's checkpoint folder name: inherited by a requeued trial, so it resumes there."""
    return trial.user_attrs.get(CHECKPOINT_KEY) or f"trial-{trial.number:04d}"


def recover(study) -> list[int]:
    """Trials a killed sweep left RUNNING: mark them failed (tagged requeued) and enqueue their
    values again, with their checkpoint folder and MLflow run, so they resume. Returns their numbers.
    Only one sweep may run a study at a time: a RUNNING trial is taken to be orphaned."""
    from optuna.trial import TrialState

    requeued = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = {CHECKPOINT_KEY: checkpoint_key(t)}
        if t.user_attrs.get(RUN_ID):
            attrs[RUN_ID] = t.user_attrs[RUN_ID]
        study._storage.set_trial_user_attr(t._trial_id, REQUEUED, True)
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        study.enqueue_trial(dict(t.params), user_attrs=attrs)
        requeued.append(t.number)
    return requeued


def enqueue_first(study, space: SearchSpace) -> None:
    """The space's ``enqueue`` trials, once per study (a rerun finds them already there)."""
    for params in space.enqueue:
        study.enqueue_trial(dict(params), skip_if_exists=True)


def finished(study) -> int:
    """Trials that count towards the sweep's total: complete, pruned, or failed for good."""
    from optuna.trial import TrialState

    done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return sum(1 for t in study.get_trials(deepcopy=False, states=done) if not t.user_attrs.get(REQUEUED))


def trial_budget(config: SweepConfig, space: SearchSpace) -> int:
    """Trials to finish: as asked, but no more than a grid has points."""
    if config.sampler != "grid":
        return config.trials
    return min(config.trials, math.prod(len(v) for v in space.grid().values()))


def ranking(study) -> list[dict[str, Any]]:
    """Every trial that did not fail, best first: complete ones by value, then pruned ones by
    their last reported value; one row each, with its values and MLflow run."""
    from optuna.trial import TrialState

    sign = -1.0 if study.direction.name == "MAXIMIZE" else 1.0
    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else math.nan
        value = t.value if t.state == TrialState.COMPLETE else last
        key = (0 if t.state == TrialState.COMPLETE else 1, sign * value if math.isfinite(value) else math.inf)
        rows.append((key, {"trial": t.number, "state": t.state.name.lower(), "value": value, **t.params,
                           "epochs_run": len(t.intermediate_values), "mlflow_run_id": t.user_attrs.get(RUN_ID, "")}))
    rows.sort(key=lambda r: r[0])
    return [{"rank": i + 1, **row} for i, (_, row) in enumerate(rows)]


def write_figures(study, out_dir: str | Path) -> dict[str, Path]:
    """Optuna's parallel-coordinates and parameter-importance figures as PNG files (matplotlib).
    A figure the study cannot draw yet (e.g. importances need two complete trials) is left out."""
    import warnings

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = {"parallel_coordinate": ovm.plot_parallel_coordinate, "param_importances": ovm.plot_param_importances}
    written = {}
    for name, plot in figures.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib figures experimental
                ax = plot(study)
        except (ValueError, RuntimeError, ZeroDivisionError):
            continue
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written[name] = path
    return written
