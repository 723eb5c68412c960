"""Scale-out of batch scoring: one Dask worker against two (one process, one thread each).

Run: ``.venv/bin/python benchmarks/scale_out.py`` (loopback clusters; a few minutes on an idle
2-core CPU), or as root ``.venv/bin/python benchmarks/scale_out.py --netns`` (the clusters span
three hosts made as network namespaces, see :mod:`tests.netns`: scheduler and client on A,
workers on B and C), or against clusters you run: ``--address1 tcp://H:P --address2 tcp://H:P``.

Both arms run the real ``score`` flow (:func:`flows.score.score`) with ``dask_address`` on a real
Prefect server, over the same JPEGs, with the same model (``torchvision/resnet18 --weights none``:
random weights from a fixed seed; speed does not depend on weights), the same batch size,
decoding on each worker's one thread (``num_workers=0``) and the same shard rule (the flow's
default: one shard per worker thread). The loopback clusters are what a user runs on real hosts
(``dask scheduler`` and ``dask worker --nworkers 1 --nthreads 1``, each a process of its own, the
worker under its nanny), started afresh for each arm of each round so that only the measured
arm's processes run: an idle second cluster would take CPU from the two-worker arm only (the
one-worker arm has a core to spare). Each cluster first scores one full batch per worker, so
every worker has loaded the model (once per worker process: :func:`tasks.score.load_model` keeps
it) and run a full-size batch before the clock starts. Rounds interleave the arms (1 worker, 2
workers, 1, 2, ...) so both see the same load; each round's ratio is paired and the median round
is reported. The throughput is the flow's own ``images_per_s``: files over the time of the
``score-shards`` subflow (starting it, workers scoring and writing part files, the driver
polling progress, ending it), not the planning and finishing steps that happen once per job on
the driver (those are in the end-to-end ratio).

With two workers on two cores, every CPU-second another process spends during the timed phase
is taken from a worker. The script prints, per arm, the CPU time the driver (this process: the
flow, the Dask and Prefect clients), the Dask scheduler, the nannies and the Prefect server used
during the timed phase, beside the workers' own. It also measures the hardware ceiling: two
independent model-only processes against one (the most any scale-out of this model can reach
here).

Target: two workers >= 1.8x one worker on a 2-core machine. The script prints the load average
each round; on a shared machine the figure drops and says so.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout, uninstalled

TARGET = 1.8
MODEL = "torchvision/resnet18"
BIN = Path(sys.executable).parent
LOOPBACK = "127.0.0.1"
ROLES = ("driver", "scheduler", "nannies", "server", "workers")  # the first four are overhead


@dataclass
class Processes:
    """The processes of one arm, by role (empty where they run elsewhere)."""

    driver: list = field(default_factory=list)
    scheduler: list = field(default_factory=list)
    nannies: list = field(default_factory=list)
    server: list = field(default_factory=list)
    workers: list = field(default_factory=list)

    def cpu(self) -> dict[str, float | None]:
        """CPU seconds (user + system) each role has used so far; None where it is not here (the
        server with the processes it started)."""
        import psutil

        def used(p, tree: bool = False) -> float:
            try:
                t = p.cpu_times()
                own = t.user + t.system + ((t.children_user + t.children_system) if tree else 0.0)
                return own + (sum(used(c) for c in p.children(recursive=True)) if tree else 0.0)
            except psutil.Error:
                return 0.0

        return {r: sum(used(p, r == "server") for p in getattr(self, r)) if getattr(self, r) else None for r in ROLES}


def _env(work: Path, api: str) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), VISIONFLOW_HOME=str(work / "home"), PREFECT_API_URL=api,
                OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")  # fmt: skip


@contextmanager
def loopback_cluster(n_workers: int, work: Path, api: str):
    """``dask scheduler`` and ``n_workers`` x ``dask worker --nworkers 1 --nthreads 1`` on
    127.0.0.1, each in its own process group; yields (address, Processes without driver/server)."""
    import psutil
    from distributed import Client

    from tests import servers

    env, port = _env(work, api), servers.free_port()
    address = f"tcp://{LOOPBACK}:{port}"
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    procs: list[subprocess.Popen] = []

    def start(cmd: list[str], log: Path) -> subprocess.Popen:
        with open(log, "ab") as out:
            procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
        return procs[-1]

    try:
        scheduler = start([str(BIN / "dask"), "scheduler", "--host", LOOPBACK, "--port", str(port), "--no-dashboard"],
                          logs / f"scheduler-{port}.log")  # fmt: skip
        nannies = [
            start([str(BIN / "dask"), "worker", address, "--host", LOOPBACK, "--nworkers", "1", "--nthreads", "1",
                   "--no-dashboard", "--death-timeout", "60"], logs / f"worker-{port}-{i}.log")  # fmt: skip
            for i in range(n_workers)
        ]
        with Client(address, timeout=60) as client:
            client.wait_for_workers(n_workers, timeout=180)
            worker_pids = set(client.run(os.getpid).values())
        found = Processes(scheduler=[psutil.Process(scheduler.pid)], nannies=[psutil.Process(p.pid) for p in nannies])
        found.workers = [c for n in found.nannies for c in n.children(recursive=True) if c.pid in worker_pids]
        assert len(found.workers) == n_workers, (found.workers, worker_pids)
        yield address, found
    finally:
        for p in reversed(procs):
            servers.stop(p)


def prefect_server(stack: ExitStack, root: Path) -> tuple[str, list]:
    """A real ``prefect server`` on a free loopback port for this run (unless PREFECT_API_URL is
    set); returns its API URL and its process (to account its CPU), if started here."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"], []
    import psutil

    from tests import servers

    port = servers.free_port()
    env = dict(os.environ, PREFECT_HOME=str(root / "prefect"), PREFECT_UI_ENABLED="false", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    cmd = [str(BIN / "prefect"), "server", "start", "--host", LOOPBACK, "--port", str(port)]
    url = f"http://{LOOPBACK}:{port}/api"
    proc = stack.enter_context(servers.running(cmd, env=env, health_url=f"{url}/health", log=root / "prefect-server.log"))
    return url, [psutil.Process(proc.pid)]


def worker_models(address: str) -> dict[str, int]:
    """worker -> how many models its process keeps (1: loaded once, reused by every shard)."""
    from distributed import Client

    def kept() -> int:
        import tasks.score

        return len(tasks.score._MODELS)

    with Client(address, timeout=30) as client:
        return client.run(kept)


def _forward_seconds(batch_size: int, batches: int) -> float:
    """Seconds for ``batches`` forwards of the benchmark's model on one thread, in this process:
    the work one worker does per batch, without decoding, Dask or Prefect."""
    import torch
    import torchvision

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(batch_size, 3, 224, 224)
    with torch.inference_mode():
        model(x)
        t0 = time.perf_counter()
        for _ in range(batches):
            model(x)
    return time.perf_counter() - t0


def hardware_ceiling(batch_size: int, batches: int = 8) -> float:
    """What two cores give two independent copies of the same model-only loop, against one: the
    most any scale-out of this model can reach here (shared caches, memory bandwidth, turbo, and
    vCPUs that may be siblings of one physical core all lower it below 2)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        one = pool.starmap(_forward_seconds, [(batch_size, batches)])[0]
    with ctx.Pool(2) as pool:
        two = pool.starmap(_forward_seconds, [(batch_size, batches)] * 2)
    return 2 * one / max(two)


def _pipeline_seconds(root: str, files: list[str], out: str, batch_size: int) -> float:
    """Seconds for one worker's own work on ``files`` in this process, on one thread: read,
    decode, forward, part files (:func:`cvlib.inference.predict.score_to_parts`), without Dask,
    Prefect or a driver; after one warm-up batch."""
    import torch

    from cvlib.inference.options import ScoreConfig
    from cvlib.inference.predict import score_to_parts
    from cvlib.models.zoo import imagenet_model

    torch.set_num_threads(1)
    model, meta = imagenet_model(MODEL.split("/")[1], "none")
    cfg = ScoreConfig(num_workers=0, batch_size=batch_size, precision="fp32", part_size=batch_size * 4)
    score_to_parts(model, meta, root, files[:batch_size], f"{out}-warm", model_version="warm", config=cfg)
    t0 = time.perf_counter()
    score_to_parts(model, meta, root, files, out, model_version=meta["version"], config=cfg)
    return time.perf_counter() - t0


def pipeline_ceiling(root: Path, names: list[str], work: Path, batch_size: int) -> float:
    """Two independent processes each scoring half the images (the two shards) at once, against
    one process scoring one half alone: what two cores allow the workers' own pipeline, with
    nothing else running. The Dask arms can only lose to it (driver, scheduler, nannies, server,
    task start-up)."""
    import multiprocessing as mp

    half = len(names) // 2
    shards = [names[:half], names[half : 2 * half]]
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        one = pool.starmap(_pipeline_seconds, [(str(root), shards[0], str(work / "ceiling-1"), batch_size)])[0]
    with ctx.Pool(2) as pool:
        two = pool.starmap(_pipeline_seconds, [(str(root), s, str(work / f"ceiling-2-{i}"), batch_size) for i, s in enumerate(shards)])
    return 2 * one / max(two)


@dataclass
class Arm:
    """One arm's figures over the rounds."""

    rate: list[float] = field(default_factory=list)  # images/s over the score-shards subflow
    e2e: list[float] = field(default_factory=list)  # images/s over the whole flow call
    cpu: list[dict[str, float | None]] = field(default_factory=list)  # role -> CPU s in the timed job
    wall: list[float] = field(default_factory=list)  # seconds of the timed job (the whole flow call)


def _cpu_line(cpu: dict[str, float | None], wall: float) -> str:
    """CPU seconds per role, and the non-worker ones as a share of one core over the job: most
    of it is periodic (heartbeats, monitors, the server's services), so it grows with the job's
    length; on two cores with two workers, that share is taken from the workers."""
    over = sum(cpu[r] for r in ROLES[:-1] if cpu[r] is not None)
    parts = ", ".join(f"{r} {cpu[r]:.2f}" for r in ROLES if cpu[r] is not None)
    share = f"; non-worker {over:.2f} s = {over / wall:.1%} of one core over the {wall:.1f} s job" if wall > 0 else ""
    return f"CPU s during the timed job: {parts}{share}"


def _median_cpu(cpus: list[dict[str, float | None]]) -> dict[str, float | None]:
    return {r: None if cpus[0][r] is None else statistics.median(c[r] for c in cpus) for r in ROLES}


def run_arms(args: argparse.Namespace, clusters: dict, server: list, work: Path) -> int:
    """``clusters``: k -> a context manager yielding (address, Processes) for a k-worker cluster."""
    import psutil

    from benchmarks.score import make_jpegs
    from cvlib.inference.options import ScoreConfig
    from flows.score import score

    images = work / "images"
    names = make_jpegs(images, args.images, size=(640, 480))
    cfg = ScoreConfig(num_workers=0, batch_size=args.batch_size, precision="fp32", part_size=args.batch_size * 4)
    warm = {}
    for k in clusters:  # one full batch per worker (its shard): the model loaded, full-size batches run
        warm[k] = work / f"warm-{k}.txt"
        warm[k].write_text("".join(f"{images / n}\n" for n in names[-k * args.batch_size :]))
    run = 0

    def job(k: int, spec: str, address: str) -> tuple[float, float, float]:
        nonlocal run
        run += 1
        t0 = time.perf_counter()
        res = score(input_dir=spec, model_uri=MODEL, weights="none", out=str(work / f"out-{run:02d}-{k}w"), config=cfg,
                    dask_address=address)  # fmt: skip
        assert res.files == res.processed, (res.files, res.processed)  # nothing resumed: a fresh output each time
        wall = time.perf_counter() - t0
        return res.images_per_s, res.files / wall, wall

    print(f"\n{args.images} JPEGs 640x480, {MODEL} (random weights), batch {args.batch_size}, fp32, decoding on the worker thread")
    arms = {k: Arm() for k in clusters}
    for r in range(args.rounds):
        for k, cluster in clusters.items():
            with cluster() as (address, procs):
                procs.driver, procs.server = [psutil.Process()], server
                job(k, str(warm[k]), address)
                kept = worker_models(address)
                assert sorted(kept.values()) == [1] * k, kept  # every worker loaded the model once
                before = procs.cpu()
                rate, e2e, wall = job(k, str(images), address)
                after = procs.cpu()
                kept = worker_models(address)
                assert sorted(kept.values()) == [1] * k, kept  # and kept it: no worker loaded it again
            arms[k].rate.append(rate)
            arms[k].e2e.append(e2e)
            arms[k].wall.append(wall)
            arms[k].cpu.append({ro: None if after[ro] is None else after[ro] - before[ro] for ro in ROLES})
            print(f"round {r + 1}, {k} worker(s): {rate:.1f} img/s (end to end {e2e:.1f}), load {os.getloadavg()[0]:.1f}; "
                  f"{_cpu_line(arms[k].cpu[-1], wall)}", flush=True)  # fmt: skip
        one, two = arms[1], arms[2]
        print(f"round {r + 1}: ratio {two.rate[-1] / one.rate[-1]:.2f}, end to end {two.e2e[-1] / one.e2e[-1]:.2f}", flush=True)
    ratios = [b / a for a, b in zip(arms[1].rate, arms[2].rate, strict=True)]
    e2e = [b / a for a, b in zip(arms[1].e2e, arms[2].e2e, strict=True)]
    ratio = statistics.median(ratios)
    print(f"\nmedian of {args.rounds} rounds: 1 worker {statistics.median(arms[1].rate):.1f} img/s, "
          f"2 workers {statistics.median(arms[2].rate):.1f} img/s")  # fmt: skip
    for k, arm in arms.items():
        print(f"  {k} worker(s), median {_cpu_line(_median_cpu(arm.cpu), statistics.median(arm.wall))}")
    print(f"scale-out ratio (2 workers / 1 worker): {ratio:.2f} (rounds: {', '.join(f'{x:.2f}' for x in ratios)}; "
          f"target >= {TARGET}); end to end, with planning and finishing: {statistics.median(e2e):.2f}")  # fmt: skip
    load = os.getloadavg()[0]
    print(f"cores: {os.cpu_count()}, load average now {load:.1f}" + (" (a busy machine: the figure is low)" if load > (os.cpu_count() or 1) else ""))
    ceiling = hardware_ceiling(args.batch_size)
    print(f"hardware ceiling: two independent model-only processes / one = {ceiling:.2f}; "
          f"scale-out reaches {ratio / ceiling:.0%} of it")  # fmt: skip
    pipeline = pipeline_ceiling(images, names, work, args.batch_size)
    print(f"pipeline ceiling: two independent processes scoring a shard each (read, decode, forward, part files; "
          f"no Dask, Prefect or driver) / one = {pipeline:.2f}; scale-out reaches {ratio / pipeline:.0%} of it "
          f"(load average {os.getloadavg()[0]:.1f})")  # fmt: skip
    return 0


@contextmanager
def given_cluster(address: str):
    """A cluster run elsewhere: its processes are not here to account."""
    yield address, Processes()


def run_netns(args: argparse.Namespace, work: Path) -> int:
    """Hosts A, B, C: Prefect server and two schedulers on A (a 1-worker cluster with B's worker,
    a 2-worker cluster with B's and C's), then this script again on A against them."""
    from tests.multihost.conftest import BIN, PREFECT_PORT, DaskCluster, host_env, kill_group, wait_http
    from tests.netns import network_hosts

    with network_hosts(3) as hosts, ExitStack() as stack:
        a = hosts[0]
        log = work / "prefect-server.log"
        server = a.popen([BIN / "prefect", "server", "start", "--host", a.address, "--port", str(PREFECT_PORT)],
                         env=host_env(work / "a-server", PREFECT_UI_ENABLED="false"), log=log)  # fmt: skip
        stack.callback(kill_group, server)
        api = f"http://{a.address}:{PREFECT_PORT}/api"
        wait_http(a, f"{api}/health", server, log)
        clusters = {1: DaskCluster(hosts[:2], work, api, port=8786), 2: DaskCluster(hosts, work, api, port=8796)}
        for c in clusters.values():
            stack.callback(c.stop)
            c.start()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--images", str(args.images), "--rounds", str(args.rounds),
               "--batch-size", str(args.batch_size), "--address1", clusters[1].address, "--address2", clusters[2].address]  # fmt: skip
        print(f"hosts: {', '.join(f'{h.label}={h.address}' for h in hosts)}; client on a", flush=True)
        return subprocess.call(a.argv(cmd), env=host_env(work / "a-home", PREFECT_API_URL=api))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=240, help="JPEGs per job")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (1 worker, 2 workers); the median round is reported")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--address1", help="an existing Dask cluster with one worker (one thread)")
    ap.add_argument("--address2", help="an existing Dask cluster with two workers (one thread each)")
    ap.add_argument("--netns", action="store_true", help="run the clusters on three network-namespace hosts (root)")
    args = ap.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    with tempfile.TemporaryDirectory(prefix="visionflow-scale-out-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        if args.netns:
            return run_netns(args, work)
        os.environ.setdefault("VISIONFLOW_HOME", str(work / "home"))
        api, server = prefect_server(stack, work)
        os.environ["PREFECT_API_URL"] = api
        clusters = {}
        for k, given in ((1, args.address1), (2, args.address2)):
            clusters[k] = (lambda a=given: given_cluster(a)) if given else (lambda k=k: loopback_cluster(k, work, api))
        return run_arms(args, clusters, server, work)


if __name__ == "__main__":
    raise SystemExit(main())
