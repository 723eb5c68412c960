"""The local Prefect server the CLI keeps running: it stops itself once nobody uses it, but not
while a flow run is active. A real `prefect server start` under a supervisor, a fresh home, and
an idle limit of seconds instead of an hour."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str, env: dict[str, str], timeout: float = 240) -> str:
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _post(url: str, body: dict, attempts: int = 10) -> object:
    """POST, retrying 503 as Prefect's own client does: a freshly started server on SQLite
    answers 503 while its background services hold the database."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"})
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            if exc.code != 503 or attempt == attempts - 1:
                raise
            time.sleep(1)
    raise AssertionError("unreachable")


def _healthy(api: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api}/health", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    # 12 s: long enough to create a flow run after start-up on a busy machine, short for a test.
    env.update(VISIONFLOW_HOME=str(tmp_path / "home"), VISIONFLOW_PREFECT_IDLE_MINUTES="0.2",
               PREFECT_UI_API_URL="http://127.0.0.1:4200/api")  # meant for another server
    yield env
    _python("from flows import local_server; local_server.stop()", env, timeout=60)


def test_idle_server_stops_itself_but_not_while_a_flow_run_is_active(env, tmp_path):
    info = json.loads(_python("import json; from flows import local_server; print(json.dumps(local_server.start()))", env))
    api, pid = info["api_url"], int(info["pid"])
    assert api.startswith("http://127.0.0.1:") and _healthy(api)
    # The UI calls this server's API, not Prefect's default port (nor the PREFECT_UI_API_URL set below).
    with urllib.request.urlopen(f"{info['ui_url']}/ui-settings", timeout=10) as resp:
        assert json.loads(resp.read())["api_url"] == api

    flow = _post(f"{api}/flows/", {"name": "idle-check"})
    run = _post(f"{api}/flow_runs/", {"flow_id": flow["id"], "state": {"type": "RUNNING", "name": "Running"}})
    time.sleep(20)  # well past the 12 s limit, several supervisor polls
    assert _healthy(api), "the server stopped while a flow run was running"
    log = Path(info["log"]).read_text()
    assert "kept: 1 active flow run(s)" in log, log[-2000:]

    _post(f"{api}/flow_runs/{run['id']}/set_state", {"state": {"type": "COMPLETED", "name": "Completed"}, "force": True})
    deadline = time.monotonic() + 90
    while (_healthy(api) or _alive(pid)) and time.monotonic() < deadline:
        time.sleep(1)
    assert not _healthy(api) and not _alive(pid), "the idle server (and its supervisor) did not stop"
    assert "stopping" in Path(info["log"]).read_text()
    assert not (tmp_path / "home" / "prefect" / "server.json").exists()


def test_a_bad_idle_setting_fails_before_anything_starts(env):
    env = dict(env, VISIONFLOW_PREFECT_IDLE_MINUTES="an hour")
    proc = subprocess.run([sys.executable, "-c", "from flows import local_server; local_server.start()"], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "VISIONFLOW_PREFECT_IDLE_MINUTES must be a number of minutes" in proc.stderr
