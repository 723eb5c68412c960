"""The manifest is uploaded to MLflow once per content (issue 15): a second run over the same
manifest refers to the first run's artifact instead of logging the blob again, and the reference
is what readers (the OpenVINO export) follow. On the real MLflow server the tests start."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from cvlib.data.ingest import refresh_manifest
from cvlib.data.options import DataConfig
from tests.conftest import mlflow_client
from tests.integration.support import small_config

pytestmark = pytest.mark.slow


def _artifacts(c, run_id: str) -> list[str]:
    return [a.path for a in c.list_artifacts(run_id, "data")]


def test_a_manifest_already_logged_is_referenced_not_uploaded(mlflow_server, use_mlflow, digits_dir: Path, tmp_path):
    import mlflow

    from tasks.manifest_log import HOLDER_TAG, MANIFEST_ARTIFACT, log_manifest, manifest_run_of
    from tasks.records import IngestResult
    from tasks.registry import start_run

    use_mlflow(mlflow_server)
    c = mlflow_client(mlflow_server)
    refreshed = refresh_manifest(digits_dir, tmp_path / "manifest.parquet", DataConfig(), near_duplicates=False)
    ingest = IngestResult(data_dir=str(digits_dir), manifest_path=str(refreshed.path), dataset_hash=refreshed.dataset_hash,
                          class_names=refreshed.class_names, summary={})  # fmt: skip
    config = small_config(f"manifest-log-{uuid.uuid4().hex[:8]}", arch="simple_cnn")

    first = start_run.fn(config, ingest)
    assert log_manifest.fn(first, str(refreshed.path)) == first
    assert _artifacts(c, first) == [MANIFEST_ARTIFACT]

    again = refresh_manifest(digits_dir, tmp_path / "run2" / "manifest.parquet", DataConfig(), near_duplicates=False,
                             previous=refreshed.path)  # fmt: skip
    assert not again.changed  # the next retrain over the unchanged folder: the same bytes
    second = start_run.fn(config, ingest)
    assert log_manifest.fn(second, str(again.path)) == first
    assert _artifacts(c, second) == []  # no second blob
    run = c.get_run(second)
    assert run.data.tags[HOLDER_TAG] == first and manifest_run_of(run) == first
    got = mlflow.artifacts.download_artifacts(run_id=manifest_run_of(run), artifact_path=MANIFEST_ARTIFACT, dst_path=str(tmp_path / "dl"))
    assert Path(got).read_bytes() == Path(again.path).read_bytes()

    # Another content (a changed folder's manifest) is uploaded by its own run.
    other = tmp_path / "other.parquet"  # another file name, too: the artifact is still data/manifest.parquet
    changed = refresh_manifest(digits_dir, other, DataConfig(split_salt="another"), near_duplicates=False, previous=refreshed.path)
    assert changed.changed
    third = start_run.fn(config, ingest)
    assert log_manifest.fn(third, str(other)) == third
    assert _artifacts(c, third) == [MANIFEST_ARTIFACT]

    # A deleted holder is not referenced: the next run uploads again.
    c.delete_run(first)
    fourth = start_run.fn(config, ingest)
    assert log_manifest.fn(fourth, str(again.path)) == fourth
    assert _artifacts(c, fourth) == [MANIFEST_ARTIFACT]
