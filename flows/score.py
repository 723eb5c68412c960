"""Batch scoring: an image folder and a model -> predictions Parquet."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from cvlib.config import ScoreConfig
from tasks.records import ScoreResult
from tasks.score import score_folder


@flow(name="score", flow_run_name="score-{input_dir}", log_prints=True)
def score(input_dir: str, model_uri: str = "models:/visionflow@champion", out: str = "predictions.parquet", config: ScoreConfig = ScoreConfig()) -> ScoreResult:
    """Top-5 predictions for every image under ``input_dir``, one row per file."""
    return score_folder(str(Path(input_dir)), model_uri, str(out), config)
