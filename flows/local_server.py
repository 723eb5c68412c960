"""A Prefect server kept running under the visionflow home, so CLI commands start in seconds.

Prefect's ephemeral API starts a server for every process (about 15 s here, with a database
migration check each time). Instead, the first command starts ``prefect server start`` in the
background on a free loopback port, records it in ``$VISIONFLOW_HOME/prefect/server.json``, and
later commands reuse it: their flow runs are still recorded, and the UI shows them.

``PREFECT_API_URL`` set by the user always wins; ``VISIONFLOW_PREFECT=ephemeral`` keeps Prefect's
own ephemeral mode.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from tasks.environment import visionflow_home

HOST = "127.0.0.1"  # loopback only: the server has no authentication
START_TIMEOUT_S = 180


def state_dir() -> Path:
    path = visionflow_home() / "prefect"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _state_file() -> Path:
    return state_dir() / "server.json"


def _healthy(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@contextmanager
def _lock():
    """Two commands started together must not start two servers."""
    with open(state_dir() / "server.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def status() -> dict | None:
    """The recorded server if it answers, else None."""
    try:
        info = json.loads(_state_file().read_text())
    except (OSError, ValueError):
        return None
    return info if _healthy(info.get("api_url", "")) else None


def start() -> dict:
    """Return the running server, starting one if needed (idempotent)."""
    with _lock():
        info = status()
        if info is not None:
            return info
        port = _free_port()
        api_url = f"http://{HOST}:{port}/api"
        home = state_dir()
        env = dict(os.environ, PREFECT_HOME=str(home))
        env.pop("PREFECT_API_URL", None)
        env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        prefect = Path(sys.executable).parent / "prefect"
        cmd = [str(prefect), "server", "start", "--host", HOST, "--port", str(port)]
        log = home / "server.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _healthy(api_url):
            if proc.poll() is not None:
                raise RuntimeError(f"the Prefect server exited with code {proc.returncode}; see {log}")
            if time.monotonic() > deadline:
                _kill(proc.pid)
                raise RuntimeError(f"the Prefect server did not answer within {START_TIMEOUT_S}s; see {log}")
            time.sleep(0.3)
        info = {"pid": proc.pid, "api_url": api_url, "ui_url": f"http://{HOST}:{port}", "log": str(log), "prefect_home": str(home)}
        _state_file().write_text(json.dumps(info, indent=2))
        return info


def stop() -> bool:
    """Stop the recorded server; True when one was running."""
    with _lock():
        try:
            info = json.loads(_state_file().read_text())
        except (OSError, ValueError):
            return False
        _state_file().unlink(missing_ok=True)
        return _kill(int(info["pid"]))


def _kill(pid: int, grace: float = 15) -> bool:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return True


def configure_api() -> str:
    """Decide which Prefect API this process uses, before Prefect reads its settings."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    if os.environ.get("VISIONFLOW_PREFECT", "local").lower() == "ephemeral":
        return "ephemeral"
    info = start()
    os.environ["PREFECT_API_URL"] = info["api_url"]
    return info["api_url"]
