"""Wall time of a SimpleCNN sweep on digits with --parallel 1 and --parallel 2, side by side in
one run, through the real CLI (embedded MLflow store and local Prefect server under a temporary
VISIONFLOW_HOME); then what MLflow's compare view shows for the second sweep's child runs.

    python benchmarks/sweep_parallel.py [--trials 12] [--epochs 2] [--per-class 50] [--image-size 32]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--image-size", type=int, default=32)
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="visionflow-sweep-bench-"))
    env = dict(os.environ, VISIONFLOW_HOME=str(home), PREFECT_HOME=str(home / "prefect"), DO_NOT_TRACK="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING="false",
               PYTHONPATH=str(ROOT))  # fmt: skip
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_API_URL", None)
    cli = [sys.executable, "-m", "flows.cli"]
    data = home / "digits"
    subprocess.run([*cli, "demo-data", str(data), "--image-size", str(args.image_size), "--per-class", str(args.per_class)],
                   env=env, check=True, cwd=ROOT)  # fmt: skip
    subprocess.run([*cli, "server", "start"], env=env, check=True, cwd=ROOT, capture_output=True)  # not timed
    times = {}
    try:
        for k in (1, 2):
            cmd = [*cli, "sweep", str(data), "--trials", str(args.trials), "--parallel", str(k), "--arch", "simple_cnn",
                   "--epochs", str(args.epochs), "--image-size", str(args.image_size), "--batch-size", "32",
                   "--loader-workers", "0", "--model-name", f"sweep-bench-p{k}", "--output-dir", str(home / f"sweep-p{k}")]  # fmt: skip
            print("$", " ".join(cmd[2:]), flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
            times[k] = time.perf_counter() - t0
            if proc.returncode:
                sys.exit(f"sweep --parallel {k} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            print(proc.stdout[proc.stdout.find("sweep finished"):], flush=True)
    finally:
        subprocess.run([*cli, "server", "stop"], env=env, cwd=ROOT, capture_output=True)
    print(f"wall time, {args.trials} trials x {args.epochs} epochs: --parallel 1 {times[1]:.0f}s, --parallel 2 {times[2]:.0f}s, "
          f"ratio {times[1] / times[2]:.2f}x  (os.cpu_count()={os.cpu_count()}, load average {os.getloadavg()[0]:.1f})")  # fmt: skip
    compare_view(home, "sweep-bench-p2")


def compare_view(home: Path, model_name: str) -> None:
    """The columns MLflow's compare view shows for the child runs: params that differ, metrics."""
    sys.path.insert(0, str(ROOT))
    os.environ["VISIONFLOW_HOME"] = str(home)
    from tasks.registry import client

    c = client()
    version = c.search_model_versions(f"name = '{model_name}'")[0]
    parent_id = c.get_run(version.run_id).data.tags["mlflow.parentRunId"]
    parent = c.get_run(parent_id)
    runs = c.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'", max_results=100)
    varying = sorted(k for k in runs[0].data.params if len({r.data.params.get(k) for r in runs}) > 1)
    metrics = sorted(set().union(*(r.data.metrics for r in runs)))
    print(f"\nparent run {parent.info.run_name} ({parent_id}): {len(runs)} child runs")
    print("params shown as differing:", varying)
    print("metric columns:", metrics)
    header = ["run", "status", "pruned", *varying, "val_top1", "val_loss", "objective"]
    print(" | ".join(header))
    for r in sorted(runs, key=lambda r: r.info.run_name):
        row = [r.info.run_name, r.info.status, r.data.tags.get("visionflow.pruned", ""), *(r.data.params[k] for k in varying),
               *(f"{r.data.metrics[m]:.4f}" if m in r.data.metrics else "-" for m in ("val_top1", "val_loss", "objective"))]  # fmt: skip
        print(" | ".join(row))
    print("parent best.* tags:", {k: v for k, v in parent.data.tags.items() if k.startswith("best.")})
    print("parent metrics:", {k: round(v, 4) for k, v in parent.data.metrics.items()})


if __name__ == "__main__":
    main()
