"""Fine-tuning and validation stages."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from prefect import task

from cvlib.config import RetrainConfig
from cvlib.ingest import read_manifest
from tasks.log import run_logger
from tasks.records import IngestResult, TrainResult, Validation
from tasks.registry import log_metrics


@task(name="fine-tune")
def fine_tune(ingest: IngestResult, config: RetrainConfig, checkpoint_dir: str, run_id: str) -> TrainResult:
    """Train with per-epoch metrics in MLflow. Resumes from ``checkpoint_dir/last.pt`` when a
    previous attempt died, since Prefect does not retry crashed runs by itself."""
    from cvlib.train import EpochRecord, fit

    logger = run_logger()

    def on_epoch(record: EpochRecord) -> None:
        metrics = {k: v for k, v in asdict(record).items() if k != "epoch"}
        log_metrics(run_id, metrics, step=record.epoch)
        logger.info(
            "epoch %d: train_loss %.4f val_loss %.4f val_top1 %.4f (%.1fs)",
            record.epoch, record.train_loss, record.val_loss, record.val_top1, record.seconds,
        )

    result = fit(
        data_root=ingest.data_dir,
        manifest=read_manifest(ingest.manifest_path),
        class_names=ingest.class_names,
        config=config,
        out_dir=checkpoint_dir,
        resume=True,
        extra_meta={"dataset_hash": ingest.dataset_hash},
        on_epoch=on_epoch,
    )
    return TrainResult(
        best_checkpoint=result.best_checkpoint,
        last_checkpoint=result.last_checkpoint,
        best_epoch=result.best_epoch,
        device=result.device,
        history=[asdict(h) for h in result.history],
    )


@task(name="validate")
def validate(ingest: IngestResult, checkpoint: str, run_id: str, batch_size: int = 64, num_workers: int = 2) -> Validation:
    """Evaluate the best checkpoint on the validation split: the numbers the gate compares."""
    from cvlib.checkpoint import model_from_checkpoint
    from cvlib.data import ManifestDataset, make_loader
    from cvlib.evaluate import evaluate
    from cvlib.models import pick_device
    from cvlib.transforms import eval_preset_from

    model, meta = model_from_checkpoint(checkpoint)
    device = pick_device("auto")
    pre = meta["preprocessing"]
    ds = ManifestDataset(ingest.data_dir, read_manifest(ingest.manifest_path), "val", eval_preset_from(pre), draft_size=2 * pre["resize_size"])
    ev = evaluate(model.to(device), make_loader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers), device)
    metrics = {f"best_{k}": v for k, v in ev.metrics("val_").items()}
    log_metrics(run_id, metrics)
    run_logger().info("validation of %s: %s", Path(checkpoint).name, metrics)
    return Validation(metrics={k.removeprefix("best_"): v for k, v in metrics.items()}, n=ev.n)
