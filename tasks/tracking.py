"""Per-epoch metrics that survive the tracking server going away.

Training logs one small batch of metrics per epoch. Sent synchronously, an MLflow server that
stops for a minute either stalls training inside MLflow's own HTTP retries (up to ~4 minutes with
its defaults: MLFLOW_HTTP_REQUEST_MAX_RETRIES=7, backoff factor 2) or, past that, raises out of
the epoch callback and kills a run that may have trained for hours.

:class:`MetricLogger` decouples the two: :meth:`MetricLogger.log` stamps each metric with its step
and wall-clock time *when it happens* and queues it; one sender thread delivers the queue in
order, retrying with backoff for as long as the server is away. Resending a batch whose answer was lost
is harmless: MLflow's SQL store skips a metric identical to one it holds (same key, value,
timestamp and step). So the run's metric history ends
up complete and in the right order (MLflow sorts a metric's history by step and timestamp, not
by arrival), and training never waits for the server.

Unsent metrics are also kept in a spool file (JSON lines, rewritten atomically) beside the
checkpoints: when the process dies while the server is away, or :meth:`MetricLogger.close`
gives up waiting, the next attempt (which resumes from the checkpoint) sends them first.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType

from cvlib.files.atomic import write_bytes_atomic
from tasks.log import run_logger

# How long the end of training waits for a tracking server that is away before giving up
# (the metrics stay in the spool file for the next attempt).
FLUSH_TIMEOUT_S = 600.0
# Backoff between delivery attempts while the server is away: doubling from MIN to MAX.
RETRY_MIN_S = 1.0
RETRY_MAX_S = 10.0
# MLflow's log_batch accepts at most 1000 metrics per call.
BATCH_LIMIT = 1000
SEND_TIMEOUT_S = 30
LOG_BATCH = "/api/2.0/mlflow/runs/log-batch"


@dataclass(frozen=True)
class PendingMetric:
    key: str
    value: float
    timestamp_ms: int
    step: int


class MetricsNotDelivered(RuntimeError):
    """The tracking server did not take the buffered metrics before the deadline."""


def _mlflow_sender(run_id: str) -> Callable[[list[PendingMetric]], None]:
    """Send one batch with ``log-batch``. Against a tracking server, one attempt without MLflow's
    own HTTP retries (they would hold the sender for minutes after the server is back, and a
    closing logger could not stop it): :class:`MetricLogger` retries with its own backoff. A
    local store (``sqlite:``, a folder) goes through the client."""
    from mlflow.entities import Metric

    from tasks.registry import client

    c = client()
    store = c._tracking_client.store  # the client's store for this tracking URI
    host_creds = getattr(store, "get_host_creds", None)

    def send(batch: list[PendingMetric]) -> None:
        metrics = [Metric(m.key, m.value, m.timestamp_ms, m.step) for m in batch]
        if host_creds is None:
            c.log_batch(run_id, metrics=metrics)
            return
        from mlflow.protos.service_pb2 import LogBatch
        from mlflow.utils.proto_json_utils import message_to_json
        from mlflow.utils.rest_utils import http_request, verify_rest_response

        body = json.loads(message_to_json(LogBatch(run_id=run_id, metrics=[m.to_proto() for m in metrics])))
        response = http_request(host_creds(), LOG_BATCH, "POST", max_retries=0, timeout=SEND_TIMEOUT_S, json=body)
        verify_rest_response(response, LOG_BATCH)

    return send


def _refused(exc: BaseException) -> bool:
    """An HTTP 4xx answer other than timeout / too many requests: the server is there and says no."""
    from mlflow.exceptions import MlflowException

    if not isinstance(exc, MlflowException):
        return False
    status = exc.get_http_status_code()
    return 400 <= status < 500 and status not in (408, 429)


class MetricLogger:
    """Buffered, retried, ordered metric logging into one MLflow run (see the module doc).

    Use as a context manager around training; leaving it flushes (waits up to
    ``flush_timeout`` seconds for the server) and raises :class:`MetricsNotDelivered` if metrics
    are still unsent, so the run is not ended with a silent gap.
    """

    def __init__(
        self, run_id: str, *, spool: str | Path | None = None, send: Callable[[list[PendingMetric]], None] | None = None,
        flush_timeout: float = FLUSH_TIMEOUT_S, retry_min: float = RETRY_MIN_S, retry_max: float = RETRY_MAX_S,
    ) -> None:  # fmt: skip
        self.run_id = run_id
        self.spool = Path(spool) if spool is not None else None
        self.flush_timeout, self.retry_min, self.retry_max = flush_timeout, retry_min, retry_max
        self._send = send or _mlflow_sender(run_id)
        self._pending: list[PendingMetric] = self._read_spool()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closing = False
        self._stopped = False  # set by close() when it stops waiting
        self._refusal: BaseException | None = None  # a permanent error: the sender stopped
        self._failing_since: float | None = None
        self._last_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"visionflow-metrics-{run_id[:8]}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ producer side

    def log(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Queue ``metrics`` at ``step``, timestamped now; returns at once."""
        now = int(time.time() * 1000)
        new = [PendingMetric(k, float(v), now, int(step or 0)) for k, v in metrics.items()]
        with self._wake:
            self._pending.extend(new)
            self._write_spool_locked()
            self._wake.notify()

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def queued_steps(self, key: str) -> set[int]:
        """The steps of ``key`` still waiting to be delivered (including those read from the spool)."""
        with self._lock:
            return {m.step for m in self._pending if m.key == key}

    def close(self, timeout: float | None = None) -> None:
        """Deliver everything queued, waiting up to ``timeout`` (default ``flush_timeout``) seconds."""
        deadline = time.monotonic() + (self.flush_timeout if timeout is None else timeout)
        with self._wake:
            self._closing = True
            self._wake.notify()
            while self._pending and self._refusal is None and time.monotonic() < deadline:
                self._wake.wait(min(1.0, max(0.0, deadline - time.monotonic())))
            left, error = len(self._pending), self._last_error
            self._stopped = True
            self._wake.notify_all()
        # A sender still inside MLflow's own HTTP retries is a daemon thread: not waited for.
        self._thread.join(timeout=5)
        if left:
            where = f"; they are kept in {self.spool} and sent by the next attempt" if self.spool else ""
            raise MetricsNotDelivered(
                f"{left} metrics of MLflow run {self.run_id} were not delivered within "
                f"{self.flush_timeout if timeout is None else timeout:.0f}s (last error: {error}){where}"
            )

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # training failed: still try to send what it measured, but never hide its error
            self.close(timeout=min(30.0, self.flush_timeout))
        except MetricsNotDelivered as not_sent:
            run_logger().warning("%s", not_sent)

    # ------------------------------------------------------------------ sender thread

    def _run(self) -> None:
        delay = self.retry_min
        while True:
            with self._wake:
                while not self._pending and not self._closing:
                    self._wake.wait()
                if self._stopped or not self._pending:  # close() gave up, or closing with nothing left
                    return
                batch = self._pending[:BATCH_LIMIT]
            try:
                self._send(batch)
            except Exception as exc:  # noqa: BLE001 - any failure to deliver means: keep it and retry
                if _refused(exc):  # the server answered "no" (a deleted run, a bad value): retrying cannot help
                    with self._wake:
                        self._last_error, self._refusal = exc, exc
                        self._wake.notify_all()
                    run_logger().error("MLflow refused metrics of run %s: %s", self.run_id, exc)
                    return
                self._failed(exc)
                with self._wake:
                    self._wake.wait_for(lambda: self._stopped, timeout=delay)
                delay = min(self.retry_max, delay * 2)
                continue
            delay = self.retry_min
            with self._wake:
                del self._pending[: len(batch)]
                self._write_spool_locked()
                if self._failing_since is not None:
                    run_logger().info("MLflow is back after %.0fs: buffered metrics delivered", time.monotonic() - self._failing_since)
                    self._failing_since, self._last_error = None, None
                self._wake.notify_all()

    def _failed(self, exc: BaseException) -> None:
        with self._lock:
            first = self._failing_since is None
            if first:
                self._failing_since = time.monotonic()
            self._last_error = exc
            n = len(self._pending)
        if first:
            run_logger().warning("MLflow did not take metrics (%s); training goes on, %d metrics buffered and retried", exc, n)

    # ------------------------------------------------------------------ spool file

    def _read_spool(self) -> list[PendingMetric]:
        if self.spool is None or not self.spool.is_file():
            return []
        lines = [ln for ln in self.spool.read_text().splitlines() if ln.strip()]
        return [PendingMetric(**json.loads(ln)) for ln in lines]

    def _write_spool_locked(self) -> None:
        if self.spool is None:
            return
        if not self._pending:
            self.spool.unlink(missing_ok=True)
            return
        write_bytes_atomic(self.spool, "".join(json.dumps(asdict(m)) + "\n" for m in self._pending).encode())
