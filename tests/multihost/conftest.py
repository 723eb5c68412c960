"""Fixtures for the multi-host tests: three hosts (network namespaces, see :mod:`tests.netns`),
servers started on host A's address, and helpers to run visionflow, Dask and torchrun there.

Each host runs its processes with this worktree on ``PYTHONPATH`` and the virtualenv's ``bin`` on
``PATH``, its own ``VISIONFLOW_HOME`` and ``PREFECT_HOME``, and one thread per process. Ports are
fixed: the namespaces are made for this session, so nothing else listens there.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns import Host, NetnsUnavailable, network_hosts

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PREFECT_PORT = 4200
MLFLOW_PORT = 5000
DASK_PORT = 8786

_WAIT_HTTP = """
import sys, time, urllib.request
deadline = time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
            sys.exit(0 if r.status == 200 else 1)
    except Exception:
        time.sleep(0.3)
sys.exit(1)
"""
_WAIT_TCP = """
import socket, sys, time
deadline = time.monotonic() + float(sys.argv[3])
while time.monotonic() < deadline:
    try:
        socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()
        sys.exit(0)
    except OSError:
        time.sleep(0.2)
sys.exit(1)
"""


def host_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a visionflow process on a test host, with its own homes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_", "PYTEST_"))}
    (home / "prefect").mkdir(parents=True, exist_ok=True)
    env.update(
        PYTHONPATH=str(REPO), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", VISIONFLOW_HOME=str(home),
        PREFECT_HOME=str(home / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
        MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING="false", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
        PYTHONUNBUFFERED="1", **extra,
    )  # fmt: skip
    return env


def tail(log: Path, n: int = 3000) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else ""


def wait_http(host: Host, url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    """Wait until ``url`` answers 200 from inside ``host`` (the root namespace cannot reach it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {proc.returncode}:\n{tail(log)}")
        if host.run([sys.executable, "-c", _WAIT_HTTP, url, "5"], check=False, timeout=30).returncode == 0:
            return
    raise TimeoutError(f"{url} did not answer within {timeout}s:\n{tail(log)}")


def wait_tcp(host: Host, address: str, port: int, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{address}:{port}: the process exited with {proc.returncode}:\n{tail(log)}")
        if host.run([sys.executable, "-c", _WAIT_TCP, address, str(port), "5"], check=False, timeout=30).returncode == 0:
            return
    raise TimeoutError(f"{address}:{port} did not accept connections within {timeout}s:\n{tail(log)}")


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL, wait: float = 15) -> None:
    """Send ``sig`` to the process group ``proc`` leads (the process and its children)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
    try:
        proc.wait(wait)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


@pytest.fixture(scope="session")
def hosts() -> Iterator[list[Host]]:
    """Hosts a, b, c on a private /24, torn down at the end of the session."""
    try:
        with network_hosts(3) as made:
            yield made
    except NetnsUnavailable as exc:
        pytest.skip(f"cannot make test hosts as network namespaces: {exc}")


@pytest.fixture(scope="session")
def multihost_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("multihost")


@pytest.fixture(scope="session")
def prefect_on_a(hosts, multihost_root) -> Iterator[str]:
    """A real Prefect server (SQLite) listening on host A's address; yields its API URL."""
    a = hosts[0]
    home = multihost_root / "a-prefect-server"
    log = multihost_root / "prefect-server.log"
    env = host_env(home, PREFECT_UI_ENABLED="false")
    proc = a.popen([BIN / "prefect", "server", "start", "--host", a.address, "--port", str(PREFECT_PORT)], env=env, log=log)
    url = f"http://{a.address}:{PREFECT_PORT}/api"
    try:
        wait_http(a, f"{url}/health", proc, log)
        yield url
    finally:
        kill_group(proc, signal.SIGTERM)


class DaskCluster:
    """``dask scheduler`` on host A and one ``dask worker`` (one process, one thread) on each
    other host, every process in its own group so a test can SIGKILL one host's worker."""

    def __init__(self, hosts: list[Host], root: Path, prefect_api: str, *, port: int = DASK_PORT) -> None:
        self.hosts, self.root, self.prefect_api, self.port = hosts, root, prefect_api, port
        self.address = f"tcp://{hosts[0].address}:{port}"
        self.scheduler: subprocess.Popen | None = None
        self.workers: dict[str, subprocess.Popen] = {}

    def env(self, host: Host) -> dict[str, str]:
        return host_env(self.root / f"{host.label}-home", PREFECT_API_URL=self.prefect_api)

    def start(self) -> DaskCluster:
        a = self.hosts[0]
        log = self.root / f"dask-scheduler-{self.port}.log"
        self.scheduler = a.popen(
            [BIN / "dask", "scheduler", "--host", a.address, "--port", str(self.port), "--no-dashboard"], env=self.env(a), log=log
        )
        wait_tcp(a, a.address, self.port, self.scheduler, log)
        for h in self.hosts[1:]:
            self.workers[h.label] = h.popen(
                [BIN / "dask", "worker", self.address, "--host", h.address, "--nworkers", "1", "--nthreads", "1",
                 "--name", f"host-{h.label}", "--no-dashboard", "--death-timeout", "60"],
                env=self.env(h), log=self.root / f"dask-worker-{self.port}-{h.label}.log",
            )  # fmt: skip
        self.wait_workers(len(self.hosts) - 1)
        return self

    def wait_workers(self, n: int, timeout: float = 120) -> None:
        code = (
            "import sys; from distributed import Client\n"
            f"with Client({self.address!r}, timeout=30) as c: c.wait_for_workers({n}, timeout={timeout})"
        )
        self.hosts[0].run([sys.executable, "-c", code], env=self.env(self.hosts[0]), timeout=timeout + 30)

    def wait_idle(self, timeout: float = 120) -> None:
        """Until no worker executes a task (a cancelled task runs until it returns)."""
        code = (
            "import time; from distributed import Client\n"
            f"with Client({self.address!r}, timeout=30) as c:\n"
            f"    deadline = time.monotonic() + {timeout}\n"
            "    while sum(c.run(lambda dask_worker: len(dask_worker.state.executing)).values()):\n"
            "        assert time.monotonic() < deadline, 'workers still busy'\n"
            "        time.sleep(0.2)\n"
        )
        self.hosts[0].run([sys.executable, "-c", code], env=self.env(self.hosts[0]), timeout=timeout + 30)

    def worker_logs(self) -> str:
        return "".join(tail(self.root / f"dask-worker-{self.port}-{h.label}.log", 10**6) for h in self.hosts[1:])

    def stop(self) -> None:
        for proc in self.workers.values():
            kill_group(proc, signal.SIGTERM, wait=10)
        if self.scheduler is not None:
            kill_group(self.scheduler, signal.SIGTERM, wait=10)


@pytest.fixture(scope="module")
def dask_cluster(hosts, prefect_on_a, tmp_path_factory) -> Iterator[DaskCluster]:
    """A Dask cluster across the hosts, for one module (whose last test may kill a worker)."""
    cluster = DaskCluster(hosts, tmp_path_factory.mktemp("dask"), prefect_on_a)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
