"""Scoring stage: an input spec and a model -> predictions Parquet (one row per file).

Three tasks, so the middle one can run anywhere a task runner puts it (threads here, Dask workers
on this machine or on a cluster):

* :func:`plan_scoring` (driver): resolve the inputs and the model version, split the file list
  into shards written as JSON lists next to the output (tasks pass paths, not file lists).
* :func:`score_shard` (any worker): load the model once per process, score one shard into part
  files, skipping files already scored; report progress to a small JSON file the driver polls.
* :func:`finish_scoring` (driver): compact the dataset or write the single file, count the rows,
  publish the summary artifact.

A worker needs the output folder and the input files on a filesystem it shares with the driver.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

from prefect import task
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel

from cvlib.inference.options import ScoreConfig
from tasks.log import run_logger
from tasks.records import ScoreResult
from tasks.registry import parse_model_uri, resolve_model

if TYPE_CHECKING:
    from cvlib.inference.output import OutputLayout


class ScoringJob(BaseModel):
    """The facts of one scoring job, from :func:`plan_scoring` to every worker: the inputs, the
    model, where the output goes and the shard lists. How to score is the :class:`ScoreConfig`."""

    input_spec: str
    root: str
    files: int
    model_uri: str
    model_local: str
    model_version: str
    weights: str | None = None
    target: str
    single_file: bool
    parts_dir: str
    shard_lists: list[str]
    progress_dir: str
    engine: str = "torch"  # what scores: torch or openvino (decided once, in plan_scoring)
    engine_reason: str = ""
    all_paths: str = ""  # JSON list of every input path (the shards hold only the files to read)
    unchanged: int = 0  # inputs skipped unread: same size and mtime as when their row was made
    stat_table: str = ""  # this job's (path, size, mtime_ns), the next run's index once it finishes

    @property
    def layout(self) -> OutputLayout:
        """Where the output goes."""
        from cvlib.inference.output import OutputLayout

        return OutputLayout(Path(self.target), self.single_file, Path(self.parts_dir))

    def facts(self) -> dict:
        """What the output's metadata records about the job, beside the configuration."""
        return {"input": self.input_spec, "root": self.root, "weights": self.weights}

    def paths(self) -> list[str]:
        """Every input path, shard after shard."""
        from cvlib.inference.shards import read_shard_list

        if self.all_paths:
            return read_shard_list(self.all_paths)
        return [p for lst in self.shard_lists for p in read_shard_list(lst)]

    @property
    def scored_index(self) -> Path:
        """Where the (path, size, mtime) of the rows the output holds are kept between runs."""
        from cvlib.inference.resume import scored_index_path

        return scored_index_path(self.layout)


class ShardResult(BaseModel):
    shard: int
    files: int
    scored: int
    errors: int
    skipped: int
    seconds: float
    parts: int  # part files written: a count, not their names (a Prefect result must not grow with the files)
    device: str
    precision: str
    worker: str  # "in-process" or the Dask worker's address
    engine: str = "torch"


class BatchScoreResult(ScoreResult):
    """:class:`ScoreResult` plus what a batch job adds."""

    skipped: int = 0  # rows already in the output (resumed), not scored again
    processed: int = 0  # files read and scored (or found unreadable) in this run
    shards: int = 1
    layout: str = "file"  # file or dataset
    images_per_s: float = 0.0


# --------------------------------------------------------------------------- models, once per process

_MODELS: OrderedDict[tuple[str, str], tuple[object, dict]] = OrderedDict()
_MODELS_LOCK = threading.Lock()
MODELS_KEPT = 2  # a long-lived worker serving many versions keeps only the latest few


def resolve_model_ref(model_uri: str, weights: str | None = "DEFAULT") -> tuple[str, str]:
    """(local path or zoo URI, version): ``torchvision/ARCH`` goes to :mod:`cvlib.models.zoo`, the rest to
    :func:`tasks.registry.resolve_model` (aliases resolved to a version first)."""
    from cvlib.models.zoo import is_zoo_uri, zoo_arch, zoo_version

    if is_zoo_uri(model_uri):
        return model_uri, zoo_version(zoo_arch(model_uri), weights)
    local, version = resolve_model(model_uri)
    if not model_uri.startswith("models:/"):
        # A file's name is no version: a retrained checkpoint under the same name must not
        # resume (skip) as if it were the model that scored the existing rows.
        version = f"{Path(local).name}-{_content_digest(Path(local))}"
    return local, version


def _content_digest(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for f in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode() if f != path else b"")
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:12]


def _pinned(model_uri: str, version: str) -> str:
    """``models:/NAME@ALIAS`` -> ``models:/NAME/VERSION``: a worker must not follow a moved alias."""
    name, _, _ = parse_model_uri(model_uri)
    return f"models:/{name}/{version}"


def load_model(model_local: str, model_version: str, *, model_uri: str = "", weights: str | None = "DEFAULT"):
    """(model, meta), loaded once per process and kept, keyed by (local path, version)."""
    key = (model_local, model_version)
    with _MODELS_LOCK:
        if key in _MODELS:
            _MODELS.move_to_end(key)
        else:
            from cvlib.models.zoo import imagenet_model, is_zoo_uri, zoo_arch
            from cvlib.training.checkpoint import load_package

            if is_zoo_uri(model_local):
                model, meta = imagenet_model(zoo_arch(model_local), weights)
            else:
                local = model_local
                if not Path(local).exists() and model_uri.startswith("models:/"):
                    local, _ = resolve_model(_pinned(model_uri, model_version))  # a worker without the driver's cache
                model, meta = load_package(local)
            _MODELS[key] = (model, meta)
            while len(_MODELS) > MODELS_KEPT:
                _MODELS.popitem(last=False)
        return _MODELS[key]


_ENGINES: OrderedDict[tuple, object] = OrderedDict()


def load_engine(job: ScoringJob, config: ScoreConfig):
    """(forward, meta) for the job's engine, once per process: the module for torch, the
    compiled OpenVINO model for openvino (its verified artifact, or an fp32 IR converted now)."""
    model, meta = load_model(job.model_local, job.model_version, model_uri=job.model_uri, weights=job.weights)
    if job.engine != "openvino":
        return model, meta
    key = (job.model_local, job.model_version, config.ov_streams)
    with _MODELS_LOCK:
        if key not in _ENGINES:
            _ENGINES[key] = _openvino_engine(model, meta, job.model_local, config.ov_streams)
            while len(_ENGINES) > MODELS_KEPT:
                _ENGINES.popitem(last=False)
        _ENGINES.move_to_end(key)
        return _ENGINES[key], meta


def _openvino_engine(model, meta: dict, local: str, streams: int):
    import tempfile

    import torch

    from cvlib.inference.engines import OpenVINOEngine, choose_engine
    from cvlib.inference.export import convert_to_ir

    choice = choose_engine("openvino", torch.device("cpu"), local if Path(local).exists() else None)
    if choice.xml is None:
        xml = Path(tempfile.mkdtemp(prefix="visionflow-ir-")) / "model_fp32.xml"
        convert_to_ir(model, meta, xml)
        return OpenVINOEngine(xml, streams=streams)
    return OpenVINOEngine(choice.xml, int8=choice.int8, precision_hint=choice.precision_hint, streams=streams)


def choose_job_engine(model_local: str, model_uri: str, version: str, config: ScoreConfig) -> tuple[str, str]:
    """(engine, reason) for a job: :func:`cvlib.inference.engines.choose_engine` on this machine's
    device and the version's package (its download refreshed when the version was exported
    after it was cached)."""
    from cvlib.inference.engines import choose_engine, openvino_dir
    from cvlib.models.factory import pick_device

    device = pick_device(config.device)
    if config.engine != "torch" and model_uri.startswith("models:/") and openvino_dir(model_local) is None:
        model_local = _refreshed(model_uri, version, model_local)
    package = model_local if Path(model_local).exists() else None
    choice = choose_engine(config.engine, device, package)
    return choice.engine, choice.reason


def _refreshed(model_uri: str, version: str, local: str) -> str:
    """Download the version again when its tags say it has an OpenVINO artifact the cache lacks."""
    from tasks.registry import client

    name, _, _ = parse_model_uri(model_uri)
    tags = client().get_model_version(name, version).tags or {}
    if tags.get("visionflow.openvino.status") in ("verified", "rejected"):
        (Path(local) / ".complete").unlink(missing_ok=True)
        local, _ = resolve_model(f"models:/{name}/{version}")
    return local


# --------------------------------------------------------------------------- tasks


@task(name="plan-scoring", retries=2, retry_delay_seconds=[2, 10])
def plan_scoring(
    input_spec: str, model_uri: str, out: str, *, weights: str | None = "DEFAULT", shards: int = 1, root: str | None = None,
    config: ScoreConfig | None = None,
) -> ScoringJob:
    from cvlib.files.atomic import write_bytes_atomic
    from cvlib.inference.inputs import resolve_inputs
    from cvlib.inference.output import output_layout
    from cvlib.inference.resume import clean_stale_temps, scored_index_path, stat_paths, unchanged_scored, write_stat_table
    from cvlib.inference.shards import write_shard_lists

    logger = run_logger()
    inputs = resolve_inputs(input_spec, root=root)
    local, version = resolve_model_ref(model_uri, weights)
    layout = output_layout(out)
    layout.parts_dir.mkdir(parents=True, exist_ok=True)
    if removed := clean_stale_temps(layout.parts_dir):
        logger.info("removed %d temporary part files left by an interrupted run", removed)
    engine, reason = choose_job_engine(local, model_uri, version, config or ScoreConfig())
    # A stat per file: files unchanged since their row was made (by this engine) are not read again.
    size, mtime = stat_paths(inputs.root, inputs.paths)
    unchanged = unchanged_scored(scored_index_path(layout), layout.sources(), version, inputs.paths, size, mtime, engine)
    todo = [p for p, skip in zip(inputs.paths, unchanged, strict=True) if not skip]
    lists, progress_dir = write_shard_lists(layout.work_dir, todo, shards)
    job_dir = Path(progress_dir).parent
    write_bytes_atomic(job_dir / "all-paths.json", json.dumps(inputs.paths).encode())
    stat_table = write_stat_table(job_dir / "stats.parquet", inputs.paths, size, mtime, version)
    logger.info(
        "scoring %d files (%s %s, root %s; %d unchanged since scored, not read) with %s version %s on %s (%s) in %d shard(s) -> %s %s",
        len(inputs), inputs.kind, input_spec, inputs.root, int(unchanged.sum()), model_uri, version, engine, reason, len(lists),
        "file" if layout.single_file else "dataset", layout.target,
    )  # fmt: skip
    return ScoringJob(
        input_spec=str(input_spec), root=str(inputs.root), files=len(inputs), model_uri=model_uri, model_local=local,
        model_version=version, weights=weights, target=str(layout.target), single_file=layout.single_file,
        parts_dir=str(layout.parts_dir), shard_lists=lists, progress_dir=progress_dir, engine=engine, engine_reason=reason,
        all_paths=str(job_dir / "all-paths.json"), unchanged=int(unchanged.sum()), stat_table=str(stat_table),
    )  # fmt: skip


def _dask_cancelled():
    """When this shard runs as a Dask task: a check that is true once Dask has cancelled the task
    (its client died or released it). Dask cannot interrupt a running task, so without this an
    abandoned shard would go on writing parts beside the rerun that replaced it."""
    try:
        from distributed import get_worker

        worker = get_worker()
        key = worker.get_current_task()
    except (ImportError, ValueError, KeyError):
        return None

    def cancelled() -> bool:
        ts = worker.state.tasks.get(key)
        return ts is None or ts.state == "cancelled"

    return cancelled


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return "in-process"


@task(name="score-shard", retries=1, retry_delay_seconds=5)
def score_shard(job: ScoringJob, shard: int, config: ScoreConfig) -> ShardResult:
    """Score one shard into part files; a retry (or a rerun) resumes where the parts stop."""
    from cvlib.inference.predict import score_to_parts
    from cvlib.inference.shards import ProgressFile, read_shard_list

    logger = run_logger()
    files = read_shard_list(job.shard_lists[shard])
    if not files:  # every file of this shard is unchanged since scored: no model to load
        return ShardResult(shard=shard, files=0, scored=0, errors=0, skipped=0, seconds=0.0, parts=0, device="none",
                           precision="none", worker=_worker_name(), engine=job.engine)  # fmt: skip
    model, meta = load_engine(job, config)
    stats = score_to_parts(
        model, meta, job.root, files, job.layout.parts_dir, model_uri=job.model_uri,
        model_version=job.model_version, config=config, job=job.facts(), shard=shard, sources=job.layout.sources(),
        progress=ProgressFile(Path(job.progress_dir) / f"shard-{shard:05d}.json"), stop=_dask_cancelled(),
    )  # fmt: skip
    worker = _worker_name()
    if stats.stopped:
        logger.warning("shard %d on %s stopped after %d files: Dask cancelled it (its client is gone); a rerun resumes it",
                       shard, worker, stats.processed + stats.skipped)  # fmt: skip
    logger.info(
        "shard %d on %s: %d files, %d scored, %d errors, %d already done, %.1f images/s (%s, %s, %s)",
        shard, worker, stats.files, stats.scored, stats.errors, stats.skipped, stats.images_per_s, stats.engine, stats.device,
        stats.precision,
    )  # fmt: skip
    return ShardResult(
        shard=shard, files=stats.files, scored=stats.scored, errors=stats.errors, skipped=stats.skipped,
        seconds=stats.seconds, parts=len(stats.parts), device=stats.device, precision=stats.precision, worker=worker,
        engine=stats.engine,
    )  # fmt: skip


def _single_file_metadata(job: ScoringJob, config: ScoreConfig) -> tuple[list[str], dict]:
    """Class list and scoring configuration for the single file: as this job's parts recorded
    them (with the device and precision they ran with), else from the model."""
    from cvlib.inference.output import recorded_scoring

    if (recorded := recorded_scoring(job.layout, job.model_version, job.engine)) is not None:
        return recorded
    _, model_meta = load_model(job.model_local, job.model_version, model_uri=job.model_uri, weights=job.weights)
    record = config.model_dump(mode="json") | job.facts() | {"model_uri": job.model_uri, "model_version": job.model_version}
    return list(model_meta["class_names"]), record


@task(name="finish-scoring", retries=1, retry_delay_seconds=5)
def finish_scoring(job: ScoringJob, results: list[ShardResult], config: ScoreConfig, seconds: float) -> BatchScoreResult:
    """Write the single file (or compact the dataset), check every input has exactly one row,
    count the rows and publish the summary."""
    from cvlib.inference.output import finalize_dataset, finalize_single_file
    from cvlib.inference.resume import clean_stale_temps

    logger = run_logger()
    layout, paths = job.layout, job.paths()
    pending = job.scored_index.with_name(job.scored_index.name + ".pending")
    if job.stat_table and Path(job.stat_table).is_file():  # out of the job folder, which finishing removes
        pending.parent.mkdir(parents=True, exist_ok=True)
        os.replace(job.stat_table, pending)
    if removed := clean_stale_temps(layout.parts_dir):  # every shard is done: a temp is a killed worker's
        logger.info("removed %d temporary part files left by a killed worker", removed)
    if layout.single_file:
        class_names, scoring = _single_file_metadata(job, config)
        df = finalize_single_file(layout, job.model_version, paths, class_names=class_names, config=scoring, engine=job.engine)
    else:
        df, dropped = finalize_dataset(layout, job.model_version, paths, job.engine)
        if dropped:
            logger.info("dropped %d superseded rows (files whose content changed since they were scored)", dropped)
        shutil.rmtree(Path(job.progress_dir).parent, ignore_errors=True)
    if pending.is_file():  # every input has its row now: next time, unchanged files are not read
        os.replace(pending, job.scored_index)
    errors = int((df["status"] != "ok").sum())
    processed = sum(r.scored + r.errors for r in results)
    skipped = sum(r.skipped for r in results) + job.unchanged
    result = BatchScoreResult(
        output=str(layout.target), files=len(paths), scored=len(paths) - errors, errors=errors, seconds=seconds,
        model_uri=job.model_uri, model_version=job.model_version, skipped=skipped, processed=processed,
        shards=len(results), layout="file" if layout.single_file else "dataset",
        images_per_s=processed / seconds if seconds > 0 else 0.0,
    )  # fmt: skip
    _publish_summary(job, results, result)
    logger.info(
        "%d files: %d scored, %d errors, %d resumed; %.1f images/s over %.1fs -> %s",
        result.files, result.scored, result.errors, skipped, result.images_per_s, seconds, layout.target,
    )  # fmt: skip
    return result


def _publish_summary(job: ScoringJob, results: list[ShardResult], result: BatchScoreResult) -> None:
    workers = sorted({r.worker for r in results})
    create_markdown_artifact(
        key="scoring-summary",
        markdown=(
            f"# Scoring `{job.input_spec}`\n\n"
            "| files | scored | errors | resumed (skipped) | images/s | shards | model | output |\n|---|---|---|---|---|---|---|---|\n"
            f"| {result.files} | {result.scored} | {result.errors} | {result.skipped} | {result.images_per_s:.1f} | {len(results)} | "
            f"{job.model_uri} (v{job.model_version}) | `{result.output}` ({result.layout}) |\n\n"
            f"Workers: {', '.join(workers)}; engine {job.engine} ({job.engine_reason}); device {', '.join(sorted({r.device for r in results}))}, "
            f"precision {', '.join(sorted({r.precision for r in results}))}."
        ),
        description="Scoring summary",
    )
