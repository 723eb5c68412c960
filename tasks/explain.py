"""Explanation stage: Grad-CAM report for a set of images and a model."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact

from cvlib.config import ReportConfig
from tasks.log import run_logger
from tasks.records import IngestResult
from tasks.registry import resolve_model


def _sample(items: list, n: int, seed: int) -> list:
    import random

    if len(items) <= n:
        return list(items)
    return sorted(random.Random(seed).sample(items, n))


@task(name="explain-folder")
def explain_folder(input_dir: str, model_uri: str, out: str, config: ReportConfig) -> str:
    """Report on a folder: labels are read from class sub-folders when their names are classes."""
    from cvlib.checkpoint import load_package
    from cvlib.predict import list_input_files

    local, version = resolve_model(model_uri)
    model, meta = load_package(local)
    files = _sample(list_input_files(input_dir), config.samples, config.seed)
    classes = set(meta["class_names"])
    labels = [f.split("/")[0] if "/" in f and f.split("/")[0] in classes else None for f in files]
    summary = {"model": f"{model_uri} (version {version})", "architecture": meta["arch"], "input": input_dir, "images explained": len(files)}
    return _write(model, meta, input_dir, files, labels, out, summary, title=f"Grad-CAM report: {Path(input_dir).name}")


@task(name="validation-report")
def validation_report(ingest: IngestResult, checkpoint: str, out: str, config: ReportConfig, summary: dict) -> str:
    """Report on a sample of the validation split, for the retraining run."""
    from cvlib.checkpoint import model_from_checkpoint
    from cvlib.ingest import read_manifest

    manifest = read_manifest(ingest.manifest_path)
    val = manifest[(manifest["status"] == "ok") & (manifest["split"] == "val")]
    picked = _sample(list(zip(val["path"], val["label"], strict=True)), config.samples, config.seed)
    model, meta = model_from_checkpoint(checkpoint)
    return _write(
        model, meta, ingest.data_dir, [p for p, _ in picked], [lbl for _, lbl in picked], out, summary,
        title=f"Validation report: {meta['arch']} on {Path(ingest.data_dir).name}",
    )


def _write(model, meta, root, files, labels, out, summary, *, title) -> str:
    from cvlib.report import explain_files, render_report, write_report

    samples, errors = explain_files(model, meta, root, files, labels=labels)
    html = render_report(samples, title=title, subtitle="visionflow", summary=summary, errors=errors)
    path = write_report(html, out)
    wrong = sum(not s.correct for s in samples)
    create_link_artifact(key="gradcam-report", link=path.resolve().as_uri(), description=f"Grad-CAM report ({len(samples)} images)")
    create_markdown_artifact(
        key="gradcam-report-summary",
        markdown=f"# {title}\n\n{len(samples)} images explained, {wrong} misclassified, {len(errors)} unreadable.\n\nReport: `{path}`",
    )
    run_logger().info("report with %d images (%d misclassified) -> %s", len(samples), wrong, path)
    return str(path)
