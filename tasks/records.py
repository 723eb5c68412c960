"""Small typed records that travel between tasks (never models or tensors)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from cvlib.promotion import GateDecision


class IngestResult(BaseModel):
    data_dir: str
    manifest_path: str
    dataset_hash: str
    class_names: list[str]
    summary: dict


class TrainResult(BaseModel):
    best_checkpoint: str
    last_checkpoint: str
    best_epoch: int
    device: str
    history: list[dict]
    stopped_early: bool = False
    stop_reason: str | None = None


class Validation(BaseModel):
    metrics: dict[str, float]
    n: int
    figures_dir: str | None = None


class RegisteredVersion(BaseModel):
    name: str
    version: str
    run_id: str
    model_uri: str  # models:/name/version

    @property
    def registry_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


class ScoreResult(BaseModel):
    output: str
    files: int
    scored: int
    errors: int
    seconds: float
    model_uri: str
    model_version: str


class RetrainResult(BaseModel):
    """What a retraining run returns: where its model, report and files are, and the gate's verdict."""

    model_config = ConfigDict(frozen=True)

    run_id: str  # MLflow
    flow_run_id: str  # Prefect
    model_uri: str  # models:/name/version
    version: str
    metrics: dict[str, float]
    report: str
    manifest: str
    checkpoint: str
    output_dir: str
    mlflow_tracking_uri: str
    gate: GateDecision
    openvino: str | None = None  # the OpenVINO export's status (verified, rejected, failed), None when skipped

    @property
    def promoted(self) -> bool:
        """Whether this version now holds the champion alias."""
        return self.gate.promoted
