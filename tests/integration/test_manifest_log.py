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


# --------------------------------------------------------------------------- a holder that goes
#
# A person deletes the holder run in the UI (soft delete), `mlflow gc` later removes it and its
# files, or the file goes from the artifact store: the runs that referred to it must still find
# their manifest in another active run with the same bytes, or fail saying which run, which holder,
# which content and how to get it back.


@pytest.fixture
def same_content(mlflow_server, use_mlflow, digits_dir: Path, tmp_path):
    """A manifest, and a factory of runs (in one new experiment) that log it."""
    from tasks.manifest_log import log_manifest
    from tasks.records import IngestResult
    from tasks.registry import start_run

    use_mlflow(mlflow_server)
    refreshed = refresh_manifest(digits_dir, tmp_path / "manifest.parquet", DataConfig(), near_duplicates=False)
    ingest = IngestResult(data_dir=str(digits_dir), manifest_path=str(refreshed.path), dataset_hash=refreshed.dataset_hash,
                          class_names=refreshed.class_names, summary={})  # fmt: skip
    config = small_config(f"manifest-holder-{uuid.uuid4().hex[:8]}", arch="simple_cnn")
    config = config.model_copy(update={"experiment": config.model_name})

    def new_run() -> tuple[str, str]:
        """A run that logs the manifest: (its id, the run holding its manifest)."""
        run_id = start_run.fn(config, ingest)
        return run_id, log_manifest.fn(run_id, str(refreshed.path))

    return mlflow_client(mlflow_server), Path(refreshed.path), new_run


def _resolve(c, run_id: str, dst: Path) -> tuple[str, bytes]:
    """(the run holding ``run_id``'s manifest now, the bytes a reader downloads)."""
    from tasks.manifest_log import download_manifest, manifest_run_of

    run = c.get_run(run_id)
    return manifest_run_of(run), Path(download_manifest(run, str(dst))).read_bytes()


def test_a_deleted_holder_falls_back_to_another_run_with_the_same_content(same_content, tmp_path):
    c, manifest, new_run = same_content
    first, _ = new_run()
    second, held_by = new_run()
    assert held_by == first
    c.delete_run(first)  # the holder deleted in the UI
    third, held_by = new_run()
    assert held_by == third and _artifacts(c, third) == ["data/manifest.parquet"]  # the next run uploads again

    assert _resolve(c, second, tmp_path / "a") == (third, manifest.read_bytes())  # second falls back to third
    assert _resolve(c, third, tmp_path / "b") == (third, manifest.read_bytes())
    c.restore_run(first)  # restored: the reference is followed again
    assert _resolve(c, second, tmp_path / "c") == (first, manifest.read_bytes())


def test_a_manifest_no_active_run_holds_is_a_clear_error_saying_how_to_recover(same_content, tmp_path):
    from tasks.manifest_log import DIGEST_TAG, ManifestUnavailableError, download_manifest, manifest_run_of

    c, manifest, new_run = same_content
    first, _ = new_run()
    second, _ = new_run()
    c.delete_run(first)
    run = c.get_run(second)
    for resolve in (manifest_run_of, lambda r: download_manifest(r, str(tmp_path / "dl"))):
        with pytest.raises(ManifestUnavailableError) as err:
            resolve(run)
        message = str(err.value)
        assert second in message and first in message and run.data.tags[DIGEST_TAG] in message
        assert f"mlflow runs restore --run-id {first}" in message and "--data DIR" in message
    assert not (tmp_path / "dl" / "data" / "manifest.parquet").exists()
    with pytest.raises(ManifestUnavailableError):  # the deleted holder's own manifest: the same answer
        manifest_run_of(c.get_run(first))
    untracked = c.create_run(run.info.experiment_id).info.run_id  # a run that never logged a manifest (the sweep's)
    with pytest.raises(ManifestUnavailableError, match=f"run {untracked} records no manifest reference"):
        manifest_run_of(c.get_run(untracked))

    # The advice holds: a retrain over the unchanged folder uploads the same bytes again.
    third, held_by = new_run()
    assert held_by == third
    assert _resolve(c, second, tmp_path / "again") == (third, manifest.read_bytes())


def _store_uri(backend: str, session_root: Path, request) -> str:
    """The session MLflow server's backend store (as tests/conftest.py starts it), for `mlflow gc`."""
    if backend == "sqlite":
        return f"sqlite:///{session_root / 'mlflow-server.db'}"
    return request.getfixturevalue("postgres_url")


def test_a_garbage_collected_holder_falls_back_to_a_pinned_copy(
    same_content, mlflow_server, backend, session_root, request, tmp_path
):
    import subprocess
    import sys

    from mlflow.exceptions import MlflowException

    from tasks.manifest_log import HOLDER_TAG, UPLOADED_TAG, pin_manifest

    c, manifest, new_run = same_content
    first, _ = new_run()
    second, _ = new_run()
    # second's version is promoted: the flow pins the manifest into its run (once).
    assert pin_manifest.fn(second, str(manifest)) is True
    assert pin_manifest.fn(second, str(manifest)) is False
    tags = c.get_run(second).data.tags
    assert tags[HOLDER_TAG] == second and tags[UPLOADED_TAG] == "true" and _artifacts(c, second) == ["data/manifest.parquet"]
    third, held_by = new_run()
    assert held_by == first  # still one reference: the oldest holder

    c.delete_run(first)
    gc = [sys.executable, "-m", "mlflow", "gc", "--backend-store-uri", _store_uri(backend, session_root, request),
          "--tracking-uri", mlflow_server, "--run-ids", first]  # fmt: skip
    subprocess.run(gc, check=True, capture_output=True, timeout=300)
    with pytest.raises(MlflowException, match="not found|does not exist|RESOURCE_DOES_NOT_EXIST"):
        c.get_run(first)  # gone, files and all
    assert _resolve(c, third, tmp_path / "dl") == (second, manifest.read_bytes())


def _artifact_file(backend: str, session_root: Path, run) -> Path:
    """Where the session server (artifacts proxied, see tests/conftest.py) keeps a run's manifest."""
    from urllib.parse import urlparse

    relative = urlparse(run.info.artifact_uri).path.lstrip("/")  # mlflow-artifacts:[//host]/EXP/RUN/artifacts
    return session_root / f"mlflow-{backend}-artifacts" / relative / "data" / "manifest.parquet"


def test_an_active_holder_that_lost_its_file_is_passed_over(same_content, backend, session_root, tmp_path):
    from tasks.manifest_log import pin_manifest

    c, manifest, new_run = same_content
    first, _ = new_run()
    second, _ = new_run()
    pin_manifest.fn(second, str(manifest))
    third, _ = new_run()
    stored = _artifact_file(backend, session_root, c.get_run(first))
    assert stored.read_bytes() == manifest.read_bytes()
    stored.unlink()  # the artifact store lost the file; the run is still active and tagged

    assert _resolve(c, third, tmp_path / "dl") == (second, manifest.read_bytes())
    _, held_by = new_run()
    assert held_by == second  # a new run does not refer to a holder without the file either


def test_a_promoted_version_s_run_holds_its_manifest_itself(digits_dir, on_servers, mlflow_server, tmp_path):
    """The retrain flow pins the manifest into the run of a version the gate promotes, when that
    run only referred to another run's copy (tasks/manifest_log.py says why only then)."""
    from cvlib.inference.options import ExportConfig
    from flows.retrain import retrain
    from tasks.ingest import manifest_cache
    from tasks.manifest_log import DIGEST_TAG, HOLDER_TAG, UPLOADED_TAG, log_manifest
    from tasks.records import IngestResult
    from tasks.registry import start_run

    c = mlflow_client(mlflow_server)
    name = f"manifest-pin-{uuid.uuid4().hex[:8]}"
    config = small_config(name).model_copy(update={"experiment": name, "export": ExportConfig(enabled=False)})
    # An earlier run of the experiment holds the manifest the flow will write (its ingest's cache).
    refreshed = refresh_manifest(digits_dir, manifest_cache(str(digits_dir)), config.data)
    ingest = IngestResult(data_dir=str(digits_dir), manifest_path=str(refreshed.path), dataset_hash=refreshed.dataset_hash,
                          class_names=refreshed.class_names, summary={})  # fmt: skip
    earlier = start_run.fn(config, ingest)
    assert log_manifest.fn(earlier, str(refreshed.path)) == earlier

    result = retrain(data_dir=str(digits_dir), config=config, output_dir=str(tmp_path / "out"))
    assert result.promoted  # the model's first version
    tags = c.get_run(result.run_id).data.tags
    assert tags[DIGEST_TAG] == c.get_run(earlier).data.tags[DIGEST_TAG]  # the same bytes: it had referred to earlier
    assert tags[HOLDER_TAG] == result.run_id and tags[UPLOADED_TAG] == "true"
    assert _artifacts(c, result.run_id) == ["data/manifest.parquet"]

    # Months later the earlier run is cleaned up: exporting the champion still finds its manifest.
    from tasks.export import _version_data

    c.delete_run(earlier)
    data_dir, got = _version_data(name, result.version, None)
    assert data_dir == str(digits_dir.resolve()) and Path(got).read_bytes() == Path(refreshed.path).read_bytes()


def test_a_copy_that_is_not_the_recorded_content_is_not_used(same_content, backend, session_root, tmp_path):
    from tasks.manifest_log import ManifestUnavailableError, download_manifest, pin_manifest

    c, manifest, new_run = same_content
    first, _ = new_run()
    second, _ = new_run()
    third, _ = new_run()
    _artifact_file(backend, session_root, c.get_run(first)).write_bytes(b"not the manifest")  # the store's copy damaged

    with pytest.raises(ManifestUnavailableError, match=f"the copies in runs {first} do not match the digest"):
        download_manifest(c.get_run(third), str(tmp_path / "a"))
    pin_manifest.fn(second, str(manifest))  # another holder of the right bytes: read from it
    assert Path(download_manifest(c.get_run(third), str(tmp_path / "b"))).read_bytes() == manifest.read_bytes()
