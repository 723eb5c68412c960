"""The registry under concurrency and lost answers, on the real MLflow and Prefect servers.

- Two gates for one model at once: the champion gate is a critical section per registered
  model (a Prefect global concurrency limit), so a worse version that reaches the gate last is
  judged against the better one instead of overwriting it. A companion test removes the lock
  and shows the same interleaving crowning the worse version: the harness really races.
- A registration whose answer was lost after the server created the version, followed by a
  lookup that fails: the task's retries end with exactly one version for the run.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
import uuid
from dataclasses import asdict

import pytest

from tests.conftest import mlflow_client
from tests.integration.support import small_config
from tests.threads import one_torch_thread

pytestmark = pytest.mark.slow
_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)

# How long the first gate waits, after reading the champion and once the second gate has reached
# the lock, for the second one to read the champion too. Under the lock it cannot, so each locked
# run pays this once.
PAUSE_SECONDS = 4.0


@pytest.fixture(scope="module")
def two_models(digits_dir, tmp_path_factory):
    """Two real SimpleCNN trainings on the digits, one clearly better on the validation split
    than the other, with their real validation metrics and the ingest record the gate needs."""
    from cvlib.data.ingest import build_manifest
    from cvlib.data.manifest import write_manifest
    from cvlib.data.options import AugmentConfig, DataConfig
    from cvlib.training.checkpoint import model_from_checkpoint
    from cvlib.training.fit import fit
    from cvlib.training.options import TrainConfig
    from cvlib.training.validation import validate_model
    from tasks.records import IngestResult, Validation

    out = tmp_path_factory.mktemp("gate-models")
    manifest, _ = build_manifest(digits_dir, DataConfig(), workers=2)
    manifest_path = write_manifest(manifest, out / "manifest.parquet")
    classes = [str(d) for d in range(10)]
    models = {}
    for kind, epochs, lr in (("worse", 1, 1e-5), ("better", 6, 1e-2)):
        train = TrainConfig(arch="simple_cnn", weights="none", epochs=epochs, lr=lr, warmup_epochs=0, batch_size=16,
                            num_workers=0, progress=False)
        result = fit(data_root=digits_dir, manifest=manifest, class_names=classes, train=train,
                     augment=AugmentConfig(image_size=32, resize_ratio=1.0, hflip=0.0), out_dir=out / kind)
        model, meta = model_from_checkpoint(result.best_checkpoint)
        report = validate_model(model, meta, digits_dir, manifest, [asdict(h) for h in result.history], out / f"{kind}-val",
                                batch_size=64, num_workers=0)
        models[kind] = (result.best_checkpoint, Validation(metrics=report.metrics, n=report.n))
    assert models["better"][1].metrics["val_top1"] > models["worse"][1].metrics["val_top1"], "the set-up needs two different models"
    ingest = IngestResult(data_dir=str(digits_dir), manifest_path=str(manifest_path), dataset_hash="h", class_names=classes, summary={})
    return {"ingest": ingest, **models}


def _register(two_models, name: str, kind: str):
    from tasks.registry import register_model, start_run

    checkpoint, validation = two_models[kind]
    run_id = start_run.fn(small_config(name, arch="simple_cnn"), two_models["ingest"])
    return register_model.fn(run_id, checkpoint, name, validation)


def _race(two_models, monkeypatch, name: str):
    """Gate ``better`` and ``worse`` in two threads, forcing the interleaving that breaks an
    unlocked gate: the better gate reads the champion and pauses; only then does the worse one
    reach the gate; it reads the champion (if it can) and writes after the better one has."""
    from cvlib.promotion import GateConfig
    from tasks import registry

    better, worse = _register(two_models, name, "better"), _register(two_models, name, "worse")
    read = {better.version: threading.Event(), worse.version: threading.Event()}
    worse_at_lock, better_done = threading.Event(), threading.Event()
    real_champion, real_lock = registry._current_champion, registry.gate_lock

    def paced(current, version, *args):
        champion = real_champion(current, version, *args)
        read[version].set()
        if version == better.version:
            # Give the worse gate, once at the lock, time to read the same champion: it can
            # unless the lock keeps it out.
            worse_at_lock.wait(120)
            read[worse.version].wait(PAUSE_SECONDS)
        else:
            better_done.wait(120)  # and write last (under the lock the better gate is long done)
        return champion

    def announced(model_name: str):
        if read[better.version].is_set():
            worse_at_lock.set()
        return real_lock(model_name)

    decisions, errors = {}, []

    def gate(registered, done: threading.Event | None) -> None:
        try:
            kind = "better" if registered is better else "worse"
            decisions[kind] = registry.champion_gate.fn(registered, two_models["ingest"], two_models[kind][1], GateConfig())
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
        finally:
            if done is not None:
                done.set()

    # Each thread runs in a copy of this context: Prefect's settings (the test server's URL) live in contextvars.
    with monkeypatch.context() as patch:  # undone here, leaving the test's other patches (the servers' URLs) alone
        patch.setattr(registry, "_current_champion", paced)
        patch.setattr(registry, "gate_lock", announced)
        first = threading.Thread(target=contextvars.copy_context().run, args=(gate, better, better_done))
        first.start()
        while first.is_alive() and not read[better.version].wait(1):
            pass
        assert read[better.version].is_set(), f"the better gate never read the champion: {errors}"
        second = threading.Thread(target=contextvars.copy_context().run, args=(gate, worse, None))
        second.start()
        for t in (first, second):
            t.join(300)
    assert not errors, errors
    return better, worse, decisions


def test_two_gates_at_once_leave_the_better_version_champion(two_models, on_servers, monkeypatch):
    """The worse version reaches the gate last while the better one is being judged: it waits
    for the gate lock, is compared against the better version (re-measured), and stays
    challenger. Each version's tags say what it was compared against and what was decided."""
    from prefect import get_client

    from cvlib.promotion import GateConfig
    from tasks.registry import champion_gate, gate_lock_name

    name = f"race-{uuid.uuid4().hex[:8]}"
    better, worse, decisions = _race(two_models, monkeypatch, name)
    client = mlflow_client(os.environ["MLFLOW_TRACKING_URI"])
    assert client.get_model_version_by_alias(name, "champion").version == better.version
    assert client.get_model_version_by_alias(name, "challenger").version == worse.version, "the last version judged"

    s_better, s_worse = (two_models[k][1].metrics["val_top1"] for k in ("better", "worse"))
    tags = client.get_model_version(name, better.version).tags
    assert decisions["better"].promoted and decisions["better"].champion_version is None
    assert tags["visionflow.gate.promoted"] == "true" and tags["visionflow.gate.champion_version"] == ""
    assert tags["visionflow.gate.reason"] == "no champion yet: the first version becomes champion"
    assert float(tags["visionflow.gate.challenger_score"]) == pytest.approx(s_better, abs=1e-6)

    tags = client.get_model_version(name, worse.version).tags
    assert not decisions["worse"].promoted and decisions["worse"].champion_version == better.version
    assert tags["visionflow.gate.promoted"] == "false"
    assert tags["visionflow.gate.champion_version"] == better.version, "compared against the version the first gate crowned"
    assert float(tags["visionflow.gate.champion_score"]) == pytest.approx(s_better, abs=1e-6), "the champion re-measured"
    assert float(tags["visionflow.gate.challenger_score"]) == pytest.approx(s_worse, abs=1e-6)
    assert tags["visionflow.gate.reason"].endswith("champion stays")

    with get_client(sync_client=True) as prefect_client:  # the lock exists, holds one slot, and was released
        limit = prefect_client.read_global_concurrency_limit_by_name(gate_lock_name(name))
    assert (limit.limit, limit.active_slots) == (1, 0)

    # A retried gate of the champion returns the decision it recorded, and its tags keep the truth.
    again = champion_gate.fn(better, two_models["ingest"], two_models["better"][1], GateConfig())
    first = decisions["better"]
    assert (again.promoted, again.reason, again.champion_version) == (first.promoted, first.reason, first.champion_version)
    assert again.challenger_score == pytest.approx(first.challenger_score, abs=1e-6)
    assert client.get_model_version(name, better.version).tags["visionflow.gate.reason"] == "no champion yet: the first version becomes champion"


@pytest.mark.parametrize("recheck", [False, True], ids=["main-s-gate", "recheck-only"])
def test_without_the_lock_the_same_race(two_models, on_servers, monkeypatch, recheck):
    """The harness is a real race. With the lock and the re-read of the champion before writing
    both taken away (the gate main had), the same interleaving lets the worse version, written
    last, replace the better one, its tags claiming there was no champion. With only the re-read
    left, the worse gate sees the champion move and decides again (the second line of defence
    for a champion moved outside the lock, e.g. by hand)."""
    from tasks import registry

    monkeypatch.setattr(registry, "gate_lock", lambda name: contextlib.nullcontext())
    if not recheck:
        monkeypatch.setattr(registry, "_same_version", lambda seen, now: True)
    name = f"unlocked-{uuid.uuid4().hex[:8]}"
    better, worse, decisions = _race(two_models, monkeypatch, name)
    client = mlflow_client(os.environ["MLFLOW_TRACKING_URI"])
    champion = client.get_model_version_by_alias(name, "champion").version
    worse_tags = client.get_model_version(name, worse.version).tags
    if recheck:
        assert champion == better.version and not decisions["worse"].promoted
        assert worse_tags["visionflow.gate.champion_version"] == better.version
    else:
        assert decisions["better"].promoted and decisions["worse"].promoted
        assert champion == worse.version, "the worse version, written last, took the champion alias"
        assert worse_tags["visionflow.gate.champion_version"] == ""


def test_a_gate_lock_that_would_not_exclude_is_refused(on_servers):
    """An existing limit of another size (or disabled) would let two gates in: refused with a
    message naming the limit, not used."""
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    from tasks.registry import gate_lock, gate_lock_name

    name = f"wide/{uuid.uuid4().hex[:8]}"  # a character Prefect names may not hold
    lock = gate_lock_name(name)
    assert "/" not in lock and lock.startswith("visionflow-gate-wide-")
    with get_client(sync_client=True) as prefect_client:
        prefect_client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=lock, limit=2))
    with pytest.raises(RuntimeError, match=f"{lock}.*must be an active limit of 1"):
        with gate_lock(name):
            pass


def test_a_lost_registration_answer_and_a_failing_lookup_leave_one_version(two_models, on_servers, monkeypatch):
    """The server creates the version but the answer is lost; the retry's lookup then fails
    once. The lookup error reaches the task's retry instead of reading as "not registered", and
    the next attempt finds the version: exactly one version for the run."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE
    from mlflow.store.model_registry.rest_store import RestStore
    from prefect import flow

    from tasks import registry
    from tasks.registry import register_model, start_run

    name = f"lost-{uuid.uuid4().hex[:8]}"
    checkpoint, validation = two_models["better"]
    run_id = start_run.fn(small_config(name, arch="simple_cnn"), two_models["ingest"])
    seen = {"created": 0, "lookups": 0, "lookup_failed": False}
    real_create, real_search = RestStore.create_model_version, RestStore.search_model_versions

    def create_then_lose_the_answer(self, *args, **kwargs):
        real_create(self, *args, **kwargs)
        seen["created"] += 1
        raise MlflowException("connection reset while reading the response", error_code=TEMPORARILY_UNAVAILABLE)

    def search_fails_once_after_the_create(self, *args, **kwargs):
        seen["lookups"] += 1
        if seen["created"] and not seen["lookup_failed"]:
            seen["lookup_failed"] = True
            raise MlflowException("503 Service Unavailable", error_code=TEMPORARILY_UNAVAILABLE)
        return real_search(self, *args, **kwargs)

    @flow(name="register-with-lost-answer")
    def register_once():
        return register_model.with_options(retry_delay_seconds=0)(run_id, checkpoint, name, validation)

    with monkeypatch.context() as patch:
        patch.setattr(RestStore, "create_model_version", create_then_lose_the_answer)
        patch.setattr(RestStore, "search_model_versions", search_fails_once_after_the_create)
        registered = register_once()
    versions = mlflow_client(os.environ["MLFLOW_TRACKING_URI"]).search_model_versions(f"name = '{name}'")
    assert seen["created"] == 1 and seen["lookup_failed"] and seen["lookups"] == 3, seen
    assert [v.version for v in versions] == [registered.version], "exactly one version for the run"
    tags = versions[0].tags
    assert tags[registry.RUN_TAG] == run_id
    assert float(tags["metric.val_top1"]) == pytest.approx(validation.metrics["val_top1"], abs=1e-6), "tagged by the attempt that found it"
