"""Flow-run names that say what a run does: ``retrain-photos``, not a path or two random words."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def run_name(prefix: str, parameter: str) -> Callable[[], str]:
    def name() -> str:
        from prefect.runtime import flow_run

        value = (flow_run.parameters or {}).get(parameter) or ""
        return f"{prefix}-{Path(str(value)).name or 'run'}"

    return name
