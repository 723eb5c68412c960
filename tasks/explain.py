"""Explanation stage: Grad-CAM report for a set of images and a model.

Both tasks screen their candidates in one cheap pass (no CAM), choose the images worth a CAM
(misclassified first, stratified across classes: :func:`cvlib.explain.screening.choose_samples`), explain
only those, and write one self-contained HTML file; with ``config.feature_maps``, the first few
explained images also get a "Feature maps" section (layer names checked as soon as the model is
loaded, before the screening pass). A Prefect link artifact points at the report
(the MLflow UI's view of it when the run lives on a tracking server) and a markdown artifact
carries its headline numbers, so the Prefect UI answers "is this model any good?" without a click.
"""

from __future__ import annotations

import random
from pathlib import Path

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact

from cvlib.explain.options import ReportConfig
from tasks.log import run_logger
from tasks.records import IngestResult
from tasks.registry import resolve_model

#: The retrain flow logs the report under this artifact path of its MLflow run.
REPORT_ARTIFACT_DIR = "report"

#: At most this many files of a folder are screened (a seeded random subset beyond it): the
#: screening pass is a full forward per image, and a folder to explain can be a whole archive.
SCREEN_LIMIT = 5000


@task(name="explain-folder", timeout_seconds=6 * 3600)
def explain_folder(input_dir: str, model_uri: str, out: str, config: ReportConfig, num_workers: int = 0) -> str:
    """Report on a folder. Labels are read from class sub-folders when their names are classes;
    labelled images are screened first so the report shows the misclassified ones and the
    confusions over every screened image."""
    from cvlib.explain.screening import sampling_note
    from cvlib.explain.summary import confusions_from_matrix
    from cvlib.inference.inputs import list_input_files
    from cvlib.training.checkpoint import load_package
    from cvlib.training.metrics import classification_metrics

    local, version = resolve_model(model_uri)
    model, meta = load_package(local)
    layers = _feature_map_layers(model, config)
    found = list_input_files(input_dir)
    candidates = found if len(found) <= SCREEN_LIMIT else sorted(random.Random(config.seed).sample(found, SCREEN_LIMIT))
    classes = set(meta["class_names"])
    labels = [f.split("/")[0] if "/" in f and f.split("/")[0] in classes else None for f in candidates]
    screening, picked = _screen_and_choose(model, meta, input_dir, candidates, labels, config, num_workers=num_workers)

    metrics: dict[str, float] = {}
    confusions = scope = None
    per_class = None
    labelled = screening.labelled
    if labelled.any():
        rep = classification_metrics(screening.true_idx[labelled], screening.probs[labelled], meta["class_names"], prefix="")
        metrics = rep["metrics"] | {"loss": float(screening.losses[labelled].mean())}
        per_class = {k: v for k, v in rep["per_class"].items() if v["support"]}
        confusions = confusions_from_matrix(rep["confusion_matrix"], meta["class_names"])
        scope = f"over all {int(labelled.sum())} labelled images screened"
    summary = {
        "model": model_uri,
        "version": version,
        "architecture": meta["arch"],
        "classes": len(meta["class_names"]),
        "trained on (data set hash)": str(meta.get("dataset_hash", "–"))[:16],
        "input": input_dir,
        "images found": len(found),
        "images screened": f"{len(screening.files)} ({int(labelled.sum())} labelled by class folder)",
    }
    return _write(
        model, meta, input_dir, screening, picked, out, config,
        title=f"Grad-CAM report: {Path(input_dir).name}",
        subtitle=f"{meta['arch']} · {model_uri} (version {version})",
        summary=summary, metrics=metrics, confusions=confusions, confusions_scope=scope, per_class=per_class,
        sampling=sampling_note(screening, picked, "images"),
        artifact_key="gradcam-report", feature_map_layers=layers,
    )


@task(name="validation-report", retries=1, retry_delay_seconds=10, timeout_seconds=6 * 3600, persist_result=True)
def validation_report(
    ingest: IngestResult,
    checkpoint: str,
    out: str,
    config: ReportConfig,
    summary: dict,
    *,
    evaluation_dir: str | None = None,
    metrics: dict[str, float] | None = None,
    run_id: str | None = None,
    model_name: str | None = None,
    version: str | None = None,
    gate_decision: str | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
) -> str:
    """Report on the validation split, for the retraining run: the whole split is screened, the
    chosen images get CAMs, and the validation stage's figures and confusion matrix (over the
    whole split, from ``evaluation_dir/val_metrics.json``) are embedded."""
    from cvlib.data.manifest import read_manifest
    from cvlib.explain.screening import sampling_note
    from cvlib.explain.summary import confusions_from_matrix, load_evaluation
    from cvlib.training.checkpoint import model_from_checkpoint

    manifest = read_manifest(ingest.manifest_path)
    val = manifest[(manifest["status"] == "ok") & (manifest["split"] == "val")]
    model, meta = model_from_checkpoint(checkpoint)
    layers = _feature_map_layers(model, config)
    screening, picked = _screen_and_choose(
        model, meta, ingest.data_dir, list(val["path"]), list(val["label"]), config, batch_size=batch_size, num_workers=num_workers
    )
    figures, val_metrics = load_evaluation(evaluation_dir, Path(checkpoint).parent)
    if val_metrics and val_metrics.get("class_names") == list(meta["class_names"]):
        confusions = confusions_from_matrix(val_metrics["confusion_matrix"], val_metrics["class_names"])
        per_class = val_metrics.get("per_class")
        total = sum(map(sum, val_metrics["confusion_matrix"]))
    else:  # no validation stage output: the screening pass covered the whole split as well
        from cvlib.training.metrics import classification_metrics

        labelled = screening.labelled
        rep = classification_metrics(screening.true_idx[labelled], screening.probs[labelled], meta["class_names"]) if labelled.any() else None
        confusions = confusions_from_matrix(rep["confusion_matrix"], meta["class_names"]) if rep else []
        per_class = rep["per_class"] if rep else None
        total = int(labelled.sum())
        metrics = metrics or (rep["metrics"] if rep else {})
    head = {
        "model": f"{model_name} · {meta['arch']}" if model_name else meta["arch"],
        "version": (f"{version} (MLflow run {run_id})" if version else f"not registered (MLflow run {run_id})") if run_id else "not registered",
        **({"champion gate": gate_decision} if gate_decision else {}),
        "checkpoint": checkpoint,
        "data set": ingest.data_dir,
        "validation images": f"{len(val)} ({len(screening.errors)} unreadable)" if screening.errors else len(val),
    }
    return _write(
        model, meta, ingest.data_dir, screening, picked, out, config,
        title=f"Validation report: {model_name or meta['arch']} on {Path(ingest.data_dir).name}",
        subtitle=f"{meta['arch']} · {len(meta['class_names'])} classes" + (f" · MLflow run {run_id}" if run_id else ""),
        summary=head | dict(summary), metrics=metrics or {}, figures=figures,
        confusions=confusions, confusions_scope=f"over the whole validation split ({total} images)", per_class=per_class,
        sampling=sampling_note(screening, picked, "validation images"),
        artifact_key="validation-report", run_id=run_id, feature_map_layers=layers,
    )


def check_feature_map_layers(arch: str, config: ReportConfig) -> None:
    """Before a retraining run: the layers named for the report's "Feature maps" section must
    exist in ``arch``, or the run would fail only after training. The model is built on the meta
    device (no memory, no weights; module names do not depend on the class count); the few
    architectures whose constructors read their own weights (RegNet) are built on the CPU."""
    if not (config.feature_maps and config.feature_map_layers):
        return
    import torch

    from cvlib.explain.featuremaps import choose_layers
    from cvlib.models.factory import create_model

    try:
        with torch.device("meta"):
            model = create_model(arch, 2, weights="none")
    except (NotImplementedError, RuntimeError):
        model = create_model(arch, 2, weights="none")
    choose_layers(model, config.feature_map_layers)


def _feature_map_layers(model, config: ReportConfig) -> list[str] | None:
    """The layers the "Feature maps" section shows (None: the section is off). Checked against
    the model now, so a misspelt layer fails before the screening pass, not after it."""
    if not config.feature_maps:
        return None
    from cvlib.explain.featuremaps import choose_layers

    return choose_layers(model, config.feature_map_layers)


def _screen_and_choose(model, meta, root, files, labels, config: ReportConfig, *, batch_size: int = 64, num_workers: int = 0):
    from cvlib.explain.screening import choose_samples, screen_files

    screening = screen_files(
        model, meta, root, files, labels=labels, batch_size=config.batch_size or batch_size, num_workers=num_workers,
        device=config.device, precision=config.precision,
    )
    picked = choose_samples(screening.true_idx, screening.preds, screening.losses, config.samples, seed=config.seed)
    return screening, picked


def _mlflow_report_link(run_id: str | None, name: str) -> str | None:
    """The MLflow UI's page for the report artifact, when the run lives on a tracking server."""
    if not run_id:
        return None
    from tasks.environment import mlflow_tracking_uri
    from tasks.registry import client

    uri = mlflow_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return None
    from mlflow.exceptions import MlflowException

    try:
        experiment_id = client().get_run(run_id).info.experiment_id
    except (MlflowException, OSError) as exc:  # a link is a convenience: never fail the report for it
        run_logger().warning("no MLflow link for the report: %s", exc)
        return None
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}/artifactPath/{REPORT_ARTIFACT_DIR}/{name}"


def _num(value: float) -> str:
    text = f"{value:.3f}"
    return "0.000" if float(text) == 0 else text


def _md(text: object) -> str:
    """Plain text for a markdown table cell (labels are user data)."""
    out = str(text)
    for ch in "\\`*_[]<>|#":
        out = out.replace(ch, "\\" + ch)
    return out.replace("\n", " ")


def _write(model, meta, root, screening, picked, out, config: ReportConfig, *, title, subtitle, summary, metrics,
           confusions, confusions_scope, per_class, sampling, artifact_key, figures=None, run_id=None,
           feature_map_layers: list[str] | None = None) -> str:
    """Explain the chosen images, write the report and point the Prefect UI at it."""
    from cvlib.explain.render import render_report, write_report
    from cvlib.explain.samples import explain_feature_maps, explain_files

    files = [screening.files[i] for i in picked]
    labels = [screening.labels[i] for i in picked]
    per_forward = {"batch_size": config.batch_size} if config.batch_size else {}  # else explain_files' own default
    samples, errors = explain_files(
        model, meta, root, files, labels=labels, seed=config.seed, precision=config.precision, device=config.device, **per_forward
    )
    errors = screening.errors + errors
    feature_maps = None
    if feature_map_layers is not None:
        feature_maps = explain_feature_maps(
            model, meta, root, samples, layers=feature_map_layers,
            images=config.feature_map_images, channels=config.feature_map_channels,
        )
        run_logger().info("feature maps of %s for %d images", ", ".join(feature_map_layers), len(feature_maps))
    html = render_report(
        samples, title=title, subtitle=subtitle, summary=summary, metrics=metrics, figures=figures, errors=errors,
        confusions=confusions, confusions_scope=confusions_scope or "", per_class=per_class,
        class_names=meta["class_names"], sampling=sampling, feature_maps=feature_maps,
    )
    path = write_report(html, out).resolve()
    wrong = sum(not s.correct for s in samples)
    _publish(path, samples, len(errors), title=title, metrics=metrics, confusions=confusions,
             confusions_scope=confusions_scope, artifact_key=artifact_key, run_id=run_id)
    run_logger().info("report with %d images (%d misclassified) -> %s", len(samples), wrong, path)
    return str(path)


def _publish(path: Path, samples, n_errors: int, *, title, metrics, confusions, confusions_scope, artifact_key, run_id) -> None:
    """A link artifact to the report (the MLflow UI's view of it when there is one, else the local
    file) and a markdown artifact with its headline numbers."""
    wrong = sum(not s.correct for s in samples)
    ui_link = _mlflow_report_link(run_id, path.name)
    if ui_link:
        create_link_artifact(
            key=artifact_key, link=ui_link, link_text=f"{title} (MLflow run {run_id[:8]})",
            description=f"Grad-CAM report in the MLflow UI ({len(samples)} images, {wrong} misclassified)",
        )
    else:
        create_link_artifact(
            key=artifact_key, link=path.as_uri(), link_text=f"{path.name} (local file: open it in a browser)",
            description=f"Grad-CAM report, {len(samples)} images, {wrong} misclassified: {path}",
        )
    markdown = _headline_markdown(
        path, samples, n_errors, title=title, metrics=metrics, confusions=confusions,
        confusions_scope=confusions_scope, ui_link=ui_link, run_id=run_id,
    )
    create_markdown_artifact(key=f"{artifact_key}-summary", markdown=markdown, description=f"{title}: headline numbers")


def _headline_markdown(path: Path, samples, n_errors: int, *, title, metrics, confusions, confusions_scope, ui_link, run_id) -> str:
    from cvlib.explain.summary import faithfulness_summary, metric_table

    wrong = sum(not s.correct for s in samples)
    faith = faithfulness_summary(samples)
    lines = [f"# {_md(title)}", ""]
    table = metric_table(metrics or {})
    if table["rows"]:
        lines += ["| | " + " | ".join(table["columns"]) + " |", "|---" * (len(table["columns"]) + 1) + "|"]
        lines += [f"| {row['split']} | " + " | ".join(row["values"]) + " |" for row in table["rows"]]
        lines.append("")
    lines.append(f"- **{len(samples)}** images explained, **{wrong}** misclassified, {n_errors} unreadable")
    if faith:
        lines.append(
            f"- faithfulness: blurring the top {round(100 * faith['fraction'])}% CAM pixels drops confidence by "
            f"**{_num(faith['cam_drop_mean'])}** on average vs **{_num(faith['random_drop_mean'])}** for random pixels "
            f"(CAM wins on {faith['beats_random']}/{faith['n']} images): {faith['verdict']}"
        )
    if confusions:
        top = ", ".join(f"{_md(c['true'])} → {_md(c['pred'])} ({c['count']})" for c in confusions[:3])
        lines.append(f"- top confusions {_md(confusions_scope or '')}: {top}")
    lines += ["", "**Open the report:**"]
    if ui_link:
        lines.append(f"- MLflow UI: [{REPORT_ARTIFACT_DIR}/{path.name}]({ui_link})")
    if run_id:
        lines.append(f"- MLflow artifact: `runs:/{run_id}/{REPORT_ARTIFACT_DIR}/{path.name}` "
                     f"(`mlflow artifacts download -r {run_id} -a {REPORT_ARTIFACT_DIR}/{path.name}`)")
    lines.append(f"- local file: `{path}`")
    return "\n".join(lines)
