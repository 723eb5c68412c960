"""The training manifest in MLflow: uploaded once per content, referenced by every other run.

Each retrain run used to log its manifest as an artifact: at 100k files that is a multi-MB blob
per run, the same bytes every time the folder has not changed. Now a run uploads it only when
no active run of the experiment holds a manifest with the same content; otherwise the run is
tagged with the run that does (``visionflow.manifest_run``), which is where readers
(:func:`download_manifest`, :func:`manifest_run_of`, the OpenVINO export) download it from.

The key is the SHA-256 of the manifest file, not the data set hash: the data set hash covers
what training sees (label, content, split of usable files) and would equate two manifests whose
paths or quarantined files differ, and a reader of the manifest needs the paths.

A reference can go stale: a person deletes the holder run in the MLflow UI (a soft delete, its
files stay until ``mlflow gc`` removes the run and its artifacts; gc looks at no tags, aliases or
registered versions), or the file is gone from the artifact store. So:

- Writing (:func:`log_manifest`) refers only to an active run whose artifact is listed; a run
  after the holder's deletion uploads again and becomes a holder itself.
- Reading follows the tag only while the holder is active and lists the file; otherwise it falls
  back to another active run of the experiment that uploaded the same bytes (same
  ``visionflow.manifest_sha256``, ``visionflow.manifest_uploaded=true``), oldest first, and the
  download is checked against the digest. With no such run it raises
  :class:`ManifestUnavailableError`, naming the run, the holder, the digest and the ways back.
  Reading writes nothing: a reader may hold read-only rights, and the fallback is cheap.

Registered versions: every retrain registers one (``register_model`` runs on each retrain, the
gate only decides the aliases), so making each version's run self-contained at registration
would upload the blob on every run, which is what the reference was built to avoid. A promoted
version is different: the champion is what gets exported and served months later, and its
holder is usually an *older* run, the kind a person cleans up first. So the retrain flow pins
the manifest into the run of a version the gate promotes (:func:`pin_manifest`): one upload per
promotion, not per run, and only when the holder is another run. The pinned run is then an
uploader of that content too, which is what makes the fallback work for every run that referred
to the old holder (without it there is exactly one uploader per content, and deleting it leaves
nothing to fall back to). Challengers, and versions made champion by hand, rely on the fallback
and, failing that, on the error's recovery advice.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from prefect import task

from cvlib.data.inspection import sha256_file
from tasks.log import run_logger
from tasks.registry import client, unless_missing

MANIFEST_ARTIFACT = "data/manifest.parquet"
DIGEST_TAG = "visionflow.manifest_sha256"
HOLDER_TAG = "visionflow.manifest_run"  # the run whose artifacts hold this run's manifest
UPLOADED_TAG = "visionflow.manifest_uploaded"  # "true" on a run that holds the blob itself
_FALLBACKS = 20  # other uploaders of the same content looked at before giving up


class ManifestUnavailableError(LookupError):
    """A run's manifest is held by no active run any more (its holder deleted or gone)."""


def _uploaders(experiment_id: str, digest: str) -> list:
    """Active runs of the experiment that uploaded a manifest with this content, oldest first."""
    return client().search_runs(
        [experiment_id],
        filter_string=f"tags.`{DIGEST_TAG}` = '{digest}' and tags.`{UPLOADED_TAG}` = 'true'",
        max_results=_FALLBACKS,
        order_by=["attributes.start_time ASC"],
    )


def _lists_manifest(run_id: str) -> bool:
    """Whether the run's artifact store lists the manifest file (a tag alone does not prove it)."""
    return any(a.path == MANIFEST_ARTIFACT for a in client().list_artifacts(run_id, str(Path(MANIFEST_ARTIFACT).parent)))


def _holds(run_id: str) -> bool:
    """Whether ``run_id`` is an active run whose artifacts list the manifest. Only "no such run"
    means gone (a garbage-collected run): any other error is raised, never read as missing."""
    run = unless_missing(client().get_run, run_id)
    return run is not None and run.info.lifecycle_stage == "active" and _lists_manifest(run_id)


def _other_holders(experiment_id: str, digest: str, but: str) -> Iterator[str]:
    """Active runs of the experiment, other than ``but``, that uploaded a manifest with this
    content and still list the file, oldest first."""
    for r in _uploaders(experiment_id, digest):
        if r.info.run_id != but and _lists_manifest(r.info.run_id):
            yield r.info.run_id


def _tagged_holder(run) -> str:
    """The run ``run``'s tag names as its manifest's holder (itself for runs logged before the reference)."""
    return run.data.tags.get(HOLDER_TAG) or run.info.run_id


@task(name="log-manifest", retries=2, retry_delay_seconds=[5, 30], timeout_seconds=1800)
def log_manifest(run_id: str, manifest_path: str) -> str:
    """Record the run's manifest: upload it, or refer to the run that already holds the same
    bytes. Returns the run id whose ``data/manifest.parquet`` is this run's manifest."""
    c = client()
    digest = sha256_file(manifest_path)
    experiment_id = c.get_run(run_id).info.experiment_id
    holder = next(_other_holders(experiment_id, digest, run_id), None)
    if holder is not None:
        c.set_tag(run_id, DIGEST_TAG, digest)
        c.set_tag(run_id, HOLDER_TAG, holder)
        run_logger().info("manifest %s… already logged by run %s: referenced, not uploaded", digest[:12], holder)
        return holder
    _keep(run_id, Path(manifest_path), digest)
    return run_id


@task(name="pin-manifest", retries=2, retry_delay_seconds=[5, 30], timeout_seconds=1800)
def pin_manifest(run_id: str, manifest_path: str) -> bool:
    """Make ``run_id`` hold its manifest itself (the run of a version just promoted to champion,
    see the module docstring): upload it when the run only refers to another run. Returns
    whether it uploaded. Idempotent: a run that already holds it is left alone."""
    c = client()
    tags = c.get_run(run_id).data.tags
    if tags.get(HOLDER_TAG) == run_id and tags.get(UPLOADED_TAG) == "true" and _lists_manifest(run_id):
        return False
    digest = sha256_file(manifest_path)
    _keep(run_id, Path(manifest_path), digest)
    run_logger().info("manifest %s… pinned into run %s (was held by run %s)", digest[:12], run_id, tags.get(HOLDER_TAG))
    return True


def _keep(run_id: str, path: Path, digest: str) -> None:
    """Upload the manifest into the run and tag it as its own holder."""
    c = client()
    c.set_tag(run_id, DIGEST_TAG, digest)
    _upload(run_id, path)
    c.set_tag(run_id, HOLDER_TAG, run_id)
    c.set_tag(run_id, UPLOADED_TAG, "true")  # last: a run is found as a holder only once its upload is complete


def _upload(run_id: str, path: Path) -> None:
    """Log ``path`` as ``data/manifest.parquet`` whatever its own name (readers ask for that name)."""
    folder, name = str(Path(MANIFEST_ARTIFACT).parent), Path(MANIFEST_ARTIFACT).name
    if path.name == name:
        client().log_artifact(run_id, str(path), folder)
        return
    with tempfile.TemporaryDirectory(prefix="visionflow-manifest-") as tmp:
        shutil.copyfile(path, Path(tmp) / name)
        client().log_artifact(run_id, str(Path(tmp) / name), folder)


def _candidates(run) -> Iterator[str]:
    """Runs that hold ``run``'s manifest now: its tagged holder (itself for runs logged before
    the reference) while it holds it, then other active uploaders of the same content."""
    tagged = _tagged_holder(run)
    if _holds(tagged):
        yield tagged
    digest = run.data.tags.get(DIGEST_TAG)
    if digest:  # logged before digests were recorded: nothing else to look for
        yield from _other_holders(run.info.experiment_id, digest, tagged)


def manifest_run_of(run) -> str:
    """The run whose artifacts hold ``run``'s manifest now: the tagged holder while it is active
    and lists the file, else another active run that uploaded the same bytes.
    Raises :class:`ManifestUnavailableError` when there is none."""
    holder = next(_candidates(run), None)
    if holder is None:
        raise _unavailable(run)
    _note_fallback(run, holder)
    return holder


def download_manifest(run, dst_path: str) -> str:
    """Download ``run``'s manifest into ``dst_path`` (see :func:`manifest_run_of`); returns the
    local path. A copy whose SHA-256 is not the run's recorded digest is passed over for the
    next holder. Raises :class:`ManifestUnavailableError` when no holder gives the right bytes."""
    import mlflow

    digest = run.data.tags.get(DIGEST_TAG)
    wrong: list[str] = []
    for holder in _candidates(run):
        local = mlflow.artifacts.download_artifacts(run_id=holder, artifact_path=MANIFEST_ARTIFACT, dst_path=dst_path)
        if digest and sha256_file(local) != digest:
            run_logger().warning("run %s's manifest copy is not the recorded content %s…: passed over", holder, digest[:12])
            wrong.append(holder)
            continue
        _note_fallback(run, holder)
        return local
    raise _unavailable(run, wrong)


def _note_fallback(run, holder: str) -> None:
    tagged = _tagged_holder(run)
    if holder != tagged:
        run_logger().warning(
            "run %s's manifest holder %s is deleted or has lost the file: using run %s, which holds the same content",
            run.info.run_id, tagged, holder,
        )  # fmt: skip


def _unavailable(run, wrong: Sequence[str] = ()) -> ManifestUnavailableError:
    """The error for a run whose manifest no active run holds, saying how to get it back."""
    run_id, experiment = run.info.run_id, run.info.experiment_id
    if HOLDER_TAG not in run.data.tags and DIGEST_TAG not in run.data.tags:
        return ManifestUnavailableError(
            f"run {run_id} records no manifest reference ({HOLDER_TAG}) and no {MANIFEST_ARTIFACT} of its own is readable: the "
            "run is deleted, or was logged by a flow that does not log manifests (the sweep) or by an older visionflow. "
            "Give the data instead (`visionflow export MODEL --data DIR`)."
        )
    tagged = _tagged_holder(run)
    digest = run.data.tags.get(DIGEST_TAG)
    holder = "the run itself" if tagged == run_id else f"run {tagged}"
    content = f"sha256 {digest}" if digest else "no digest recorded, so no other copy can be looked for"
    lost = f"is deleted, garbage-collected or has lost {MANIFEST_ARTIFACT}"
    mismatched = f" (the copies in runs {', '.join(wrong)} do not match the digest)" if wrong else ""
    return ManifestUnavailableError(
        f"run {run_id}: its manifest ({content}) was held by {holder}, which {lost}, and no other active run of "
        f"experiment {experiment} holds the same content{mismatched}. To recover: restore the holder if it is only "
        f"deleted (`mlflow runs restore --run-id {tagged}`); or retrain over the same, unchanged data folder in "
        f"experiment {experiment} (its manifest has the same bytes, is uploaded again, and this run finds it there); "
        "or export with the data given (`visionflow export MODEL --data DIR`)."
    )
