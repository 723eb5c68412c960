"""Explanations: an image folder and a model -> a self-contained Grad-CAM HTML report."""

from __future__ import annotations

from prefect import flow

from cvlib.explain.options import ReportConfig
from flows.naming import run_name
from tasks.explain import explain_folder


@flow(name="explain", flow_run_name=run_name("explain", "input_dir"), log_prints=True)
def explain(input_dir: str, model_uri: str = "models:/visionflow@champion", out: str = "report.html", config: ReportConfig = ReportConfig()) -> str:
    """Grad-CAM report on a sample of the images under ``input_dir``."""
    return explain_folder(input_dir, model_uri, out, config)
