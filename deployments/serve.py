"""Serve every visionflow deployment from one process, for users without a work pool.

    PREFECT_API_URL=http://127.0.0.1:4200/api python deployments/serve.py [--cron "0 3 * * 1"] [--data-dir DIR]

then trigger runs with ``prefect deployment run 'retrain/scheduled' -p data_dir=...``.
"""

from __future__ import annotations

import argparse

from prefect import serve

from flows.explain import explain
from flows.retrain import retrain
from flows.score import score


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cron", default=None, help="retraining schedule (cron, UTC); none by default")
    parser.add_argument("--data-dir", default=None, help="default data folder for scheduled retraining")
    parser.add_argument("--limit", type=int, default=1, help="flow runs at a time in this process (1: one GPU job at a time)")
    args = parser.parse_args(argv)
    retrain_params = {"data_dir": args.data_dir} if args.data_dir else {}
    serve(
        retrain.to_deployment(name="scheduled", cron=args.cron, parameters=retrain_params, tags=["visionflow", "retrain"]),
        score.to_deployment(name="on-demand", tags=["visionflow", "score"]),
        explain.to_deployment(name="on-demand", tags=["visionflow", "explain"]),
        limit=args.limit,
    )


if __name__ == "__main__":
    main()
