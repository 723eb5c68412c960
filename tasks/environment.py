"""Where things go, and the process-wide defaults the CLI sets before anything else runs.

Environment variables win (``VISIONFLOW_HOME``, ``MLFLOW_TRACKING_URI``); otherwise the MLflow
store is embedded under the visionflow home: an SQLite database with a local artifact folder.
Which Prefect API a command uses (``PREFECT_API_URL``, else a local server the CLI starts) is
decided in ``flows/local_server.py``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TextIO

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


def _is_terminal(stream: object) -> bool:
    try:
        return bool(stream.isatty())  # type: ignore[attr-defined]
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def quiet_defaults(stream: TextIO | None = None) -> None:
    """Keep telemetry off, never wait on the network, and keep logs readable (each set only
    where the user has not).

    ``stream`` is where progress bars would be drawn (tqdm's default, ``sys.stderr``). When it
    is not a terminal (a log file, a pipe, CI), MLflow's artifact bars ("Downloading
    artifacts") are switched off: there every redraw would be one more line. visionflow's own
    bars use ``tqdm(disable=None)``, which makes the same decision."""
    if not _is_terminal(sys.stderr if stream is None else stream):
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    # The ephemeral API migrates its database on first start; on a busy 2-core machine that
    # can take longer than Prefect's default 20 s.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    if os.environ.get("PREFECT_HOME"):  # Prefect's SQLite store fails obscurely in a missing folder
        Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
