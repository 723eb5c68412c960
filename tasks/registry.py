"""Everything MLflow: the run, per-epoch metrics, the model package, the registry and its aliases.

Calls go through an explicit ``MlflowClient`` and run id rather than MLflow's global "active
run", so tasks running in threads cannot log into each other's runs.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import task

from cvlib.config import RetrainConfig, flatten
from cvlib.promotion import GateConfig
from tasks.environment import mlflow_artifact_root, mlflow_tracking_uri, visionflow_home
from tasks.log import run_logger
from tasks.records import IngestResult, RegisteredVersion, Validation

CHAMPION = "champion"
CHALLENGER = "challenger"
RUN_TAG = "visionflow.run_id"


def client():
    import mlflow
    from mlflow import MlflowClient

    uri = mlflow_tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(name: str) -> str:
    c = client()
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(name, artifact_location=mlflow_artifact_root())
    except Exception:  # created concurrently by another run
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


@task(name="start-mlflow-run", retries=3, retry_delay_seconds=[1, 5, 15], timeout_seconds=300, persist_result=True)
def start_run(config: RetrainConfig, ingest: IngestResult, flow_run_id: str | None = None) -> str:
    """Create the MLflow run, with the configuration as params and the data set as tags."""
    c = client()
    exp_id = ensure_experiment(config.experiment)
    tags = {
        "visionflow.dataset_hash": ingest.dataset_hash,
        "visionflow.data_dir": ingest.data_dir,
        "visionflow.class_names": json.dumps(ingest.class_names),
        "mlflow.source.name": "visionflow retrain",
    }
    if flow_run_id:
        tags["prefect.flow_run_id"] = flow_run_id
    commit = _git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    run_name = f"{config.train.arch}-{len(ingest.class_names)}cls-lr{config.train.lr:g}-e{config.train.epochs}"
    run = c.create_run(exp_id, run_name=run_name, tags=tags)
    from mlflow.entities import Param

    params = [Param(k, str(v)[:6000]) for k, v in flatten(config).items()]
    for i in range(0, len(params), 100):
        c.log_batch(run.info.run_id, params=params[i : i + 100])
    run_logger().info("MLflow run %s (%s) in experiment %r", run.info.run_id, run_name, config.experiment)
    return run.info.run_id


def log_metrics(run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client().log_batch(run_id, metrics=[Metric(k, float(v), now, step or 0) for k, v in metrics.items()])


def set_run_tag(run_id: str, key: str, value: str) -> None:
    client().set_tag(run_id, key, value)


def log_artifact(run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    client().log_artifact(run_id, str(path), artifact_path)


def log_artifacts(run_id: str, folder: str | Path, artifact_path: str | None = None) -> None:
    client().log_artifacts(run_id, str(folder), artifact_path)


@contextmanager
def system_metrics(run_id: str, enabled: bool = True) -> Iterator[None]:
    """CPU, memory and GPU use sampled into the run while the block runs (MLflow's monitor,
    bound to our run id rather than to a global active run)."""
    if not enabled:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=5, samples_before_logging=1, tracking_uri=mlflow_tracking_uri())
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


def end_run(run_id: str, status: str = "FINISHED") -> None:
    client().set_terminated(run_id, status)


def _git_commit() -> str | None:
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _find_version_for_run(name: str, run_id: str):
    c = client()
    try:
        versions = c.search_model_versions(f"name = '{name}'")
    except Exception:
        return None
    for v in versions:
        if (v.tags or {}).get(RUN_TAG) == run_id:
            return v
    return None


@task(name="register-model", retries=3, retry_delay_seconds=[2, 10, 30], timeout_seconds=1800, persist_result=True)
def register_model(
    run_id: str, checkpoint: str, model_name: str, validation: Validation, example_image: str | None = None
) -> RegisteredVersion:
    """Log the model package under the run and register it as a new version.

    Idempotent: a retry after a partial failure finds the version already registered for this
    run (tagged with the run id) instead of creating a second one.
    """
    import mlflow

    import cvlib
    from cvlib.training.checkpoint import model_from_checkpoint, save_package

    logger = run_logger()
    existing = _find_version_for_run(model_name, run_id)
    if existing is not None:
        logger.info("version %s of %s already registered for run %s", existing.version, model_name, run_id)
        return RegisteredVersion(name=model_name, version=str(existing.version), run_id=run_id, model_uri=f"models:/{model_name}/{existing.version}")

    client()  # sets the tracking and registry URIs
    model, meta = model_from_checkpoint(checkpoint)
    with tempfile.TemporaryDirectory(prefix="visionflow-package-") as tmp:
        package = save_package(model, {**meta, "metrics": validation.metrics}, Path(tmp) / "package")
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(Path(__file__).with_name("pyfunc_model.py")),
                artifacts={"package": str(package)},
                code_paths=[str(Path(cvlib.__file__).parent)],
                signature=_signature(),
                input_example=_input_example(example_image),
                pip_requirements=_requirements(),
            )
    version = mlflow.register_model(info.model_uri, model_name, tags={RUN_TAG: run_id})
    c = client()
    for key, value in validation.metrics.items():
        c.set_model_version_tag(model_name, version.version, f"metric.{key}", f"{value:.6f}")
    logger.info("registered %s version %s", model_name, version.version)
    return RegisteredVersion(name=model_name, version=str(version.version), run_id=run_id, model_uri=f"models:/{model_name}/{version.version}")


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "path", required=False), ColSpec("binary", "image", required=False)]),
        outputs=Schema(
            [
                ColSpec("string", "status"),
                ColSpec("string", "error", required=False),
                ColSpec("string", "top1_label", required=False),
                ColSpec("double", "top1_prob", required=False),
            ]
        ),
    )


def _input_example(image: str | None):
    """One real image as raw bytes: the REST example a user copies (bytes travel as base64)."""
    if image is None:
        return None
    import pandas as pd

    return pd.DataFrame({"image": [Path(image).read_bytes()]})


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("torch", "torchvision", "pillow", "numpy", "pandas", "safetensors", "mlflow")]


def _champion_version(name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client().get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def _score_champion(champion, ingest: IngestResult, metric: str, batch_size: int, num_workers: int) -> tuple[float | None, str | None]:
    """Re-evaluate the champion on the challenger's validation split: scores recorded at its own
    training time came from another split and are not comparable. Returns (score, why not)."""
    from cvlib.data.manifest import read_manifest
    from cvlib.training.checkpoint import load_package
    from cvlib.training.evaluate import evaluate_split
    from cvlib.training.metrics import classification_metrics

    local, _ = resolve_model(f"models:/{champion.name}/{champion.version}")
    model, meta = load_package(local)
    if list(meta["class_names"]) != list(ingest.class_names):
        return None, f"class list changed ({len(meta['class_names'])} -> {len(ingest.class_names)} classes)"
    manifest = read_manifest(ingest.manifest_path)
    ev = evaluate_split(model, meta, ingest.data_dir, manifest, "val", batch_size=batch_size, num_workers=num_workers)
    report = classification_metrics(ev.targets, ev.probs, meta["class_names"], prefix="val_")
    scores = report["metrics"] | {"val_loss": ev.loss}
    if metric not in scores:
        raise ValueError(f"unknown gate metric {metric!r}; choose one of {sorted(scores)}")
    return float(scores[metric]), None


@task(name="champion-gate", retries=3, retry_delay_seconds=[1, 5, 15], timeout_seconds=3600, persist_result=True)
def champion_gate(
    registered: RegisteredVersion, ingest: IngestResult, validation: Validation, gate: GateConfig,
    batch_size: int = 64, num_workers: int = 2,
) -> dict[str, Any]:
    """Alias the new version ``challenger``; move ``champion`` only when it wins.

    The challenger wins when there is no champion yet, or when its validation ``gate.metric``
    beats the champion's, re-measured on the same split, by more than ``gate.margin``.
    The decision and both scores become version tags and a Prefect artifact.
    """
    from prefect.artifacts import create_markdown_artifact

    c = client()
    name, version = registered.name, registered.version
    c.set_registered_model_alias(name, CHALLENGER, version)
    if gate.metric not in validation.metrics:
        raise ValueError(f"unknown gate metric {gate.metric!r}; choose one of {sorted(validation.metrics)}")
    new_score = float(validation.metrics[gate.metric])
    champion = _champion_version(name)
    old_score: float | None = None
    if champion is None:
        promoted, reason = True, "no champion yet: the first version becomes champion"
    elif str(champion.version) == version:
        promoted, reason = True, "already champion"
    else:
        old_score, not_comparable = _score_champion(champion, ingest, gate.metric, batch_size, num_workers)
        if not_comparable:
            promoted = gate.promote_on_class_change
            reason = f"{not_comparable}; " + ("promoted by configuration" if promoted else "kept champion v" + str(champion.version))
        else:
            promoted = new_score > old_score + gate.margin
            reason = (
                f"{gate.metric}: challenger {new_score:.4f} vs champion v{champion.version} {old_score:.4f} "
                f"(margin {gate.margin}): {'challenger wins' if promoted else 'champion stays'}"
            )
    if promoted:
        c.set_registered_model_alias(name, CHAMPION, version)
    tags = {
        "visionflow.gate.promoted": str(promoted).lower(),
        "visionflow.gate.reason": reason,
        "visionflow.gate.metric": gate.metric,
        "visionflow.gate.challenger_score": f"{new_score:.6f}",
        "visionflow.gate.champion_score": "" if old_score is None else f"{old_score:.6f}",
        "visionflow.gate.champion_version": "" if champion is None else str(champion.version),
    }
    for key, value in tags.items():
        c.set_model_version_tag(name, version, key, value)
    create_markdown_artifact(
        key="promotion-decision",
        markdown=(
            f"# Champion gate: {name} v{version}\n\n| decision | metric | challenger | champion |\n|---|---|---|---|\n"
            f"| {'promoted to champion' if promoted else 'challenger only'} | {gate.metric} | {new_score:.4f} | "
            f"{'-' if old_score is None else f'{old_score:.4f} (v{champion.version})'} |\n\n{reason}"
        ),
        description=f"Promotion decision for {name} v{version}",
    )
    run_logger().info("champion gate for %s v%s: %s", name, version, reason)
    return {"promoted": promoted, "reason": reason, "challenger_score": new_score, "champion_score": old_score}


def _download(name: str, version: str) -> str:
    """Fetch a registered version's artifacts once into the home's model cache."""
    import mlflow

    # Keyed by the tracking store too: version 3 on one server is not version 3 on another.
    store = hashlib.sha256(mlflow_tracking_uri().encode()).hexdigest()[:12]
    dest = visionflow_home() / "models" / store / name / version
    if not (dest / ".complete").exists():
        dest.mkdir(parents=True, exist_ok=True)
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(dest))
        (dest / ".complete").touch()
    return str(dest)


def resolve_model(uri: str) -> tuple[str, str]:
    """Map a model reference to (local package or checkpoint path, version string).

    Accepts ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` and a checkpoint file or package
    folder written by visionflow. Aliases are resolved to a version first, so the cache key is
    the immutable version and a moved alias is never served stale.
    """
    if not uri.startswith("models:/"):
        path = Path(uri).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"model {uri!r} is neither a models:/ URI nor an existing file")
        return str(path.resolve()), path.name
    c = client()
    ref = uri.removeprefix("models:/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        version = str(c.get_model_version_by_alias(name, alias).version)
    else:
        name, _, version = ref.partition("/")
        if not version:
            raise ValueError(f"model URI {uri!r} needs a version or an alias: models:/NAME/VERSION or models:/NAME@ALIAS")
        c.get_model_version(name, version)  # a clear error now if it does not exist
    return _download(name, version), version
