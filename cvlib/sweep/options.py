"""Options of the sweep stage: how trials are chosen, pruned, run and stored."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cvlib.strict import StrictModel

Sampler = Literal["tpe", "random", "grid"]
Pruner = Literal["median", "successive-halving", "none"]
Objective = Literal["val_top1", "val_loss"]


class SweepConfig(StrictModel):
    """How a sweep searches; the base retraining configuration is a RetrainConfig beside it."""

    trials: int = Field(12, ge=1, description="Trials to finish (complete, pruned or failed), counting those of earlier runs of the same study.")
    parallel: int = Field(1, ge=1, description="Trials running at once.")
    runner: Literal["threads", "processes"] = Field(
        "threads", description="Where parallel trials run on this machine: threads of this process, or a local Dask "
        "cluster of `parallel` worker processes (each trial its own torch seeds and threads)."
    )
    sampler: Sampler = Field("tpe", description="Optuna sampler: TPE, random, or grid (every space entry a list or a stepped range).")
    pruner: Pruner = Field("median", description="Stops a trial whose per-epoch objective is worse than its peers' at the same epoch.")
    objective: Objective = Field("val_top1", description="Per-epoch validation metric the search optimises (top-1 up, loss down).")
    pruner_startup_trials: int = Field(
        2, ge=0, description="Median pruner: finished trials needed before any trial is pruned."
    )
    pruner_warmup_epochs: int = Field(0, ge=0, description="Median pruner: epochs a trial always runs before it may be pruned.")
    seed: int = Field(0, description="Sampler seed.")
    keep_checkpoints: bool = Field(False, description="Keep every trial's checkpoints, not only the best trial's.")
    storage: str | None = Field(
        None, description="Optuna storage URL (e.g. postgresql://...); None: a SQLite file in the sweep's folder "
        "(or VISIONFLOW_SWEEP_STORAGE when set)."
    )
    study_name: str | None = Field(None, description="Optuna study name; None: derived from the sweep's folder, so a rerun continues it.")

    @property
    def direction(self) -> Literal["maximize", "minimize"]:
        return "minimize" if self.objective == "val_loss" else "maximize"
