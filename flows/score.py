"""Batch scoring: images (a folder, a glob, a list of paths or a manifest) and a model ->
predictions Parquet, one row per file.

The ``score`` flow plans the job (inputs, model version, shards), runs the ``score-shards``
subflow on a task runner chosen from its parameters, then writes or compacts the output:

* ``dask_workers <= 1`` and no ``dask_address``: in this process (Prefect's thread pool, one shard).
* ``dask_workers >= 2``: a temporary local Dask cluster of that many worker processes (one thread
  each, bound to 127.0.0.1 only, no dashboard), via prefect-dask's ``DaskTaskRunner``.
* ``dask_address="tcp://HOST:PORT"``: an existing Dask cluster; its workers must see the input
  files, the output folder and the model (the visionflow home, or the MLflow server to fetch the
  pinned version from).

Each worker process loads the model once (:func:`tasks.score.load_model`) and resumes from the
part files already written, so a rerun after a crash, or a Prefect retry, scores only what is
missing.

Output (``out``): a name ending in ``.parquet`` is one file, written atomically when the job is
done (its parts are staged in a hidden ``.NAME.parquet.parts`` folder beside it, so it resumes
too; it holds exactly this job's rows, sorted by path). Anything else is a Parquet dataset
folder of ``part-SHARD-TOKEN-SEQ.parquet`` files that accumulates rows across runs and model
versions (``pandas.read_parquet(out)`` reads it whole). Rows are keyed by (path, sha256, model
version): a rerun skips files already scored; a file whose content changed is scored again and
its old row dropped. Use one output per input root, and one run at a time per output.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.futures import wait
from prefect.utilities.annotations import unmapped

from cvlib.inference.options import ScoreConfig
from cvlib.inference.shards import read_progress
from flows.naming import run_name
from tasks.score import BatchScoreResult, ScoringJob, ShardResult, finish_scoring, plan_scoring, score_shard

LOOPBACK = "127.0.0.1"


def local_cluster(**kwargs):
    """A ``distributed.LocalCluster`` on the loopback interface only (scheduler, workers; no
    dashboard), with worker processes that may start DataLoader worker processes themselves."""
    import dask
    from distributed import LocalCluster

    options = {"processes": True, "threads_per_worker": 1, "host": LOOPBACK, "dashboard_address": None,
               "worker_dashboard_address": None} | kwargs  # fmt: skip
    # Dask starts workers with OMP_NUM_THREADS=1; torch should use this worker's share of the cores.
    threads = str(max(1, (os.cpu_count() or 1) // max(1, int(options.get("n_workers") or 1))))
    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
    environ.update({"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})
    with dask.config.set({"distributed.worker.daemon": False, "distributed.nanny.pre-spawn-environ": environ}):
        return LocalCluster(**options)


def task_runner(dask_workers: int = 1, dask_address: str | None = None):
    """The task runner for the shards: see the module docstring."""
    if dask_address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=dask_address)
    if dask_workers >= 2:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(cluster_class=local_cluster, cluster_kwargs={"n_workers": dask_workers})
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=1)


def default_shards(dask_workers: int, dask_address: str | None) -> int:
    """One shard per worker process (each loads the model once); for an existing cluster, one per
    worker thread it has now."""
    if dask_address:
        from distributed import Client

        with Client(dask_address, timeout=30) as client:
            return max(1, sum(client.nthreads().values()))
    return max(1, dask_workers)


def _progress_bar(total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="img", desc="scoring", disable=None, dynamic_ncols=True)


# Seconds between updates of the Prefect progress artifact. Each update is an API write the server
# turns into a database row and an event: once a second, on a 2-core machine scoring with two
# workers, the driver and the server took that CPU from the workers. The terminal bar (when there
# is a terminal) still moves every POLL_SECONDS, from the shards' progress files.
PROGRESS_ARTIFACT_SECONDS = 10.0
POLL_SECONDS = 1.0


@flow(name="score-shards", log_prints=True)
def score_shards(job: ScoringJob, config: ScoreConfig) -> list[ShardResult]:
    """Map ``score-shard`` over the job's shards on this flow's task runner, with a progress bar
    (a terminal only) and a Prefect progress artifact fed from the shards' progress files."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    total = max(job.files, 1)
    artifact = create_progress_artifact(progress=0.0, key="scoring-progress", description=f"Scoring {job.files} files")
    futures = score_shard.map(unmapped(job), range(len(job.shard_lists)), unmapped(config))
    bar = _progress_bar(job.files, job.unchanged)  # files unchanged since scored are done already
    # Without a bar to move, look only as often as the artifact is updated; waiting longer does
    # not delay the end: wait() returns as soon as every shard is done.
    poll = POLL_SECONDS if not bar.disable else PROGRESS_ARTIFACT_SECONDS
    last = published = job.unchanged
    published_at = time.monotonic()
    try:
        while True:
            _, not_done = wait(futures, timeout=poll)
            seen = min(job.unchanged + read_progress(job.progress_dir), job.files)
            if seen != last:
                bar.update(seen - last)
                last = seen
            if not not_done:
                break
            if seen != published and time.monotonic() - published_at >= PROGRESS_ARTIFACT_SECONDS:
                update_progress_artifact(artifact, progress=100.0 * seen / total)
                published, published_at = seen, time.monotonic()
    finally:
        bar.close()
    results = [f.result() for f in futures]
    update_progress_artifact(artifact, progress=100.0)
    return results


@flow(name="score", flow_run_name=run_name("score", "input_dir"), log_prints=True)
def score(
    input_dir: str,
    model_uri: str = "models:/visionflow@champion",
    out: str = "predictions.parquet",
    config: ScoreConfig = ScoreConfig(),
    weights: str = "DEFAULT",
    dask_workers: int = 1,
    dask_address: str | None = None,
    shards: int | None = None,
    root: str | None = None,
    workers: int | None = None,
    engine: dict | str | None = None,
) -> BatchScoreResult:
    """Top-5 predictions for every input file, one row per file.

    ``input_dir``: a folder (recursive), a glob, a text file of paths or a manifest ``.parquet``
    (``root``: where a list's or manifest's relative paths start). ``model_uri``:
    ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, a checkpoint or package path, or
    ``torchvision/ARCH`` with ``weights`` (DEFAULT, a weights name, a file, or none).
    ``out``: ``*.parquet`` -> one file written at the end; otherwise a dataset folder of part files.
    ``config``: how to score (batching, device, precision, decoding, compile, part sizes).
    ``dask_workers``: Dask worker processes of a local cluster (1: in this process), or
    ``dask_address``, an existing cluster. Kept for one release: ``workers``, the old name of
    ``dask_workers``, and ``engine``, whose fields (compile, gpu_decode, loader, part_size,
    part_seconds) are now part of ``config``. ``engine`` as a string (auto, torch, openvino) is
    ``config.engine``: which runtime scores (see :class:`~cvlib.inference.options.ScoreConfig`).
    """
    if workers is not None:
        get_run_logger().warning("the score parameter 'workers' is deprecated; use 'dask_workers' (removed in the next release)")
        dask_workers = workers
    if isinstance(engine, str):
        config = config.model_copy(update={"engine": ScoreConfig.model_validate({"engine": engine}).engine})
    elif engine:
        get_run_logger().warning("the score parameter 'engine' is deprecated; its fields are part of 'config' now (removed in the next release)")
        config = ScoreConfig.model_validate(config.model_dump() | engine)
    job = plan_scoring(
        input_dir, model_uri, str(out), weights=weights, shards=shards or default_shards(dask_workers, dask_address), root=root,
        config=config,
    )
    t0 = time.perf_counter()
    runner = task_runner(dask_workers, dask_address)
    results = score_shards.with_options(task_runner=runner, flow_run_name=f"score-shards-{Path(str(input_dir)).name or 'run'}")(
        job, config
    )
    return finish_scoring(job, results, config, time.perf_counter() - t0)
