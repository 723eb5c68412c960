"""Starting real servers for tests: loopback only, free ports, logs kept for failures."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

BIN = Path(sys.executable).parent
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError) as exc:
            last = exc
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout}s ({last}):\n{_tail(log)}")


def _tail(log: Path | None, n: int = 4000) -> str:
    if log is None or not log.exists():
        return ""
    return log.read_text(errors="replace")[-n:]


@contextmanager
def running(cmd: list[str], *, env: dict[str, str], health_url: str, log: Path, timeout: float = 180):
    """Run a server in its own process group; stop the whole group afterwards."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(health_url, timeout, proc, log)
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen, grace: float = 15) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)


def postgres_available(host: str = LOOPBACK, port: int = 5432) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def create_postgres_database(prefix: str) -> str:
    """A fresh database on the local PostgreSQL (trust auth); returns its SQLAlchemy URL."""
    import psycopg2

    name = f"{prefix}_{uuid.uuid4().hex}"
    conn = psycopg2.connect(host=LOOPBACK, port=5432, user="postgres", dbname="postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    return f"postgresql+psycopg2://postgres@{LOOPBACK}:5432/{name}"


def drop_postgres_database(url: str) -> None:
    import psycopg2

    name = url.rsplit("/", 1)[1]
    conn = psycopg2.connect(host=LOOPBACK, port=5432, user="postgres", dbname="postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    conn.close()


class Restartable:
    """A server a test stops and starts again: same command, so the same port and store.

    Used as a context manager (started on entry, stopped on exit even when the test fails);
    the log file is appended to across restarts.
    """

    def __init__(self, cmd: list[str], *, env: dict[str, str], health_url: str, log: Path, timeout: float = 180) -> None:
        self.cmd, self.env, self.health_url, self.log, self.timeout = cmd, env, health_url, log, timeout
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_http(self.health_url, self.timeout, self.proc, self.log)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)

    def kill(self) -> None:
        """SIGKILL the whole process group: the server vanishes without a goodbye."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def __enter__(self) -> Restartable:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
