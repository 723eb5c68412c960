"""Test hosts on one machine: Linux network namespaces joined by veth pairs to a bridge.

:func:`network_hosts` makes ``n`` namespaces (hosts ``a``, ``b``, ``c``, ...), each with ``lo`` up
and one veth whose peer is enslaved to a fresh bridge, and addresses in a private /24 chosen for
the run among the ``10.x.y.0/24`` nets no route of this machine touches. The bridge has no address
and the namespaces no default route, so traffic goes only between the hosts (and each host's own
loopback). Everything is torn down in ``finally``, after a failure too: processes still running
inside the namespaces are killed, then the namespaces, veths and bridge are deleted.

Processes in the namespaces share this machine's filesystem (input folders, ``/tmp``) but not
its network: a server on the root namespace's 127.0.0.1 is unreachable from a host, so the hosts
run their own servers and reach each other by address.

Also a command-line tool for the benchmark and for trying things by hand::

    python -m tests.netns -- CMD...   # run CMD with HOSTS_A=10.x.y.1 ... in the environment, then tear down
"""

from __future__ import annotations

import ipaddress
import os
import random
import shutil
import signal
import string
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Host", "NetnsUnavailable", "network_hosts", "unavailable_reason"]


class NetnsUnavailable(RuntimeError):
    """Namespaces cannot be made here (not root, no ``ip``, no permission): tests skip with this."""


@dataclass(frozen=True)
class Host:
    """One test host: a network namespace ``ns`` with ``address`` on interface ``ifname``."""

    label: str
    ns: str
    address: str
    ifname: str

    def argv(self, cmd: Sequence[str]) -> list[str]:
        """``cmd`` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.ns, *map(str, cmd)]

    def popen(
        self, cmd: Sequence[str], *, env: dict[str, str] | None = None, log: Path | None = None, **kwargs
    ) -> subprocess.Popen:
        """Start ``cmd`` on this host in its own process group (so it can be killed whole), its
        output to ``log`` (or inherited)."""
        out = open(log, "ab") if log is not None else None  # noqa: SIM115 - the child owns it
        try:
            return subprocess.Popen(self.argv(cmd), env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
                                    start_new_session=True, **kwargs)  # fmt: skip
        finally:
            if out is not None:
                out.close()

    def run(self, cmd: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 120, check: bool = True,
            **kwargs) -> subprocess.CompletedProcess:  # fmt: skip
        return subprocess.run(self.argv(cmd), env=env, timeout=timeout, check=check, capture_output=True, text=True, **kwargs)


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here, or None when they probably can."""
    if sys.platform != "linux":
        return f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def _free_subnet(rng: random.Random) -> ipaddress.IPv4Network:
    """A 10.x.y.0/24 that no route or address of this machine overlaps."""
    used = []
    for line in _ip("-4", "route", "show", "table", "all").stdout.splitlines() + _ip("-4", "-o", "addr").stdout.split():
        for word in line.split():
            try:
                used.append(ipaddress.ip_network(word, strict=False))
            except ValueError:
                continue
    used = [u for u in used if u.prefixlen > 0]  # the default route overlaps everything
    for _ in range(200):
        net = ipaddress.ip_network(f"10.{rng.randrange(1, 255)}.{rng.randrange(0, 256)}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise NetnsUnavailable("no free 10.x.y.0/24 for the test hosts")


def _pids_in(ns: str) -> list[int]:
    out = _ip("netns", "pids", ns, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _kill_all_in(ns: str) -> None:
    """SIGKILL every process still inside ``ns`` (all of them were started by this run)."""
    for _ in range(5):
        pids = _pids_in(ns)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


@contextmanager
def network_hosts(n: int = 3, *, seed: int | None = None) -> Iterator[list[Host]]:
    """``n`` hosts joined by a bridge on a private /24; torn down on exit, even after a failure."""
    if (reason := unavailable_reason()) is not None:
        raise NetnsUnavailable(reason)
    rng = random.Random(seed if seed is not None else uuid.uuid4().int)
    tag = "".join(rng.choice(string.ascii_lowercase + string.digits) for _ in range(5))
    bridge = f"vfb{tag}"  # names <= 15 characters (IFNAMSIZ)
    made_ns: list[str] = []
    made_links: list[str] = []
    try:
        net = _free_subnet(rng)
        addrs = list(net.hosts())
        try:
            _ip("link", "add", bridge, "type", "bridge")
        except subprocess.CalledProcessError as exc:
            raise NetnsUnavailable(f"cannot create a bridge: {exc.stderr.strip()}") from exc
        made_links.append(bridge)
        _ip("link", "set", bridge, "up")
        hosts = []
        for i in range(n):
            label = string.ascii_lowercase[i]
            ns, outside, inside = f"vf{tag}{label}", f"vf{tag}{label}o", f"vf{tag}{label}i"
            try:
                _ip("netns", "add", ns)
            except subprocess.CalledProcessError as exc:
                raise NetnsUnavailable(f"cannot create a network namespace: {exc.stderr.strip()}") from exc
            made_ns.append(ns)
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            made_links.append(outside)
            _ip("link", "set", inside, "netns", ns)
            _ip("link", "set", outside, "master", bridge)
            _ip("link", "set", outside, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{addrs[i]}/{net.prefixlen}", "dev", inside)
            _ip("-n", ns, "link", "set", inside, "up")
            hosts.append(Host(label=label, ns=ns, address=str(addrs[i]), ifname=inside))
        _wait_reachable(hosts)
        yield hosts
    finally:
        for ns in made_ns:
            _kill_all_in(ns)
            _ip("netns", "del", ns, check=False)
        for link in reversed(made_links):
            _ip("link", "del", link, check=False)


def _wait_reachable(hosts: list[Host], timeout: float = 10) -> None:
    """The bridge forwards after its ports leave the learning state: wait for a ping a -> each."""
    if len(hosts) < 2 or shutil.which("ping") is None:
        time.sleep(0.5)
        return
    deadline = time.monotonic() + timeout
    for other in hosts[1:]:
        while True:
            ok = hosts[0].run(["ping", "-c", "1", "-W", "1", other.address], check=False, timeout=5).returncode == 0
            if ok:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"host {other.label} ({other.address}) is unreachable from {hosts[0].address}")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tests.netns [-n N] -- CMD...``: CMD runs in the root namespace with
    ``HOSTS_NS_A``, ``HOSTS_ADDR_A``, ``HOSTS_IF_A`` ... set; the hosts are gone afterwards."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m tests.netns", description=main.__doc__)
    p.add_argument("-n", type=int, default=3)
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    with network_hosts(args.n) as hosts:
        env = dict(os.environ)
        for h in hosts:
            key = h.label.upper()
            env |= {f"HOSTS_NS_{key}": h.ns, f"HOSTS_ADDR_{key}": h.address, f"HOSTS_IF_{key}": h.ifname}
            print(f"host {h.label}: netns {h.ns}, {h.ifname} {h.address}", file=sys.stderr)
        return subprocess.call(cmd or [os.environ.get("SHELL", "sh")], env=env)


if __name__ == "__main__":
    raise SystemExit(main())
