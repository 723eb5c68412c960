"""Where things go: the visionflow home, the MLflow stores and Prefect's API.

Environment variables win (``VISIONFLOW_HOME``, ``MLFLOW_TRACKING_URI``, ``PREFECT_API_URL``);
otherwise everything is embedded under the visionflow home: an SQLite MLflow store with a local
artifact folder, and Prefect's ephemeral API.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_HOME = "~/.visionflow"


def visionflow_home() -> Path:
    home = Path(os.environ.get("VISIONFLOW_HOME", DEFAULT_HOME)).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def embedded_mlflow_uri() -> str:
    return f"sqlite:///{visionflow_home() / 'mlflow.db'}"


def mlflow_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or embedded_mlflow_uri()


def is_embedded_mlflow() -> bool:
    # Compared by value: mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI itself, so the
    # variable being set does not mean the user chose a server.
    return mlflow_tracking_uri() == embedded_mlflow_uri()


def mlflow_artifact_root() -> str | None:
    """Artifact root for new experiments: a folder under the home for the embedded store;
    None (the server's default) when a tracking server is configured."""
    if not is_embedded_mlflow():
        return None
    path = visionflow_home() / "mlartifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path.as_uri()


def runs_dir() -> Path:
    path = visionflow_home() / "runs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def prefect_api_description() -> str:
    return os.environ.get("PREFECT_API_URL") or "Prefect ephemeral API (embedded)"


def quiet_defaults() -> None:
    """Keep telemetry off and never wait on the network (set only where the user has not)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    # The ephemeral API migrates its database on first start; on a busy 2-core machine that
    # can take longer than Prefect's default 20 s.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    if os.environ.get("PREFECT_HOME"):  # Prefect's SQLite store fails obscurely in a missing folder
        Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
