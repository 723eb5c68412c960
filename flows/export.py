"""OpenVINO export of a registered version: ``visionflow export models:/NAME/VERSION``, and the
step the retrain flow runs after its champion gate (see :mod:`tasks.export`)."""

from __future__ import annotations

from prefect import flow

from cvlib.inference.options import ExportConfig
from tasks.export import ExportResult, export_version


@flow(name="export", log_prints=True)
def export(model_uri: str, config: ExportConfig = ExportConfig(), data_dir: str | None = None) -> ExportResult:
    """Convert the version to OpenVINO IR, quantize it to int8 (NNCF, calibrated on its training
    images) and keep what agrees with fp32 on the validation split; files and figures go to MLflow."""
    return export_version(model_uri, config, data_dir=data_dir)
