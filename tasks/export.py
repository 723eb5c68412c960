"""Export stage: a registered version -> OpenVINO IR (int8 when it agrees) logged with the version.

:func:`export_version` (a Prefect task) runs :func:`cvlib.inference.export.export_package` on a
model version with its own training data (the run's manifest and data folder, or a folder given),
then logs the ``openvino/`` folder (IR files and record) into the version's logged model,
beside the package (``artifacts/package/openvino``: the pyfunc model and scoring find it there
after a download), logs the record to the version's run (``openvino/export.json``), and sets the version tags a person and ``score --engine auto`` read:
``visionflow.openvino.status`` (verified or rejected), ``.precision``, ``.top1_agreement``,
``.top5_agreement``, ``.val_top1``, ``.val_top1_fp32``, ``.reason``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from prefect import task
from pydantic import BaseModel

from cvlib.inference.options import ExportConfig
from tasks.log import run_logger
from tasks.manifest_log import download_manifest
from tasks.registry import client, parse_model_uri, resolve_model

TAG = "visionflow.openvino"
PACKAGE_SUBPATH = "artifacts/package"  # where pyfunc.log_model(artifacts={"package": ...}) puts the package


class ExportResult(BaseModel):
    """What an export decided, for the flow and the CLI."""

    model_uri: str
    version: str
    status: str  # verified or rejected
    precision: str | None
    reason: str
    top1_agreement: float | None
    int8_top1_agreement: float | None
    val_top1_fp32: float
    val_top1: float | None
    seconds: float


def _version_data(name: str, version: str, data_dir: str | None) -> tuple[str, str]:
    """(data folder, manifest path) the version was trained on: the run's ``data/manifest.parquet``
    artifact (or that of the run it refers to, see :mod:`tasks.manifest_log`) and data folder tag, unless ``data_dir`` is given (then it is ingested here)."""
    c = client()
    mv = c.get_model_version(name, version)
    if data_dir is None:
        run = c.get_run(mv.run_id)
        data_dir = run.data.tags.get("visionflow.data_dir")
        if not data_dir or not Path(data_dir).is_dir():
            raise ValueError(f"models:/{name}/{version}: its training data folder {data_dir!r} is not here; pass --data DIR")
        # From the run that holds this content (the version's own, an earlier one, or, that one
        # deleted, another run with the same bytes); a clear error when none is left.
        return data_dir, download_manifest(run, tempfile.mkdtemp(prefix="visionflow-export-"))
    return data_dir, _ingest(data_dir)


def _ingest(data_dir: str) -> str:
    from cvlib.data.ingest import build_manifest
    from cvlib.data.manifest import write_manifest

    manifest, _ = build_manifest(data_dir)
    out = Path(tempfile.mkdtemp(prefix="visionflow-export-")) / "manifest.parquet"
    write_manifest(manifest, out)
    return str(out)


def export_local(model_path: str, data_dir: str, config: ExportConfig, out_dir: str | None = None) -> dict:
    """Export a package folder or checkpoint (no registry): the ``openvino/`` folder goes into the
    package (or ``out_dir``); returns the record."""
    from cvlib.data.manifest import read_manifest
    from cvlib.inference.engines import OPENVINO_DIR
    from cvlib.inference.export import export_package
    from cvlib.training.checkpoint import load_package

    model, meta = load_package(model_path)
    if out_dir is None:
        if not Path(model_path).is_dir():
            raise ValueError(f"{model_path} is a checkpoint file: pass --out DIR for the OpenVINO files")
        out_dir = str(Path(model_path) / OPENVINO_DIR)
    record = export_package(model, meta, data_dir, read_manifest(_ingest(data_dir)), out_dir, config)
    return json.loads(record.to_json())


@task(name="export-openvino", retries=1, retry_delay_seconds=5, timeout_seconds=3600)
def export_version(model_uri: str, config: ExportConfig, data_dir: str | None = None, manifest: str | None = None) -> ExportResult:
    """Export ``models:/NAME/VERSION`` (or ``@ALIAS``) to OpenVINO; see the module docstring.
    ``data_dir`` and ``manifest``: the images to calibrate and validate on (default: the ones the
    version was trained on; a folder without a manifest is ingested here)."""
    from cvlib.data.manifest import read_manifest
    from cvlib.inference.engines import EXPORT_RECORD, OPENVINO_DIR
    from cvlib.inference.export import export_package
    from cvlib.training.checkpoint import load_package

    logger = run_logger()
    name, _, _ = parse_model_uri(model_uri)
    local, version = resolve_model(model_uri)
    data_root, manifest = (data_dir, manifest) if data_dir and manifest else _version_data(name, version, data_dir)
    model, meta = load_package(local)
    c = client()
    mv = c.get_model_version(name, version)
    with tempfile.TemporaryDirectory(prefix="visionflow-openvino-") as tmp:
        out = Path(tmp) / OPENVINO_DIR
        record = export_package(model, meta, data_root, read_manifest(manifest), out, config)
        model_id = _logged_model_id(mv)
        if model_id:  # MLflow 3: the version's files are a logged model's (linked to the run)
            c.log_model_artifacts(model_id, str(out), f"{PACKAGE_SUBPATH}/{OPENVINO_DIR}")
            c.log_artifact(mv.run_id, str(out / EXPORT_RECORD), OPENVINO_DIR)  # the figures, on the run's page too
        else:  # a model logged under the run's artifacts (MLflow 2 layout)
            c.log_artifacts(mv.run_id, str(out), f"model/{PACKAGE_SUBPATH}/{OPENVINO_DIR}")
    chosen = record.candidate(record.precision) if record.precision else None
    int8 = record.candidate("int8")
    tags = {
        f"{TAG}.status": record.status,
        f"{TAG}.precision": record.precision or "",
        f"{TAG}.top1_agreement": "" if chosen is None else f"{chosen.top1_agreement:.6f}",
        f"{TAG}.top5_agreement": "" if chosen is None else f"{chosen.top5_agreement:.6f}",
        f"{TAG}.val_top1": "" if chosen is None else f"{chosen.val_top1:.6f}",
        f"{TAG}.val_top1_fp32": f"{record.val_top1_fp32:.6f}",
        f"{TAG}.int8_top1_agreement": "" if int8 is None else f"{int8.top1_agreement:.6f}",
        f"{TAG}.min_top1_agreement": f"{record.min_top1_agreement:.4f}",
        f"{TAG}.reason": record.reason[:5000],
    }
    for key, value in tags.items():
        c.set_model_version_tag(name, version, key, value)
    _forget_cached(local)
    logger.info("OpenVINO export of %s v%s: %s (%s)", name, version, record.status, record.reason)
    return ExportResult(
        model_uri=f"models:/{name}/{version}", version=version, status=record.status, precision=record.precision,
        reason=record.reason, top1_agreement=None if chosen is None else chosen.top1_agreement,
        int8_top1_agreement=None if int8 is None else int8.top1_agreement, val_top1_fp32=record.val_top1_fp32,
        val_top1=None if chosen is None else chosen.val_top1, seconds=record.seconds,
    )  # fmt: skip


def _logged_model_id(mv) -> str | None:
    """The logged model behind a version: ``model_id``, or its ``models:/m-...`` source."""
    model_id = getattr(mv, "model_id", None)
    if not model_id and str(mv.source).startswith("models:/m-"):
        model_id = str(mv.source).removeprefix("models:/").split("/")[0]
    return model_id or None


def _forget_cached(local: str) -> None:
    """The version's cached download predates its OpenVINO files: drop its completion mark so the
    next use downloads it again, with them."""
    mark = Path(local) / ".complete"
    mark.unlink(missing_ok=True)
