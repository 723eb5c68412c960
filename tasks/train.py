"""Fine-tuning and validation stages."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import pandas as pd
from prefect import task
from prefect.artifacts import create_table_artifact

from cvlib.config import RetrainConfig
from cvlib.data.manifest import read_manifest
from cvlib.training.records import EpochRecord, FitResult
from tasks.log import run_logger
from tasks.records import IngestResult, TrainResult, Validation
from tasks.registry import log_artifact, log_artifacts, log_metrics, set_run_tag, system_metrics
from tasks.tracking import MetricLogger

# Unsent per-epoch metrics wait here, beside the checkpoints, for the attempt that resumes them.
METRICS_SPOOL = "unsent-metrics.jsonl"


def epoch_metrics(record) -> dict[str, float]:
    """An epoch's record as the run's metrics at step = epoch (the epoch itself is the step)."""
    return {k: v for k, v in asdict(record).items() if k != "epoch"}


def train_tracked(
    ingest: IngestResult, config: RetrainConfig, checkpoint_dir: str, run_id: str,
    on_epoch: Callable[[EpochRecord], None] | None = None,
) -> FitResult:
    """:func:`cvlib.training.fit.fit` as every tracked training runs it (retrain's fine-tune, a
    sweep's trial): resumed from ``checkpoint_dir/last.pt``, each epoch's metrics queued for the
    MLflow run at step = epoch (buffered and retried, see :class:`tasks.tracking.MetricLogger`),
    the machine's use sampled into the run, the whole configuration in the package.

    ``on_epoch`` runs after an epoch's metrics are queued; an exception it raises (a pruned
    trial) ends training, and what was measured is still delivered."""
    from cvlib.training.fit import fit

    manifest = read_manifest(ingest.manifest_path)
    # Buffered and retried in the background: an MLflow server that is away never stops training,
    # and leaving the block waits for every metric to be delivered before the run goes on.
    metrics = MetricLogger(run_id, spool=Path(checkpoint_dir) / METRICS_SPOOL)

    def each_epoch(record: EpochRecord) -> None:
        metrics.log(epoch_metrics(record), step=record.epoch)
        if on_epoch is not None:
            on_epoch(record)

    with metrics, system_metrics(run_id, config.log_system_metrics):
        return fit(
            data_root=ingest.data_dir,
            manifest=manifest,
            class_names=ingest.class_names,
            train=config.train,
            augment=config.augment,
            out_dir=checkpoint_dir,
            resume=True,
            # The package records the whole run's configuration, not only what training reads.
            extra_meta={"dataset_hash": ingest.dataset_hash, "config": config.model_dump(mode="json")},
            on_epoch=each_epoch,
        )


# Tagged "gpu": `prefect concurrency-limit create gpu 1` keeps one training per machine or pool.
@task(name="fine-tune", tags=["gpu"], timeout_seconds=48 * 3600, persist_result=True)
def fine_tune(ingest: IngestResult, config: RetrainConfig, checkpoint_dir: str, run_id: str) -> TrainResult:
    """Train with per-epoch metrics in MLflow. Resumes from ``checkpoint_dir/last.pt`` when a
    previous attempt died, since Prefect does not retry crashed runs by itself."""
    logger = run_logger()
    _log_augmentation_preview(ingest.data_dir, read_manifest(ingest.manifest_path), config, checkpoint_dir, run_id)

    def on_epoch(record: EpochRecord) -> None:
        logger.info(
            "epoch %d: train_loss %.4f val_loss %.4f val_top1 %.4f (%.1fs)",
            record.epoch, record.train_loss, record.val_loss, record.val_top1, record.seconds,
        )

    result = train_tracked(ingest, config, checkpoint_dir, run_id, on_epoch=on_epoch)
    if result.stopped_early:
        logger.info("early stopping: %s", result.stop_reason)
        set_run_tag(run_id, "visionflow.stopped_early", result.stop_reason or "true")
    return TrainResult(
        best_checkpoint=result.best_checkpoint,
        last_checkpoint=result.last_checkpoint,
        best_epoch=result.best_epoch,
        device=result.device,
        history=[asdict(h) for h in result.history],
        stopped_early=result.stopped_early,
        stop_reason=result.stop_reason,
    )


def _log_augmentation_preview(data_dir: str, manifest: pd.DataFrame, config: RetrainConfig, out_dir: str, run_id: str) -> None:
    from cvlib.data.preview import write_training_preview

    path = write_training_preview(data_dir, manifest, config.augment, Path(out_dir) / "augmentation_preview.png", seed=config.train.seed)
    if path is not None:
        log_artifact(run_id, path, "evaluation")


@task(name="validate", retries=1, retry_delay_seconds=10, timeout_seconds=6 * 3600, persist_result=True)
def validate(ingest: IngestResult, checkpoint: str, run_id: str, history: list[dict], out_dir: str, batch_size: int = 64, num_workers: int = 2) -> Validation:
    """Evaluate the best checkpoint on the validation split (and the test split when there is
    one): the numbers the gate compares, with the figures a reviewer looks at."""
    from cvlib.training.checkpoint import model_from_checkpoint
    from cvlib.training.validation import validate_model

    model, meta = model_from_checkpoint(checkpoint)
    report = validate_model(model, meta, ingest.data_dir, read_manifest(ingest.manifest_path), history, out_dir,
                            batch_size=batch_size, num_workers=num_workers)
    metrics = report.metrics
    log_metrics(run_id, {f"best_{k}": v for k, v in metrics.items()})
    create_table_artifact(
        key="validation-metrics",
        table=[{"metric": k, "value": round(v, 4)} for k, v in sorted(metrics.items())],
        description=f"Validation of {Path(checkpoint).name} (MLflow run {run_id})",
    )
    log_artifacts(run_id, Path(out_dir), "evaluation")
    run_logger().info("validation of %s: %s", Path(checkpoint).name, {k: round(v, 4) for k, v in metrics.items()})
    return Validation(metrics=metrics, n=report.n, figures_dir=str(Path(out_dir)))
