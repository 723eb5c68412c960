"""Scoring stage: a folder of images -> predictions Parquet (one row per file)."""

from __future__ import annotations

import time

from prefect import task
from prefect.artifacts import create_markdown_artifact

from cvlib.config import ScoreConfig
from tasks.log import run_logger
from tasks.records import ScoreResult
from tasks.registry import resolve_model


@task(name="score-folder", retries=1, retry_delay_seconds=5)
def score_folder(input_dir: str, model_uri: str, out: str, config: ScoreConfig) -> ScoreResult:
    from cvlib.checkpoint import load_package
    from cvlib.predict import list_input_files, write_predictions
    from cvlib.predict import score_folder as score

    logger = run_logger()
    local, version = resolve_model(model_uri)
    model, meta = load_package(local)
    files = list_input_files(input_dir)
    t0 = time.perf_counter()
    df = score(
        model,
        meta,
        input_dir,
        files=files,
        model_uri=model_uri,
        model_version=version,
        batch_size=config.batch_size,
        top_k=config.top_k,
        num_workers=config.num_workers,
        device=config.device,
    )
    seconds = time.perf_counter() - t0
    write_predictions(df, out, class_names=meta["class_names"], config=config.model_dump(mode="json") | {"model_uri": model_uri})
    errors = int((df["status"] != "ok").sum())
    result = ScoreResult(
        output=str(out), files=len(df), scored=len(df) - errors, errors=errors, seconds=seconds, model_uri=model_uri, model_version=version
    )
    create_markdown_artifact(
        key="scoring-summary",
        markdown=(
            f"# Scoring `{input_dir}`\n\n| files | scored | errors | images/s | model | output |\n|---|---|---|---|---|---|\n"
            f"| {result.files} | {result.scored} | {result.errors} | {result.files / max(seconds, 1e-9):.1f} | {model_uri} (v{version}) | `{out}` |"
        ),
        description="Scoring summary",
    )
    logger.info("scored %d files (%d errors) in %.1fs -> %s", result.files, errors, seconds, out)
    return result
