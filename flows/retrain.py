"""Retraining: folder -> manifest -> fine-tuned model -> validation -> MLflow registry -> report."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from cvlib.config import RetrainConfig
from flows.naming import run_name
from tasks.environment import mlflow_tracking_uri, runs_dir
from tasks.explain import check_feature_map_layers, validation_report
from tasks.ingest import ingest
from tasks.manifest_log import log_manifest, pin_manifest
from tasks.records import RetrainResult
from tasks.registry import (
    champion_gate,
    end_run,
    log_artifact,
    register_model,
    start_run,
)
from tasks.train import fine_tune, validate


def _default_output_dir(data_dir: str) -> Path:
    """Keyed by the flow run, so a retried run (same id) finds its checkpoints and resumes."""
    run_id = flow_run.id
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return runs_dir() / (f"{Path(data_dir).name}-{run_id[:8]}" if run_id else f"{stamp}-{Path(data_dir).name}")


def _example_image(data) -> str | None:
    """A validation image for the model's input example."""
    from cvlib.data.manifest import read_manifest

    manifest = read_manifest(data.manifest_path)
    val = manifest[(manifest["status"] == "ok") & (manifest["split"] == "val")]
    return str(Path(data.data_dir) / val["path"].iloc[0]) if len(val) else None


def _export(model_uri: str, data, config: RetrainConfig) -> str:
    """The OpenVINO export after the gate. Its failure does not undo a registered version: it is
    logged, tagged on the version (``visionflow.openvino.status=failed``) and scoring keeps PyTorch."""
    from tasks.export import TAG, export_version
    from tasks.registry import client, parse_model_uri

    try:
        return export_version(model_uri, config.export, data_dir=data.data_dir, manifest=data.manifest_path).status
    except Exception as exc:  # noqa: BLE001 - conversion and quantization fail in many ways
        get_run_logger().error("OpenVINO export of %s failed: %s: %s; scoring keeps PyTorch", model_uri, type(exc).__name__, exc)
        name, _, version = parse_model_uri(model_uri)
        client().set_model_version_tag(name, version, f"{TAG}.status", "failed")
        client().set_model_version_tag(name, version, f"{TAG}.reason", f"{type(exc).__name__}: {exc}"[:5000])
        return "failed"


def _pin_manifest(run_id: str, manifest_path: str) -> None:
    """A new champion's run holds its manifest itself (see :mod:`tasks.manifest_log`). Its failure
    does not fail a run whose version is already champion: the manifest is still read through
    the reference, so it is logged and the flow goes on."""
    try:
        pin_manifest(run_id, manifest_path)
    except Exception as exc:  # noqa: BLE001 - the copy is a safeguard, not the record
        get_run_logger().error("could not pin the manifest into champion run %s: %s: %s", run_id, type(exc).__name__, exc)


@flow(name="retrain", flow_run_name=run_name("retrain", "data_dir"), log_prints=True)
def retrain(data_dir: str, config: RetrainConfig = RetrainConfig(), output_dir: str | None = None) -> RetrainResult:
    """Retrain the classifier on an image folder (one sub-folder per class) and register it."""
    logger = get_run_logger()
    check_feature_map_layers(config.train.arch, config.report)  # a misspelt layer fails now, not after training
    out = Path(output_dir) if output_dir else _default_output_dir(data_dir)
    out.mkdir(parents=True, exist_ok=True)

    data = ingest(data_dir, str(out / "manifest.parquet"), config.data)
    run_id = start_run(config, data, flow_run_id=flow_run.id)
    try:
        trained = fine_tune(data, config, str(out / "checkpoints"), run_id)
        validation = validate(
            data, trained.best_checkpoint, run_id, trained.history, str(out / "evaluation"),
            batch_size=config.train.batch_size, num_workers=config.train.num_workers,
        )
        log_manifest(run_id, data.manifest_path)  # uploaded once per content, referenced after
        registered = register_model(run_id, trained.best_checkpoint, config.model_name, validation, example_image=_example_image(data))
        decision = champion_gate(
            registered, data, validation, config.gate, batch_size=config.train.batch_size, num_workers=config.train.num_workers
        )
        if decision.promoted:
            _pin_manifest(run_id, data.manifest_path)
        openvino = _export(registered.model_uri, data, config) if config.export.enabled else None
        # After the gate: the report a reviewer opens names the version and the decision.
        report = validation_report(
            data,
            trained.best_checkpoint,
            str(out / "report.html"),
            config.report,
            summary={"data set hash": data.dataset_hash[:16], "best epoch": trained.best_epoch, "device": trained.device},
            evaluation_dir=validation.figures_dir,
            metrics=validation.metrics,
            run_id=run_id,
            model_name=config.model_name,
            version=registered.version,
            gate_decision=decision.reason,
            batch_size=config.train.batch_size,
            num_workers=config.train.num_workers,
        )
        log_artifact(run_id, report, "report")
    except BaseException:
        end_run(run_id, "FAILED")
        raise
    end_run(run_id)
    result = RetrainResult(
        run_id=run_id,
        flow_run_id=str(flow_run.id),
        model_uri=registered.model_uri,
        version=registered.version,
        metrics=validation.metrics,
        report=report,
        manifest=data.manifest_path,
        checkpoint=trained.best_checkpoint,
        output_dir=str(out),
        mlflow_tracking_uri=mlflow_tracking_uri(),
        gate=decision,
        openvino=openvino,
    )
    logger.info("retrained %s v%s (%s): %s", registered.name, registered.version, "champion" if result.promoted else "challenger", validation.metrics)
    return result
