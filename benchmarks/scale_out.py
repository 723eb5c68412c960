"""Scale-out of batch scoring: one Dask worker against two (one process, one thread each).

Run: ``.venv/bin/python benchmarks/scale_out.py`` (loopback clusters; a few minutes on an idle
2-core CPU), or as root ``.venv/bin/python benchmarks/scale_out.py --netns`` (the clusters span
three hosts made as network namespaces, see :mod:`tests.netns`: scheduler and client on A,
workers on B and C), or against clusters you run: ``--address1 tcp://H:P --address2 tcp://H:P``.

Both arms run the real ``score`` flow (:func:`flows.score.score`) with ``dask_address`` on a real
Prefect server, over the same JPEGs, with the same model (``torchvision/resnet18 --weights none``:
random weights from a fixed seed; speed does not depend on weights), the same batch size and
decoding on each worker's one thread (``num_workers=0``). Each cluster first scores a few images,
so every worker has loaded the model (once per worker process: :func:`tasks.score.load_model`
keeps it) before the clock starts. Rounds interleave the arms (1 worker, 2 workers, 1, 2, ...) so
both see the same load; each round's ratio is paired and the median round is reported. The
throughput is the flow's own ``images_per_s``: files over the time of the ``score-shards``
subflow (workers scoring, writing part files, the driver polling progress), not the planning
and finishing steps that happen once per job on the driver.

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
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout, uninstalled

TARGET = 1.8
MODEL = "torchvision/resnet18"


def loopback_cluster(n_workers: int):
    """A LocalCluster on 127.0.0.1: ``n_workers`` processes, one thread and one torch thread each."""
    import dask
    from distributed import LocalCluster

    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {})) | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with dask.config.set({"distributed.worker.daemon": False, "distributed.nanny.pre-spawn-environ": environ}):
        return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                            dashboard_address=None, worker_dashboard_address=None)  # fmt: skip


def prefect_server(stack: ExitStack, root: Path) -> str:
    """A real ``prefect server`` on a free loopback port for this run (unless PREFECT_API_URL is set)."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    from tests import servers

    port = servers.free_port()
    env = dict(os.environ, PREFECT_HOME=str(root / "prefect"), PREFECT_UI_ENABLED="false", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    cmd = [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}/api"
    stack.enter_context(servers.running(cmd, env=env, health_url=f"{url}/health", log=root / "prefect-server.log"))
    return url


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


def run_arms(args: argparse.Namespace, addresses: dict[int, str], work: Path) -> int:
    from benchmarks.score import make_jpegs
    from cvlib.inference.options import ScoreConfig
    from flows.score import score

    images = work / "images"
    names = make_jpegs(images, args.images, size=(640, 480))
    warm = work / "warm.txt"
    warm.write_text("\n".join(str(images / n) for n in names[:8]) + "\n")
    cfg = ScoreConfig(num_workers=0, batch_size=args.batch_size, precision="fp32", part_size=args.batch_size * 4)
    run = 0

    def job(k: int, spec: str) -> tuple[float, float]:
        nonlocal run
        run += 1
        t0 = time.perf_counter()
        res = score(input_dir=spec, model_uri=MODEL, weights="none", out=str(work / f"out-{run:02d}-{k}w"), config=cfg,
                    dask_address=addresses[k])  # fmt: skip
        assert res.files == res.processed, (res.files, res.processed)  # nothing resumed: a fresh output each time
        return res.images_per_s, res.files / (time.perf_counter() - t0)

    for k in sorted(addresses):
        job(k, str(warm))  # every worker loads the model and imports what it needs, outside the clock
        print(f"{k} worker(s) at {addresses[k]}: models kept per worker after warm-up {worker_models(addresses[k])}", flush=True)

    print(f"\n{args.images} JPEGs 640x480, {MODEL} (random weights), batch {args.batch_size}, fp32, decoding on the worker thread")
    print(f"{'round':>5} {'load':>5} {'1 worker img/s':>15} {'2 workers img/s':>16} {'ratio':>6} {'end-to-end ratio':>17}")
    ratios, e2e, ones, twos = [], [], [], []
    for r in range(args.rounds):
        (one, one_e2e), (two, two_e2e) = job(1, str(images)), job(2, str(images))
        ratios.append(two / one)
        e2e.append(two_e2e / one_e2e)
        ones.append(one)
        twos.append(two)
        print(f"{r + 1:>5} {os.getloadavg()[0]:>5.1f} {one:>15.1f} {two:>16.1f} {two / one:>6.2f} {two_e2e / one_e2e:>17.2f}", flush=True)
    ratio = statistics.median(ratios)
    print(f"\nmodels kept per worker at the end: {[worker_models(a) for a in addresses.values()]}")
    print(f"median of {args.rounds} rounds: 1 worker {statistics.median(ones):.1f} img/s, 2 workers {statistics.median(twos):.1f} img/s")
    print(f"scale-out ratio (2 workers / 1 worker): {ratio:.2f} (target >= {TARGET}); end to end, with planning and finishing: "
          f"{statistics.median(e2e):.2f}")  # fmt: skip
    print(f"cores: {os.cpu_count()}, load average now {os.getloadavg()[0]:.1f}" + (" (a busy machine: the figure is low)" if os.getloadavg()[0] > (os.cpu_count() or 1) else ""))
    ceiling = hardware_ceiling(args.batch_size)
    print(f"hardware ceiling: two independent model-only processes / one = {ceiling:.2f}; "
          f"scale-out reaches {ratio / ceiling:.0%} of it")  # fmt: skip
    return 0


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
        os.environ["PREFECT_API_URL"] = prefect_server(stack, work)
        addresses = {}
        for k, given in ((1, args.address1), (2, args.address2)):
            addresses[k] = given or stack.enter_context(loopback_cluster(k)).scheduler_address
        return run_arms(args, addresses, work)


if __name__ == "__main__":
    raise SystemExit(main())
