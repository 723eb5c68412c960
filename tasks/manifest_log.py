"""The training manifest in MLflow: uploaded once per content, referenced by every other run.

Each retrain run used to log its manifest as an artifact: at 100k files that is a multi-MB blob
per run, the same bytes every time the folder has not changed. Now a run uploads it only when
no active run of the experiment holds a manifest with the same content; otherwise the run is
tagged with the run that does (``visionflow.manifest_run``), which is where readers
(:func:`manifest_run_of`, the OpenVINO export) download it from.

The key is the SHA-256 of the manifest file, not the data set hash: the data set hash covers
what training sees (label, content, split of usable files) and would equate two manifests whose
paths or quarantined files differ, and a reader of the manifest needs the paths.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from prefect import task

from cvlib.data.inspection import sha256_file
from tasks.log import run_logger
from tasks.registry import client

MANIFEST_ARTIFACT = "data/manifest.parquet"
DIGEST_TAG = "visionflow.manifest_sha256"
HOLDER_TAG = "visionflow.manifest_run"  # the run whose artifacts hold this run's manifest
UPLOADED_TAG = "visionflow.manifest_uploaded"  # "true" on a run that holds the blob itself


def _holder(experiment_id: str, digest: str, run_id: str) -> str | None:
    """An active run of the experiment that uploaded a manifest with this content (not ``run_id``)."""
    found = client().search_runs(
        [experiment_id],
        filter_string=f"tags.`{DIGEST_TAG}` = '{digest}' and tags.`{UPLOADED_TAG}` = 'true'",
        max_results=5,
        order_by=["attributes.start_time ASC"],
    )
    return next((r.info.run_id for r in found if r.info.run_id != run_id), None)


@task(name="log-manifest", retries=2, retry_delay_seconds=[5, 30], timeout_seconds=1800)
def log_manifest(run_id: str, manifest_path: str) -> str:
    """Record the run's manifest: upload it, or refer to the run that already holds the same
    bytes. Returns the run id whose ``data/manifest.parquet`` is this run's manifest."""
    c = client()
    digest = sha256_file(manifest_path)
    experiment_id = c.get_run(run_id).info.experiment_id
    holder = _holder(experiment_id, digest, run_id)
    c.set_tag(run_id, DIGEST_TAG, digest)
    if holder is not None:
        c.set_tag(run_id, HOLDER_TAG, holder)
        run_logger().info("manifest %s… already logged by run %s: referenced, not uploaded", digest[:12], holder)
        return holder
    _upload(run_id, Path(manifest_path))
    c.set_tag(run_id, HOLDER_TAG, run_id)
    c.set_tag(run_id, UPLOADED_TAG, "true")  # last: a run is found as a holder only once its upload is complete
    return run_id


def _upload(run_id: str, path: Path) -> None:
    """Log ``path`` as ``data/manifest.parquet`` whatever its own name (readers ask for that name)."""
    folder, name = str(Path(MANIFEST_ARTIFACT).parent), Path(MANIFEST_ARTIFACT).name
    if path.name == name:
        client().log_artifact(run_id, str(path), folder)
        return
    with tempfile.TemporaryDirectory(prefix="visionflow-manifest-") as tmp:
        shutil.copyfile(path, Path(tmp) / name)
        client().log_artifact(run_id, str(Path(tmp) / name), folder)


def manifest_run_of(run) -> str:
    """The run whose artifacts hold ``run``'s manifest (itself for runs logged before the reference)."""
    return run.data.tags.get(HOLDER_TAG) or run.info.run_id
