"""Everything MLflow: the run, per-epoch metrics, the model package, the registry and its aliases.

Calls go through an explicit ``MlflowClient`` and run id rather than MLflow's global "active
run", so tasks running in threads cannot log into each other's runs.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from prefect import task

from cvlib.config import RetrainConfig, flatten
from cvlib.promotion import Champion, GateConfig, GateDecision, challenger_score, class_change, decide, score_on
from tasks.environment import mlflow_artifact_root, mlflow_tracking_uri, quiet_defaults, visionflow_home
from tasks.log import run_logger
from tasks.records import IngestResult, RegisteredVersion, Validation

CHAMPION = "champion"
CHALLENGER = "challenger"
RUN_TAG = "visionflow.run_id"
# The experiment tag the MLflow 3 UI reads to choose its view (see the ExperimentKind values in its JS bundle).
EXPERIMENT_KIND = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"


T = TypeVar("T")


def client():
    import mlflow
    from mlflow import MlflowClient

    # Flows a Prefect worker runs never pass through the CLI's set-up: no progress bars redrawn
    # into the worker's log, no telemetry (each only where the user has not decided).
    quiet_defaults()
    uri = mlflow_tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def unless_missing(call: Callable[..., T], *args) -> T | None:
    """``call(*args)``, or None when MLflow answers that what it names does not exist. That is the
    only answer read as "not there": any other error (the server down, a timeout, a 5xx) is
    raised, so a task retries instead of acting on a false "none" (a second version of a run, a
    promotion past a champion it could not see, a manifest holder taken for gone)."""
    from mlflow.exceptions import MlflowException

    try:
        return call(*args)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def ensure_experiment(name: str) -> str:
    """The experiment's id, created as a model-training experiment if it does not exist yet.

    The kind tag makes the MLflow 3 UI open the experiment on its training view (runs, metrics)
    instead of the GenAI one; an experiment created before the tag existed gets it now, and a
    kind someone chose by hand is left alone.
    """
    c = client()
    exp = c.get_experiment_by_name(name)
    if exp is None:
        try:
            return c.create_experiment(name, artifact_location=mlflow_artifact_root(), tags={EXPERIMENT_KIND: MODEL_TRAINING})
        except Exception:  # created concurrently by another run
            exp = c.get_experiment_by_name(name)
            if exp is None:
                raise
    if EXPERIMENT_KIND not in exp.tags:
        c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
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
    """The version already registered from ``run_id`` (tagged with it), or None.

    Only a registry that answers "no such model" or "no such version" means not found. Any other
    error (the server down, a timeout, a 5xx) is raised so the task retries: read as "not found",
    it made a retried registration create a second version of the same run.
    """
    versions = unless_missing(client().search_model_versions, f"name = '{name}' AND tags.`{RUN_TAG}` = '{run_id}'")
    mine = [v for v in versions or () if (v.tags or {}).get(RUN_TAG) == run_id]
    return min(mine, key=lambda v: int(v.version)) if mine else None


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
        _tag_metrics(model_name, str(existing.version), validation)  # the attempt that created it may have died first
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
    # The run tag travels in the create call itself: a version never exists without it, so the
    # lookup above finds it even when the server created it and the answer was lost.
    version = mlflow.register_model(info.model_uri, model_name, tags={RUN_TAG: run_id})
    _tag_metrics(model_name, str(version.version), validation)
    logger.info("registered %s version %s", model_name, version.version)
    return RegisteredVersion(name=model_name, version=str(version.version), run_id=run_id, model_uri=f"models:/{model_name}/{version.version}")


def _tag_metrics(name: str, version: str, validation: Validation) -> None:
    c = client()
    for key, value in validation.metrics.items():
        c.set_model_version_tag(name, version, f"metric.{key}", f"{value:.6f}")


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

    return [f"{pkg}=={version(pkg)}" for pkg in ("torch", "torchvision", "pillow", "numpy", "pandas", "safetensors", "mlflow", "openvino")]


def _champion_version(name: str):
    """The version holding the champion alias, or None when there is none. Read from the
    model's alias table, so only "no such model" or "no such alias" means none: an error read
    as "no champion" would let any version be promoted."""
    c = client()
    model = unless_missing(c.get_registered_model, name)
    if model is None:
        return None
    version = (model.aliases or {}).get(CHAMPION)
    return None if version is None else c.get_model_version(name, str(version))


def _current_champion(current, version: str, ingest: IngestResult, metric: str, batch_size: int, num_workers: int) -> Champion | None:
    """What the gate compares against: the version ``current`` (holding the champion alias when
    read, or None), re-measured on the challenger's split."""
    if current is None:
        return None
    if str(current.version) == version:  # a retried gate: the challenger is already champion, nothing to measure
        return Champion(version=version, class_names=tuple(ingest.class_names))
    return _read_champion(current, ingest, metric, batch_size, num_workers)


def _read_champion(champion, ingest: IngestResult, metric: str, batch_size: int, num_workers: int) -> Champion:
    """Load the champion and re-measure ``metric`` on the challenger's validation split: scores
    recorded at its own training time came from another split and are not comparable. Not
    measured when its class list differs (it cannot be scored on the new labels)."""
    from cvlib.data.manifest import read_manifest
    from cvlib.training.checkpoint import load_package
    from cvlib.training.evaluate import evaluate_split
    from cvlib.training.metrics import classification_metrics

    local, _ = resolve_model(f"models:/{champion.name}/{champion.version}")
    model, meta = load_package(local)
    classes = tuple(meta["class_names"])
    if class_change(classes, ingest.class_names):
        return Champion(version=str(champion.version), class_names=classes)
    manifest = read_manifest(ingest.manifest_path)
    ev = evaluate_split(model, meta, ingest.data_dir, manifest, "val", batch_size=batch_size, num_workers=num_workers)
    report = classification_metrics(ev.targets, ev.probs, meta["class_names"], prefix="val_")
    scores = report["metrics"] | {"val_loss": ev.loss}
    return Champion(version=str(champion.version), class_names=classes, score=score_on(metric, scores))


GATE_LOCK_PREFIX = "visionflow-gate-"
GATE_LEASE_SECONDS = 120.0  # a crashed gate holds its model's lock this long at most (renewed while alive)
_GATE_ATTEMPTS = 3


@task(name="champion-gate", retries=3, retry_delay_seconds=[1, 5, 15], timeout_seconds=3600, persist_result=True)
def champion_gate(
    registered: RegisteredVersion, ingest: IngestResult, validation: Validation, gate: GateConfig,
    batch_size: int = 64, num_workers: int = 2,
) -> GateDecision:
    """Alias the new version ``challenger``; move ``champion`` only when :func:`cvlib.promotion.decide`
    says so. The decision and both scores become version tags and a Prefect artifact.

    Read, decide and write form one critical section per registered model (:func:`gate_lock`):
    two retrains finishing together are judged one after the other, the second against whatever
    the first left as champion, so a worse version that writes last cannot overwrite a better one.
    """
    name, version = registered.name, registered.version
    challenger_score(gate, validation.metrics)  # an unknown metric fails before the champion is scored
    with gate_lock(name):
        decision = _decide_locked(name, version, ingest, validation, gate, batch_size, num_workers)
    _gate_artifact(name, version, decision)
    run_logger().info("champion gate for %s v%s: %s", name, version, decision.reason)
    return decision


def gate_lock_name(model_name: str) -> str:
    """The Prefect global concurrency limit that serialises ``model_name``'s gate. Characters a
    Prefect name may not hold become '-', with a hash of the real name so two models never share it."""
    safe = "".join("-" if ch in "/%&<>" else ch for ch in model_name)
    if safe != model_name:
        safe += "-" + hashlib.sha256(model_name.encode()).hexdigest()[:8]
    return GATE_LOCK_PREFIX + safe


@contextmanager
def gate_lock(model_name: str, lease_seconds: float = GATE_LEASE_SECONDS) -> Iterator[None]:
    """Hold the model's gate lock: a Prefect global concurrency limit of one slot, created on
    first use. ``strict``: if the limit cannot be had (no Prefect API, limit deleted) the gate
    fails and its task retries, rather than running unlocked. The lease is renewed while the
    block runs (re-measuring a champion can take long) and expires if the process dies."""
    from prefect.concurrency.sync import concurrency

    lock = gate_lock_name(model_name)
    _ensure_gate_lock(lock)
    run_logger().info("waiting for the gate lock %r", lock)
    with concurrency(lock, occupy=1, strict=True, lease_duration=lease_seconds):
        yield


def _ensure_gate_lock(lock: str) -> None:
    """Create the one-slot limit if it does not exist (Prefect no longer creates limits on
    first acquisition); refuse one that would not exclude (another size, or disabled)."""
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as prefect_client:
        try:
            limit = prefect_client.read_global_concurrency_limit_by_name(lock)
        except ObjectNotFound:
            try:
                prefect_client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=lock, limit=1))
                return
            except ObjectAlreadyExists:  # another gate created it first
                limit = prefect_client.read_global_concurrency_limit_by_name(lock)
    if limit.limit != 1 or not limit.active:
        raise RuntimeError(
            f"Prefect concurrency limit {lock!r} locks the champion gate and must be an active limit of 1, "
            f"not {limit.limit} ({'active' if limit.active else 'disabled'}): delete it "
            f"(`prefect global-concurrency-limit delete {lock}`) and visionflow recreates it"
        )


def _decide_locked(
    name: str, version: str, ingest: IngestResult, validation: Validation, gate: GateConfig, batch_size: int, num_workers: int,
) -> GateDecision:
    """Read the champion, decide, write: call with the gate lock held.

    Before writing, the champion alias is read again (compare-and-set): if someone moved it
    outside the lock meanwhile (by hand in the UI, an older visionflow), the gate decides again
    against the new champion instead of overwriting it. Tags are written before the alias moves,
    so a crash in between leaves a decision a retry takes again, never an alias without tags.
    """
    c = client()
    for _ in range(_GATE_ATTEMPTS):
        seen = _champion_version(name)
        champion = _current_champion(seen, version, ingest, gate.metric, batch_size, num_workers)
        if champion is not None and champion.version == version:
            recorded = _recorded_decision(c.get_model_version(name, version).tags or {})
            if recorded is not None:  # a retried gate whose first attempt already promoted it
                return recorded
        decision = decide(gate, version, validation.metrics, ingest.class_names, champion)
        now = _champion_version(name)
        if _same_version(seen, now):
            break
        run_logger().warning(
            "champion of %s moved from v%s to v%s while the gate measured it (outside the gate lock): deciding again",
            name, getattr(seen, "version", None), getattr(now, "version", None),
        )
    else:
        raise RuntimeError(f"the champion alias of {name} kept moving while the gate ran; not promoting v{version}")
    for key, value in _gate_tags(decision).items():
        c.set_model_version_tag(name, version, key, value)
    c.set_registered_model_alias(name, CHALLENGER, version)
    if decision.promoted:
        c.set_registered_model_alias(name, CHAMPION, version)
    return decision


def _same_version(a, b) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and str(a.version) == str(b.version))


def _recorded_decision(tags: dict[str, str]) -> GateDecision | None:
    """The promotion a version's gate tags record, or None when they record none."""
    if tags.get("visionflow.gate.promoted") != "true":
        return None
    champion_score = tags.get("visionflow.gate.champion_score")
    return GateDecision(
        promoted=True,
        reason=tags["visionflow.gate.reason"],
        metric=tags["visionflow.gate.metric"],
        challenger_score=float(tags["visionflow.gate.challenger_score"]),
        champion_score=float(champion_score) if champion_score else None,
        champion_version=tags.get("visionflow.gate.champion_version") or None,
    )


def _gate_tags(decision: GateDecision) -> dict[str, str]:
    return {
        "visionflow.gate.promoted": str(decision.promoted).lower(),
        "visionflow.gate.reason": decision.reason,
        "visionflow.gate.metric": decision.metric,
        "visionflow.gate.challenger_score": f"{decision.challenger_score:.6f}",
        "visionflow.gate.champion_score": "" if decision.champion_score is None else f"{decision.champion_score:.6f}",
        "visionflow.gate.champion_version": decision.champion_version or "",
    }


def _gate_artifact(name: str, version: str, decision: GateDecision) -> None:
    """The decision on the Prefect flow run's page, where the person who started it looks."""
    from prefect.artifacts import create_markdown_artifact

    d = decision
    champion = "-" if d.champion_score is None else f"{d.champion_score:.4f} (v{d.champion_version})"
    create_markdown_artifact(
        key="promotion-decision",
        markdown=(
            f"# Champion gate: {name} v{version}\n\n| decision | metric | challenger | champion |\n|---|---|---|---|\n"
            f"| {'promoted to champion' if d.promoted else 'challenger only'} | {d.metric} | {d.challenger_score:.4f} | "
            f"{champion} |\n\n{d.reason}"
        ),
        description=f"Promotion decision for {name} v{version}",
    )


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


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` -> (NAME, ALIAS, None); ``models:/NAME/VERSION`` -> (NAME, None,
    VERSION). Anything else is a ValueError that says which two forms work."""
    ref = uri.removeprefix("models:/")
    name, has_alias, alias = ref.partition("@")
    version = None
    if not has_alias:
        name, _, version = ref.partition("/")
    if not uri.startswith("models:/") or not name or not (alias if has_alias else version):
        raise ValueError(f"model URI {uri!r} needs a version or an alias: models:/NAME/VERSION or models:/NAME@ALIAS")
    return name, alias if has_alias else None, version


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
    name, alias, version = parse_model_uri(uri)
    c = client()
    if alias is not None:
        version = str(c.get_model_version_by_alias(name, alias).version)
    else:
        c.get_model_version(name, version)  # a clear error now if it does not exist
    return _download(name, version), version
