"""Start-up cost of a small CLI command, side by side: Prefect's ephemeral API (a server per
process) against visionflow's local Prefect server (started once, then reused).

    .venv/bin/python benchmarks/cli_startup.py [--repeats 3]

It trains nothing: it scores 8 digit images with a tiny checkpoint it makes, so what is measured
is fixed cost (imports, Prefect API, MLflow-free model load, the flow run records).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def make_checkpoint(root: Path) -> Path:
    from cvlib.models.factory import create_model
    from cvlib.training.checkpoint import save_atomic

    model = create_model("simple_cnn", 10, weights="none", hidden_dim=32)
    meta = {
        "arch": "simple_cnn",
        "class_names": [str(i) for i in range(10)],
        "preprocessing": {"image_size": 32, "resize_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3},
        "head": {"hidden_dim": 32, "dropout": 0.0},
    }
    return save_atomic({"model": model.state_dict(), "meta": meta}, root / "model.pt")


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from cvlib.data.demo import write_digits

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_digits(root / "digits", size=32, per_class=1)
        ckpt = make_checkpoint(root)
        cmd = [str(BIN / "visionflow"), "score", str(root / "digits"), "--model", str(ckpt), "--out", str(root / "p.parquet")]
        base = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
        base |= {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "VISIONFLOW_HOME": str(root / "home"), "PREFECT_HOME": str(root / "prefect")}
        ephemeral = [timed(cmd, base | {"VISIONFLOW_PREFECT": "ephemeral"}) for _ in range(args.repeats)]
        first_local = timed(cmd, base)  # starts the local server
        local = [timed(cmd, base) for _ in range(args.repeats)]
        subprocess.run([str(BIN / "visionflow"), "server", "stop"], env=base, capture_output=True)
    e, loc = statistics.median(ephemeral), statistics.median(local)
    print(f"{'visionflow score (8 images)':<40} {'median s':>9}")
    print(f"{'ephemeral Prefect API, every call':<40} {e:9.2f}")
    print(f"{'local server, first call (starts it)':<40} {first_local:9.2f}")
    print(f"{'local server, later calls':<40} {loc:9.2f}")
    print(f"later calls are {e / loc:.1f}x faster than ephemeral ({e - loc:.1f} s saved per command)")


if __name__ == "__main__":
    main()
