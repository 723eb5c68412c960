"""``torchrun`` training across GPUs or machines, tracked in MLflow: the launch of
:mod:`cvlib.training.ddp` (same flags and ``--config`` file as ``visionflow retrain``) with rank 0
logging one MLflow run.

On every node::

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint A:29400 \\
        --rdzv-id retrain-1 --max-restarts 1 \\
        -m flows.ddp /shared/photos --out /shared/runs/retrain-1 --config retrain.json

Rank 0 alone talks to MLflow (``MLFLOW_TRACKING_URI``, set it on every node: rank 0 may be on
any of them after a restart). It creates the run with the configuration as params (as
``visionflow retrain`` does, through :func:`tasks.registry.start_run`), logs each epoch's metrics
at step = epoch through :class:`tasks.tracking.MetricLogger` (buffered and retried: an MLflow
server that is away never stops training) and rank 0's machine use (``log_system_metrics``, as
retrain does), and at the end logs ``best.pt`` as the artifact
``checkpoint/best.pt`` and ends the run. The run id is kept in ``OUT/mlflow-run-id``, beside the
checkpoints: an attempt that torchrun restarts (or a relaunch into the same ``--out``) resumes
from ``last.pt`` *and* continues the same run, so its history holds each epoch once.

Registering and gating the model stays with ``visionflow``; this launcher trains and tracks.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from cvlib.training.ddp import Launch
from cvlib.training.ddp import main as launch_main
from cvlib.training.records import EpochRecord, FitResult

PROG = "python -m flows.ddp"
# Beside the checkpoints: the MLflow run every attempt of this launch logs into.
RUN_ID_FILE = "mlflow-run-id"
SOURCE = "visionflow ddp"


class MlflowTracker:
    """Rank 0's MLflow run for a launch (a :class:`cvlib.training.ddp.Tracker`).

    MLflow and Prefect are imported here, in rank 0's process only: the other ranks never load
    them, let alone reach the tracking server."""

    def __init__(self) -> None:
        self.run_id: str | None = None
        self._metrics = None  # tasks.tracking.MetricLogger, open while training runs
        self._open = ExitStack()  # the metric logger and the system-metrics monitor, closed at the end

    def started(self, launch: Launch) -> None:
        from tasks.log import run_logger
        from tasks.registry import system_metrics
        from tasks.tracking import MetricLogger
        from tasks.train import METRICS_SPOOL

        run_file = launch.out / RUN_ID_FILE
        self.run_id = _continued_run(run_file)
        continued = self.run_id is not None
        if self.run_id is None:
            self.run_id = _new_run(launch, run_file)
        else:
            run_logger().info("continuing MLflow run %s (from %s)", self.run_id, run_file)
        # Metrics the previous attempt queued but could not send are in the spool: sent first.
        self._metrics = self._open.enter_context(MetricLogger(self.run_id, spool=launch.out / METRICS_SPOOL))
        if continued:
            _backfill(self._metrics, launch.out)
        self._open.enter_context(system_metrics(self.run_id, launch.config.log_system_metrics))  # rank 0's machine

    def epoch(self, record: EpochRecord) -> None:
        from tasks.train import epoch_metrics

        self._metrics.log(epoch_metrics(record), step=record.epoch)

    def finished(self, result: FitResult) -> None:
        from tasks.registry import end_run, log_artifact, set_run_tag

        self._open.close()  # stops the monitor, waits until every queued metric is delivered (raises if it cannot)
        if result.stopped_early:
            set_run_tag(self.run_id, "visionflow.stopped_early", result.stop_reason or "true")
        log_artifact(self.run_id, result.best_checkpoint, "checkpoint")
        end_run(self.run_id)

    def failed(self, error: BaseException) -> None:
        """Send what was measured (for up to 30 s) and mark the run FAILED; a restarted attempt
        sets it running again."""
        from tasks.registry import end_run

        self._open.__exit__(type(error), error, error.__traceback__)  # never raises the delivery's error over this one
        if self.run_id is not None:
            try:
                end_run(self.run_id, "FAILED")
            except Exception:  # noqa: BLE001 - the training error is the one to report
                pass


def _continued_run(run_file: Path) -> str | None:
    """The run an earlier attempt created, set running again; None when there is none yet."""
    if not run_file.is_file():
        return None
    from tasks.registry import client

    run_id = run_file.read_text().strip()
    c = client()
    try:
        run = c.get_run(run_id)
    except Exception as exc:
        raise RuntimeError(
            f"{run_file} names MLflow run {run_id!r}, which the tracking server does not have ({exc}); "
            "use a new --out, or delete the file to start a new run"
        ) from exc
    if run.info.status != "RUNNING":
        c.update_run(run_id, status="RUNNING")
    return run_id


def _new_run(launch: Launch, run_file: Path) -> str:
    """A run made as ``visionflow retrain`` makes its own (params = the flattened configuration,
    data set tags), tagged as a torchrun launch; its id is written before the first epoch."""
    from cvlib.data.manifest import class_names, dataset_hash
    from cvlib.files.atomic import write_bytes_atomic
    from tasks.records import IngestResult
    from tasks.registry import client, start_run

    ingest = IngestResult(
        data_dir=str(Path(launch.data_dir).resolve()),
        manifest_path=str(launch.manifest_path),
        dataset_hash=dataset_hash(launch.manifest),
        class_names=class_names(launch.manifest),
        summary={},
    )
    run_id = start_run.fn(launch.config, ingest)
    c = client()
    c.set_tag(run_id, "mlflow.source.name", SOURCE)
    c.set_tag(run_id, "visionflow.world_size", str(launch.world_size))
    launch.out.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(run_file, run_id.encode())
    return run_id


def _backfill(metrics, out: Path) -> None:
    """Queue the completed epochs the run lacks, from ``last.pt``'s history, before any new one.

    An attempt killed after an epoch's ``last.pt`` was written but before its metrics were queued
    never trains that epoch again, so they come from here. Each epoch once: those still queued
    (from the spool) are read first, then those the server holds (read second, so a batch
    delivered in between is seen there)."""
    from cvlib.training.checkpoint import read_history
    from cvlib.training.fit import LAST
    from tasks.registry import client
    from tasks.train import epoch_metrics

    history = [EpochRecord(**h) for h in read_history(out / LAST)]
    if not history:
        return
    key = next(iter(epoch_metrics(history[0])))
    queued = metrics.queued_steps(key)
    done = queued | {m.step for m in client().get_metric_history(metrics.run_id, key)}
    missing = [r for r in history if r.epoch not in done]
    for record in missing:
        metrics.log(epoch_metrics(record), step=record.epoch)
    if missing:
        from tasks.log import run_logger

        run_logger().info("epochs %s were checkpointed but not logged: logged from %s", [r.epoch for r in missing], out / LAST)


def main(argv: list[str] | None = None) -> int:
    return launch_main(argv, tracker=MlflowTracker, prog=PROG, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    raise SystemExit(main())
