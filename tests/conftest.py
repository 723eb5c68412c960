"""Session-wide test environment and real servers.

Everything a test writes goes under one temporary folder: the visionflow home (embedded MLflow
store, model cache), Prefect's home (its SQLite database) and the servers' stores. Telemetry is
off before Prefect or MLflow is imported anywhere.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

_SESSION_ROOT = Path(tempfile.mkdtemp(prefix="visionflow-tests-"))
os.environ["VISIONFLOW_HOME"] = str(_SESSION_ROOT / "home")
os.environ["PREFECT_HOME"] = str(_SESSION_ROOT / "prefect-home")
(_SESSION_ROOT / "prefect-home").mkdir(parents=True, exist_ok=True)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"
os.environ["MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"] = "false"
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("MLFLOW_REGISTRY_URI", None)
os.environ.pop("PREFECT_API_URL", None)

import prefect  # noqa: E402, F401
import pytest  # noqa: E402

from tests import servers  # noqa: E402

# ``import prefect`` (above, after the environment is set) binds Prefect's console log handler
# to the sys.stderr of that moment: here, pytest's session-long capture. Imported lazily
# inside a test that uses ``capsys`` instead, the handler would keep capsys's stream, which is
# closed after that test, and every later flow in the session would fail to log.

BIN = Path(sys.executable).parent


def _server_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def session_root() -> Path:
    return _SESSION_ROOT


@pytest.fixture(scope="session")
def digits_dir(session_root: Path) -> Path:
    """A small real data set: 12 handwritten digits per class, 32 px."""
    from cvlib.data.demo import write_digits

    out = session_root / "digits"
    write_digits(out, size=32, per_class=12)
    return out


def mlflow_command(root: Path, backend_uri: str, name: str, port: int) -> tuple[list[str], str]:
    """The `mlflow server` command line for a store and a port, and its URL."""
    artifacts = root / f"{name}-artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(BIN / "mlflow"), "server",
        "--backend-store-uri", backend_uri,
        "--artifacts-destination", str(artifacts),
        "--host", servers.LOOPBACK, "--port", str(port), "--workers", "1",
    ]
    return cmd, f"http://{servers.LOOPBACK}:{port}"


def _start_mlflow(root: Path, backend_uri: str, name: str):
    cmd, url = mlflow_command(root, backend_uri, name, servers.free_port())
    return servers.running(cmd, env=_server_env(), health_url=f"{url}/health", log=root / f"{name}.log"), url


@pytest.fixture(scope="session")
def mlflow_server_sqlite(session_root: Path):
    """A real `mlflow server` (SQLite backend, local artifacts) on a free loopback port."""
    ctx, url = _start_mlflow(session_root, f"sqlite:///{session_root / 'mlflow-server.db'}", "mlflow-sqlite")
    with ctx:
        yield url


@pytest.fixture(scope="session")
def mlflow_server(mlflow_server_sqlite: str) -> str:
    """The MLflow server of the end-to-end and multi-host tests: SQLite. The integration tests
    override this with the server of their backend (tests/integration/conftest.py)."""
    return mlflow_server_sqlite


# --------------------------------------------------------------------------- PostgreSQL
#
# PostgreSQL answers on 127.0.0.1:5432 on the development and CI machines. Every test that needs
# it carries the ``postgres`` marker (added at collection, see pytest_collection_modifyitems) and
# is skipped, saying why, only where nothing answers there.
#
# Isolation, and what it costs: a test that talks to a store itself gets its own database
# (``fresh_postgres_db``: CREATE DATABASE visionflow_test_<uuid>, dropped after the test, well
# under a second). A test that needs a *server* on PostgreSQL shares the session's server, each
# on its own database: starting an MLflow or Prefect server per test costs 10-15 s (much more on
# a busy machine), so those tests isolate themselves by unique experiment and model names instead,
# as they do on the SQLite servers.

POSTGRES_FIXTURES = {"postgres_url", "fresh_postgres_db", "mlflow_server_postgres", "prefect_server_postgres", "prefect_postgres_url"}


def _postgres_or_skip() -> None:
    if not servers.postgres_available():
        pytest.skip("PostgreSQL does not answer on 127.0.0.1:5432")


@pytest.fixture(scope="session")
def postgres_url():
    """A database of the session, for the session's MLflow server on PostgreSQL."""
    _postgres_or_skip()
    url = servers.create_postgres_database("visionflow_test")
    yield url
    servers.drop_postgres_database(url)


@pytest.fixture(scope="session")
def prefect_postgres_url():
    """Another database of the session, for the Prefect server: MLflow and Prefect both keep
    their schema version in an ``alembic_version`` table, so they cannot share one."""
    _postgres_or_skip()
    url = servers.create_postgres_database("visionflow_test")
    yield url
    servers.drop_postgres_database(url)


@pytest.fixture
def fresh_postgres_db():
    """A new, empty database for one test (``visionflow_test_<uuid>``), dropped afterwards even
    when the test fails; yields its SQLAlchemy URL (psycopg2 driver)."""
    _postgres_or_skip()
    url = servers.create_postgres_database("visionflow_test")
    try:
        yield url
    finally:
        servers.drop_postgres_database(url)


def pytest_collection_modifyitems(config, items) -> None:
    """Mark every test that needs PostgreSQL ``postgres``: those using a PostgreSQL fixture, and
    the PostgreSQL half of tests parametrized over the backends. The PostgreSQL half of a
    ``store_agnostic`` test (scoring rows, reports, serving: the servers only record its runs) is
    deselected: running it again on another database would test nothing new and cost minutes."""
    kept, dropped = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("backend") == "postgres" and item.get_closest_marker("store_agnostic"):
            dropped.append(item)
            continue
        if POSTGRES_FIXTURES & set(getattr(item, "fixturenames", ())) or params.get("backend") == "postgres":
            item.add_marker(pytest.mark.postgres)
        kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture(scope="session")
def mlflow_server_postgres(session_root: Path, postgres_url: str):
    """A real `mlflow server` whose tracking and registry store is PostgreSQL."""
    ctx, url = _start_mlflow(session_root, postgres_url, "mlflow-postgres")
    with ctx:
        yield url


def prefect_command(root: Path, name: str, port: int, **extra_env: str) -> tuple[list[str], dict[str, str], str]:
    """The `prefect server start` command line, environment and API URL for a home and a port
    (its SQLite database lives in the home unless ``extra_env`` names another)."""
    home = root / f"{name}-home"
    home.mkdir(parents=True, exist_ok=True)
    env = _server_env(PREFECT_HOME=str(home), PREFECT_UI_ENABLED="false", **extra_env)
    env.pop("PREFECT_API_URL", None)
    cmd = [str(BIN / "prefect"), "server", "start", "--host", servers.LOOPBACK, "--port", str(port)]
    return cmd, env, f"http://{servers.LOOPBACK}:{port}/api"


def _start_prefect(root: Path, name: str, **extra_env: str):
    cmd, env, url = prefect_command(root, name, servers.free_port(), **extra_env)
    return servers.running(cmd, env=env, health_url=f"{url}/health", log=root / f"{name}.log"), url


@pytest.fixture(scope="session")
def prefect_server_sqlite(session_root: Path):
    """A real `prefect server start` (SQLite) on a free loopback port; yields its API URL."""
    ctx, url = _start_prefect(session_root, "prefect-sqlite")
    with ctx:
        yield url
        flush_prefect_workers()


@pytest.fixture(scope="session")
def prefect_server(prefect_server_sqlite: str) -> str:
    """The Prefect server of the end-to-end and multi-host tests: SQLite (overridden per backend
    in the integration tests, as ``mlflow_server`` is)."""
    return prefect_server_sqlite


@pytest.fixture(scope="session")
def prefect_server_postgres(session_root: Path, prefect_postgres_url: str):
    """A real `prefect server start` on PostgreSQL (asyncpg, the driver Prefect's server uses)."""
    ctx, url = _start_prefect(
        session_root, "prefect-postgres",
        **prefect_database_env(prefect_postgres_url),
    )
    with ctx:
        yield url
        flush_prefect_workers()


# The integration suite runs on both backends: tests/integration/conftest.py makes its
# ``mlflow_server`` and ``prefect_server`` these, so every integration test that talks to a server
# runs twice, on one session server of each kind per backend (started only when a test of that
# backend runs; pytest groups the tests by the session-scoped parameter, so each starts once).
BACKENDS = ("sqlite", "postgres")


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def mlflow_server_on(backend: str, request) -> str:
    """The session's MLflow server on ``backend`` (SQLite or PostgreSQL)."""
    return request.getfixturevalue("mlflow_server_sqlite" if backend == "sqlite" else "mlflow_server_postgres")


@pytest.fixture(scope="session")
def prefect_server_on(backend: str, request) -> str:
    """The session's Prefect server on ``backend`` (SQLite or PostgreSQL)."""
    return request.getfixturevalue("prefect_server_sqlite" if backend == "sqlite" else "prefect_server_postgres")


@pytest.fixture
def fresh_store_url(backend: str, tmp_path: Path, request) -> str:
    """A store of this test alone on ``backend``, for a server the test starts itself (to kill
    and restart it): a new SQLite file, or a new PostgreSQL database dropped after the test."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("fresh_postgres_db")


def prefect_database_env(store_url: str) -> dict[str, str]:
    """The environment that puts a Prefect server on ``store_url`` (a SQLAlchemy URL as the
    PostgreSQL fixtures and ``fresh_store_url`` give): Prefect's server speaks aiosqlite and asyncpg."""
    async_url = store_url.replace("sqlite:///", "sqlite+aiosqlite:///").replace("postgresql+psycopg2://", "postgresql+asyncpg://")
    return {"PREFECT_API_DATABASE_CONNECTION_URL": async_url}


def flush_prefect_workers() -> None:
    """Deliver and stop this process's Prefect event and log workers before it talks to another
    server. Prefect keeps one events worker per process, bound to the API URL of the moment it
    started (its key does not hold the URL), and the server records task runs from those events:
    after a switch of ``PREFECT_API_URL`` in the same process, the new server's flow runs would
    get their task runs on the old server. The next event starts a worker for the current URL.
    Also called before a session server stops: logs are sent in batches every few seconds, and
    the last test's would otherwise fail with "Error logging to API"."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    EventsWorker.drain_all(timeout=10)
    APILogWorker.drain_all(timeout=5)


def mlflow_client(uri: str):
    """A client bound to one server for tracking *and* registry: MlflowClient(tracking_uri=X)
    alone would still use a registry URI another test set globally."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.fixture
def use_mlflow(monkeypatch):
    """Point this process at one MLflow server for one test: the environment variable and
    MLflow's process-wide tracking and registry URIs, all restored afterwards."""
    def _use(uri: str) -> None:
        import mlflow

        # Recorded by monkeypatch first: MLflow's setters export both variables themselves.
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)

    yield _use
    reset_mlflow_globals()


def reset_mlflow_globals() -> None:
    """Forget process-wide MLflow URIs (MLflow has no public way to unset the registry's)."""
    import sys

    if "mlflow" not in sys.modules:
        return
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils

    mlflow.set_tracking_uri(None)
    registry_utils._registry_uri = None


@pytest.fixture
def use_prefect(monkeypatch):
    """Point this process (and its children) at a given Prefect API for one test."""
    from contextlib import ExitStack

    from prefect.settings import PREFECT_API_URL, temporary_settings

    stack = ExitStack()

    def _use(url: str) -> None:
        flush_prefect_workers()  # events of earlier flows go to their server, this test's to ``url``
        monkeypatch.setenv("PREFECT_API_URL", url)
        stack.enter_context(temporary_settings(updates={PREFECT_API_URL: url}))

    yield _use
    flush_prefect_workers()
    stack.close()
