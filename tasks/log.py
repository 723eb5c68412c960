"""The Prefect run logger when there is a run, a plain logger otherwise, so task bodies can also
be called directly (``task.fn(...)``) from scripts and tests."""

from __future__ import annotations

import logging


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("visionflow")
