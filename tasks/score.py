"""Scoring stage: an input spec and a model -> predictions Parquet (one row per file).

Three tasks, so the middle one can run anywhere a task runner puts it (threads here, Dask workers
on this machine or on a cluster):

* :func:`plan_scoring` (driver): resolve the inputs and the model version, split the file list
  into shards written as text files next to the output (tasks pass paths, not file lists).
* :func:`score_shard` (any worker): load the model once per process, score one shard into part
  files, skipping files already scored; report progress to a small JSON file the driver polls.
* :func:`finish_scoring` (driver): compact the dataset or write the single file, count the rows,
  publish the summary artifact.

A worker needs the output folder and the input files on a filesystem it shares with the driver.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Literal

from prefect import task
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, Field

from cvlib.inference.options import ScoreConfig
from tasks.log import run_logger
from tasks.records import ScoreResult
from tasks.registry import resolve_model

PROGRESS_DIR = "progress"


class ScoringEngine(BaseModel):
    """How the scoring engine runs (see :class:`cvlib.inference.predict.ScoringOptions`)."""

    compile: bool = Field(False, description="torch.compile the model (slow start, faster steady state on GPUs).")
    gpu_decode: Literal["auto", "on", "off"] = Field("auto", description="Decode JPEGs with nvJPEG on CUDA (auto: when CUDA is used).")
    loader: Literal["auto", "processes", "threads"] = Field("auto", description="Decoding workers: processes (DataLoader) or threads.")
    part_size: int = Field(4096, ge=1, description="Rows per Parquet part file.")
    part_seconds: float = Field(300.0, gt=0, description="Close a part at least this often (bounds the work a kill loses).")


class ScoringPlan(BaseModel):
    """What a scoring job does; every worker gets it."""

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


class ShardResult(BaseModel):
    shard: int
    files: int
    scored: int
    errors: int
    skipped: int
    seconds: float
    parts: list[str]
    device: str
    precision: str
    worker: str  # "in-process" or the Dask worker's address


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
    name = model_uri.removeprefix("models:/").split("@", 1)[0].split("/", 1)[0]
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


# --------------------------------------------------------------------------- tasks


def _write_shard_list(path: Path, files: list[str]) -> str:
    from cvlib.files.atomic import write_bytes_atomic

    write_bytes_atomic(path, json.dumps(files).encode())  # JSON: any file name survives
    return str(path)


def _read_shard_list(path: str) -> list[str]:
    return list(json.loads(Path(path).read_text()))


@task(name="plan-scoring", retries=2, retry_delay_seconds=[2, 10])
def plan_scoring(
    input_spec: str, model_uri: str, out: str, *, weights: str | None = "DEFAULT", shards: int = 1, root: str | None = None
) -> ScoringPlan:
    from cvlib.inference.inputs import resolve_inputs
    from cvlib.inference.predict import clean_stale_temps, output_layout, shard_files

    logger = run_logger()
    inputs = resolve_inputs(input_spec, root=root)
    local, version = resolve_model_ref(model_uri, weights)
    layout = output_layout(out)
    layout.parts_dir.mkdir(parents=True, exist_ok=True)
    if removed := clean_stale_temps(layout.parts_dir):
        logger.info("removed %d temporary part files left by an interrupted run", removed)
    for old in layout.work_dir.glob("job-*"):  # shard lists and progress of an interrupted run
        shutil.rmtree(old, ignore_errors=True)
    job = layout.work_dir / f"job-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    lists = [_write_shard_list(job / f"shard-{i:05d}.json", chunk) for i, chunk in enumerate(shard_files(inputs.paths, shards))]
    logger.info(
        "scoring %d files (%s %s, root %s) with %s version %s in %d shard(s) -> %s %s",
        len(inputs), inputs.kind, input_spec, inputs.root, model_uri, version, len(lists),
        "file" if layout.single_file else "dataset", layout.target,
    )  # fmt: skip
    return ScoringPlan(
        input_spec=str(input_spec), root=str(inputs.root), files=len(inputs), model_uri=model_uri, model_local=local,
        model_version=version, weights=weights, target=str(layout.target), single_file=layout.single_file,
        parts_dir=str(layout.parts_dir), shard_lists=lists, progress_dir=str(job / PROGRESS_DIR),
    )  # fmt: skip


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return "in-process"


class _ProgressFile:
    """``{"done": n, "total": t}`` in a small JSON file, at most once a second (and at the end)."""

    def __init__(self, path: Path, every: float = 1.0) -> None:
        self.path, self.every, self._last = path, every, 0.0
        path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self._last < self.every:
            return
        self._last = now
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:6]}.tmp")
        tmp.write_text(json.dumps({"done": done, "total": total}))
        tmp.replace(self.path)


@task(name="score-shard", retries=1, retry_delay_seconds=5)
def score_shard(plan: ScoringPlan, shard: int, config: ScoreConfig, engine: ScoringEngine) -> ShardResult:
    """Score one shard into part files; a retry (or a rerun) resumes where the parts stop."""
    from cvlib.inference.predict import OutputLayout, ScoringOptions, score_to_parts

    logger = run_logger()
    files = _read_shard_list(plan.shard_lists[shard])
    model, meta = load_model(plan.model_local, plan.model_version, model_uri=plan.model_uri, weights=plan.weights)
    layout = OutputLayout(Path(plan.target), plan.single_file, Path(plan.parts_dir))
    options = ScoringOptions(
        batch_size=config.batch_size, top_k=config.top_k, num_workers=config.num_workers, device=config.device,
        precision=config.precision, compile=engine.compile, gpu_decode=engine.gpu_decode, loader=engine.loader,
        part_size=engine.part_size, part_seconds=engine.part_seconds,
    )  # fmt: skip
    job_config = config.model_dump(mode="json") | {"input": plan.input_spec, "root": plan.root, "weights": plan.weights}
    stats = score_to_parts(
        model, meta, plan.root, files, layout.parts_dir, model_uri=plan.model_uri, model_version=plan.model_version,
        options=options, config=job_config, shard=shard, sources=layout.sources(),
        progress=_ProgressFile(Path(plan.progress_dir) / f"shard-{shard:05d}.json"),
    )  # fmt: skip
    worker = _worker_name()
    logger.info(
        "shard %d on %s: %d files, %d scored, %d errors, %d already done, %.1f images/s (%s, %s)",
        shard, worker, stats.files, stats.scored, stats.errors, stats.skipped, stats.images_per_s, stats.device, stats.precision,
    )  # fmt: skip
    return ShardResult(
        shard=shard, files=stats.files, scored=stats.scored, errors=stats.errors, skipped=stats.skipped,
        seconds=stats.seconds, parts=stats.parts, device=stats.device, precision=stats.precision, worker=worker,
    )  # fmt: skip


def read_progress(plan: ScoringPlan) -> int:
    """Files done so far over all shards (from the shards' progress files)."""
    done = 0
    for f in Path(plan.progress_dir).glob("shard-*.json"):
        try:
            done += int(json.loads(f.read_text())["done"])
        except (OSError, ValueError, KeyError):
            continue
    return done


def _job_metadata(layout, plan: ScoringPlan, config: ScoreConfig) -> tuple[list[str], dict]:
    """Class list and scoring configuration for the single file: from the parts this job wrote
    (they record the engine's device and precision too), else from the model."""
    from cvlib.files.parquet import read_metadata
    from cvlib.inference.predict import META_CLASS_NAMES, META_SCORING

    for source in layout.sources():
        meta = read_metadata(source)
        scoring = json.loads(meta.get(META_SCORING, "{}"))
        if META_CLASS_NAMES in meta and scoring.get("model_version") == plan.model_version:
            return json.loads(meta[META_CLASS_NAMES]), scoring
    _, model_meta = load_model(plan.model_local, plan.model_version, model_uri=plan.model_uri, weights=plan.weights)
    record = config.model_dump(mode="json") | {"input": plan.input_spec, "root": plan.root, "weights": plan.weights,
                                               "model_uri": plan.model_uri, "model_version": plan.model_version}
    return list(model_meta["class_names"]), record


@task(name="finish-scoring", retries=1, retry_delay_seconds=5)
def finish_scoring(plan: ScoringPlan, results: list[ShardResult], config: ScoreConfig, seconds: float) -> BatchScoreResult:
    """Write the single file (or compact the dataset), check every input has exactly one row,
    count the rows and publish the summary."""
    from cvlib.inference.predict import OutputLayout, compact_parts, finalize_single_file, read_predictions

    logger = run_logger()
    layout = OutputLayout(Path(plan.target), plan.single_file, Path(plan.parts_dir))
    paths = [p for lst in plan.shard_lists for p in _read_shard_list(lst)]
    if layout.single_file:
        class_names, scoring = _job_metadata(layout, plan, config)
        df = finalize_single_file(layout, plan.model_version, paths, class_names=class_names, config=scoring)
    else:
        if dropped := compact_parts(layout.parts_dir, plan.model_version):
            logger.info("dropped %d superseded rows (files whose content changed since they were scored)", dropped)
        df = read_predictions(layout.target, plan.model_version, columns=["path", "status", "model_version"])
        df = df[df["path"].isin(set(paths))]
        if df["path"].duplicated().any() or len(df) != len(paths):
            raise RuntimeError(f"{plan.target}: {len(df)} rows for {len(paths)} files of version {plan.model_version}; rerun to resume")
        shutil.rmtree(Path(plan.progress_dir).parent, ignore_errors=True)
    statuses = df["status"]
    errors = int((statuses != "ok").sum())
    processed = sum(r.scored + r.errors for r in results)
    skipped = sum(r.skipped for r in results)
    result = BatchScoreResult(
        output=str(layout.target), files=len(paths), scored=len(paths) - errors, errors=errors, seconds=seconds,
        model_uri=plan.model_uri, model_version=plan.model_version, skipped=skipped, processed=processed,
        shards=len(results), layout="file" if layout.single_file else "dataset",
        images_per_s=processed / seconds if seconds > 0 else 0.0,
    )  # fmt: skip
    workers = sorted({r.worker for r in results})
    create_markdown_artifact(
        key="scoring-summary",
        markdown=(
            f"# Scoring `{plan.input_spec}`\n\n"
            "| files | scored | errors | resumed (skipped) | images/s | shards | model | output |\n|---|---|---|---|---|---|---|---|\n"
            f"| {result.files} | {result.scored} | {result.errors} | {skipped} | {result.images_per_s:.1f} | {len(results)} | "
            f"{plan.model_uri} (v{plan.model_version}) | `{layout.target}` ({result.layout}) |\n\n"
            f"Workers: {', '.join(workers)}; device {', '.join(sorted({r.device for r in results}))}, "
            f"precision {', '.join(sorted({r.precision for r in results}))}."
        ),
        description="Scoring summary",
    )
    logger.info(
        "%d files: %d scored, %d errors, %d resumed; %.1f images/s over %.1fs -> %s",
        result.files, result.scored, result.errors, skipped, result.images_per_s, seconds, layout.target,
    )  # fmt: skip
    return result
