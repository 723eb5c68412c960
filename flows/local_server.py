"""A Prefect server kept running under the visionflow home, so CLI commands start in seconds.

Prefect's ephemeral API starts a server for every process (about 15 s here, with a database
migration check each time). Instead, the first command starts ``prefect server start`` in the
background on a free loopback port, records it in ``$VISIONFLOW_HOME/prefect/server.json``, and
later commands reuse it: their flow runs are still recorded, and the UI shows them.

``PREFECT_API_URL`` set by the user always wins; ``VISIONFLOW_PREFECT=ephemeral`` keeps Prefect's
own ephemeral mode.

The server does not outlive its use forever: it runs under a small supervisor (this module's
``__main__``, the process group leader that ``visionflow server stop`` signals) which stops it
after ``VISIONFLOW_PREFECT_IDLE_MINUTES`` (default 60; 0 = never) without a visionflow command,
but never while a flow run is active and never once deployments are registered on it (a worker
may be polling it for scheduled runs). The next command starts a fresh one; the database, and so
the history of flow runs, stays under ``$VISIONFLOW_HOME/prefect``.
"""

from __future__ import annotations

import argparse
import atexit
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
IDLE_ENV = "VISIONFLOW_PREFECT_IDLE_MINUTES"
DEFAULT_IDLE_MINUTES = 60.0
ACTIVE_STATES = ["PENDING", "RUNNING", "CANCELLING", "PAUSED"]


def state_dir() -> Path:
    path = visionflow_home() / "prefect"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _state_file() -> Path:
    return state_dir() / "server.json"


def _last_used_file() -> Path:
    return state_dir() / "last-used"


def touch() -> None:
    """Record that a command uses the server now (its mtime is what the supervisor reads)."""
    _last_used_file().touch()  # creates it, or sets its mtime to now


def idle_seconds_allowed() -> float | None:
    """Seconds without use after which the server stops; None: never."""
    raw = os.environ.get(IDLE_ENV, "").strip()
    try:
        minutes = float(raw) if raw else DEFAULT_IDLE_MINUTES
    except ValueError:
        raise ValueError(f"{IDLE_ENV} must be a number of minutes (0 = never), not {raw!r}") from None
    return None if minutes <= 0 else minutes * 60.0


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
        idle = idle_seconds_allowed()  # a bad value fails here, not in the background
        env = dict(os.environ, PREFECT_HOME=str(home))
        env.pop("PREFECT_API_URL", None)
        env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        cmd = [sys.executable, "-m", "flows.local_server", "--port", str(port), "--idle", str(idle or 0)]
        log = home / "server.log"
        touch()
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
        touch()  # the start-up itself (~15 s) is not idle time
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
    touch()
    atexit.register(_touch_quietly)  # a long command counts as use until it ends
    os.environ["PREFECT_API_URL"] = info["api_url"]
    return info["api_url"]


def _touch_quietly() -> None:
    try:
        touch()
    except OSError:
        pass


# --------------------------------------------------------------------------------------------
# the supervisor: `python -m flows.local_server --port P --idle S`, started by start()
# --------------------------------------------------------------------------------------------


def _post_json(url: str, body: dict, timeout: float = 10.0) -> object:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def in_use(api_url: str) -> str | None:
    """Why the server must stay up even when no command touched it lately, or None.

    Asked of the server itself, so runs started by a worker or another client count too. An
    unanswered question counts as "in use": stopping a server that may be busy loses more than
    keeping an idle one a little longer."""
    try:
        active = _post_json(f"{api_url}/flow_runs/count", {"flow_runs": {"state": {"type": {"any_": ACTIVE_STATES}}}})
        if active:
            return f"{active} active flow run(s)"
        deployments = _post_json(f"{api_url}/deployments/count", {})
        if deployments:
            return f"{deployments} deployment(s) registered"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return f"the API did not answer ({exc})"
    return None


def _idle_for() -> float:
    try:
        return time.time() - _last_used_file().stat().st_mtime
    except OSError:
        return float("inf")


def server_env(port: int, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of ``prefect server start --port PORT``: its UI must call the API on that
    port. ``--port`` moves only the API; the UI's API URL (``server.ui.api_url``, served at
    ``/ui-settings``) otherwise stays at Prefect's default ``http://127.0.0.1:4200/api``, and
    every flow-run link would open a page that says "Can't connect to Server API". Any UI URL
    in the caller's environment is meant for some other server, so it is replaced."""
    env = dict(os.environ if environ is None else environ)
    env.pop("PREFECT_UI_API_URL", None)  # the older name of the same setting
    env["PREFECT_SERVER_UI_API_URL"] = f"http://{HOST}:{port}/api"
    return env


def supervise(port: int, idle: float | None, poll: float | None = None) -> int:
    """Run ``prefect server start`` as a child and stop it once idle (see the module docstring)."""
    api_url = f"http://{HOST}:{port}/api"
    prefect = Path(sys.executable).parent / "prefect"
    server = subprocess.Popen(
        [str(prefect), "server", "start", "--host", HOST, "--port", str(port)], env=server_env(port), stdin=subprocess.DEVNULL
    )

    def forward(signum: int, _frame: object) -> None:
        server.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    poll = poll if poll is not None else (30.0 if idle is None else min(30.0, max(1.0, idle / 4)))
    while server.poll() is None:
        try:
            server.wait(timeout=poll)  # returns at once when the server exits (stop, crash)
            break
        except subprocess.TimeoutExpired:
            pass
        if idle is None or _idle_for() < idle or not _healthy(api_url):
            continue
        reason = in_use(api_url)
        if reason is not None:
            print(f"local_server: idle for {_idle_for():.0f}s but kept: {reason}", flush=True)
            continue
        with _lock():
            if _idle_for() < idle:  # a command started meanwhile
                continue
            print(f"local_server: no use for {_idle_for():.0f}s (limit {idle:.0f}s); stopping", flush=True)
            try:
                if json.loads(_state_file().read_text()).get("pid") == os.getpid():
                    _state_file().unlink()
            except (OSError, ValueError):
                pass
            server.terminate()
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
            break
    return server.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="supervise the local Prefect server (started by visionflow)")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--idle", type=float, default=0.0, help="seconds without use before stopping; 0 = never")
    args = ap.parse_args(argv)
    return supervise(args.port, args.idle or None)


if __name__ == "__main__":
    raise SystemExit(main())
