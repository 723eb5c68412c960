"""Output a person reads in a log: when stderr is not a terminal (``make demo > demo.log 2>&1``,
CI), no progress bar is written into it redraw by redraw. MLflow's artifact bars are switched off
by ``tasks.environment.quiet_defaults`` (which the CLI calls first); visionflow's own bars use
``tqdm(disable=None)``."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.environment import quiet_defaults

ROOT = Path(__file__).resolve().parents[2]
SWITCH = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def clean_env(monkeypatch):
    """quiet_defaults writes os.environ; monkeypatch puts every variable it may set back."""
    for name in (SWITCH, "PREFECT_SERVER_ANALYTICS_ENABLED", "DO_NOT_TRACK", "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING",
                 "GIT_PYTHON_REFRESH", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_mlflow_bars_are_off_without_a_terminal_and_on_with_one(clean_env):
    quiet_defaults(io.StringIO())
    assert os.environ[SWITCH] == "false"
    clean_env.delenv(SWITCH)
    quiet_defaults(FakeTerminal())
    assert SWITCH not in os.environ  # MLflow's default: bars on a terminal
    clean_env.setattr(sys, "stderr", io.StringIO())
    quiet_defaults()  # the default stream is stderr, where tqdm draws
    assert os.environ[SWITCH] == "false"


def test_a_users_choice_of_mlflow_bars_wins(clean_env):
    clean_env.setenv(SWITCH, "true")
    quiet_defaults(io.StringIO())
    assert os.environ[SWITCH] == "true"


def _download(tmp_path: Path, quiet: bool) -> subprocess.CompletedProcess:
    """MLflow's artifact download (what loading a registered model does) in a process whose stderr
    is a pipe, as under `make demo > log 2>&1`."""
    src = tmp_path / "artifacts"
    src.mkdir(exist_ok=True)
    for i in range(5):
        (src / f"part-{i}.bin").write_bytes(os.urandom(1024))
    dst = tmp_path / ("quiet" if quiet else "default")
    dst.mkdir()
    code = (
        "import sys, pathlib\n"
        "if sys.argv[1] == 'quiet':\n"
        "    from tasks.environment import quiet_defaults; quiet_defaults()\n"
        "import mlflow.artifacts\n"
        "mlflow.artifacts.download_artifacts(artifact_uri=pathlib.Path(sys.argv[2]).as_uri(), dst_path=sys.argv[3])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != SWITCH}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", code, "quiet" if quiet else "default", str(src), str(dst)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (dst / "artifacts").iterdir()) == [f"part-{i}.bin" for i in range(5)]
    return proc


def test_mlflow_download_writes_no_bar_into_a_log(tmp_path):
    # Without quiet_defaults MLflow draws its bar into the pipe (so the check below can fail)...
    assert "Downloading artifacts" in _download(tmp_path, quiet=False).stderr
    # ...with it, nothing.
    assert "Downloading artifacts" not in _download(tmp_path, quiet=True).stderr


def test_the_scoring_bar_is_off_without_a_terminal(monkeypatch):
    from flows.score import _progress_bar

    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    bar = _progress_bar(10, 0)
    assert bar.disable  # asked before close(), which disables every bar
    bar.update(10)
    bar.close()
    assert log.getvalue() == ""
    term = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", term)
    bar = _progress_bar(10, 0)
    assert not bar.disable
    bar.update(10)
    bar.close()
    assert "10/10" in term.getvalue()
