"""The whole retraining configuration: each stage's options record, composed.

The same object is the Prefect flow parameter (the UI renders a form from it), the CLI's options
and the MLflow params (through :func:`flatten`), so a value is defined once and reads the same
everywhere. Each stage's record lives with its stage (``cvlib.<stage>.options``).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, field_validator

from cvlib.data.options import AugmentConfig, DataConfig
from cvlib.explain.options import ReportConfig
from cvlib.inference.options import ExportConfig
from cvlib.promotion import GateConfig
from cvlib.strict import StrictModel
from cvlib.training.options import TrainConfig

__all__ = ["MODEL_NAME_PATTERN", "RetrainConfig", "flatten", "merge_into"]

MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$"


class RetrainConfig(StrictModel):
    """Everything one retraining run needs beyond the data folder."""

    # The name is quoted into MLflow search filters and names the gate's Prefect concurrency
    # limit: a quote or a space there would break both, so only a plain name is allowed.
    model_name: str = Field("visionflow", pattern=MODEL_NAME_PATTERN,
                            description="Registered model name in MLflow: letters, digits, '.', '_' and '-'.")
    experiment: str = Field("visionflow", description="MLflow experiment name.")
    data: DataConfig = Field(default_factory=DataConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    log_system_metrics: bool = Field(True, description="Record CPU/GPU/memory use in the MLflow run while training.")

    @field_validator("data")
    @classmethod
    def _has_validation_split(cls, data: DataConfig) -> DataConfig:
        # The champion gate compares validation metrics: a run without them could not be judged,
        # and would find out only after training.
        if data.val_fraction <= 0:
            raise ValueError("val_fraction must be above 0 for retraining: the champion gate compares validation metrics")
        return data


def flatten(config: BaseModel, prefix: str = "") -> dict[str, Any]:
    """Flatten nested config into dotted keys, the shape MLflow params want."""
    out: dict[str, Any] = {}
    for key, value in config.model_dump().items():
        _flatten_into(out, f"{prefix}{key}", value)
    return out


def _flatten_into(out: dict[str, Any], key: str, value: Any) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten_into(out, f"{key}.{k}", v)
    else:
        out[key] = value


def merge_into(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge a partial configuration (e.g. a ``--config`` JSON file) into a full one."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge_into(base[key], value)
        else:
            base[key] = value
    return base
