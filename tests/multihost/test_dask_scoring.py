"""``visionflow score --dask-address`` on a real Dask cluster across three hosts.

Host A runs the Prefect server, the ``dask scheduler`` and the ``visionflow`` client; hosts B and
C run one ``dask worker`` each (one process, one thread). The rows equal a one-process run's; a
worker SIGKILLed after its first part file costs nothing but time (Dask reruns its shard on the
other worker, which skips the rows already written); a client SIGKILLed mid-run is resumed by a
rerun that scores only what is missing.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.integration.support import scoring_inputs
from tests.multihost.conftest import DaskCluster, kill_group, tail

pytestmark = pytest.mark.slow

MODEL = "torchvision/resnet18"  # random weights from a fixed seed: the same model on every host
FLAGS = ["--weights", "none", "--loader-workers", "0", "--batch-size", "2", "--part-size", "2", "--precision", "fp32"]
FILES = 41  # 40 digits and one unreadable file


@pytest.fixture(scope="module")
def images(digits_dir, tmp_path_factory) -> Path:
    return scoring_inputs(digits_dir, tmp_path_factory.mktemp("multihost-images"), every=3, count=40)


@pytest.fixture(scope="module")
def reference(images) -> pd.DataFrame:
    """The rows of a one-process run (no Prefect, no Dask), sorted by path."""
    from cvlib.inference.options import ScoreConfig
    from cvlib.inference.predict import score_folder
    from cvlib.models.zoo import imagenet_model

    model, meta = imagenet_model("resnet18", "none")
    cfg = ScoreConfig(num_workers=0, batch_size=2, precision="fp32")
    df = score_folder(model, meta, images, model_uri=MODEL, model_version=meta["version"], config=cfg)
    return df.drop(columns=["scored_at"]).sort_values("path").reset_index(drop=True)


def _client(cluster: DaskCluster, images: Path, out: Path, log: Path) -> subprocess.Popen:
    a = cluster.hosts[0]
    cmd = [sys.executable, "-m", "flows.cli", "score", str(images), "--model", MODEL, "--out", str(out),
           "--dask-address", cluster.address, *FLAGS]  # fmt: skip
    return a.popen(cmd, env=cluster.env(a), log=log)


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 240) -> str:
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise AssertionError(f"the client did not finish in {timeout}s:\n{tail(log)}") from None
    assert code == 0, tail(log)
    return log.read_text(errors="replace")


def _rows(out: Path) -> pd.DataFrame:
    from cvlib.inference.output import read_predictions

    return read_predictions(out).drop(columns=["scored_at"]).reset_index(drop=True)


def _assert_same(rows: pd.DataFrame, reference: pd.DataFrame) -> None:
    assert len(rows) == FILES and rows["path"].is_unique, rows["path"].tolist()
    assert rows["path"].tolist() == reference["path"].tolist()
    for col in ("status", "sha256", "width", "height", "top1_label", "top1_index", "model_version"):
        assert [None if pd.isna(x) else x for x in rows[col]] == [None if pd.isna(x) else x for x in reference[col]], col
    for got, want in zip(rows["top5_probs"], reference["top5_probs"], strict=True):
        assert (got is None) == (want is None)
        if got is not None:
            assert np.allclose(got, want, atol=1e-5)


def _leftovers(out: Path) -> list[str]:
    """Temporary part files and job folders (hidden names) left in the output."""
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith("job-"))


def _shards_with_parts(out: Path) -> dict[str, set[str]]:
    """shard -> the tokens of its part files (one token per attempt at the shard)."""
    shards: dict[str, set[str]] = {}
    for p in out.glob("part-*.parquet"):
        _, shard, token, _ = p.stem.split("-")
        shards.setdefault(shard, set()).add(token)
    return shards


def _wait_for(cond, proc: subprocess.Popen, log: Path, timeout: float = 180, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the client ended ({proc.returncode}) before {what}:\n{tail(log)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{tail(log)}")
        time.sleep(0.05)


def test_a_killed_client_is_resumed_by_a_rerun(dask_cluster, images, reference, tmp_path):
    """SIGKILL the visionflow process after the first part files: a rerun from host A scores only
    the files without a row and ends with one row per file."""
    out, log = tmp_path / "predictions", tmp_path / "client.log"
    client = _client(dask_cluster, images, out, log)
    _wait_for(lambda: len(list(out.glob("part-*.parquet"))) >= 2, client, log, what="two part files")
    kill_group(client)
    dask_cluster.wait_idle()  # Dask cancelled the dead client's shards; they stop after their batch
    rerun_log = tmp_path / "rerun.log"
    text = _finish(_client(dask_cluster, images, out, rerun_log), rerun_log)
    _assert_same(_rows(out), reference)
    assert _leftovers(out) == []
    resumed = int(re.search(r"resumed\W+(\d+) already scored", text).group(1))
    assert 0 < resumed < FILES, text  # before the workers stopped abandoned shards: 41 (they finished the job)
    assert "stopped after" in dask_cluster.worker_logs()  # the abandoned shards said why they stopped


def test_a_worker_killed_after_its_first_part_loses_nothing(dask_cluster, images, reference, tmp_path):
    """SIGKILL host C's worker (nanny and process) once both shards have a part file: Dask reruns
    C's shard on B, which skips C's rows; one row per file, no temporary files."""
    out, log = tmp_path / "predictions", tmp_path / "client.log"
    client = _client(dask_cluster, images, out, log)
    _wait_for(lambda: len(_shards_with_parts(out)) == 2, client, log, what="both shards wrote a part")
    kill_group(dask_cluster.workers["c"])
    text = _finish(client, log)
    _assert_same(_rows(out), reference)  # the rows of one process, after all that
    attempts = _shards_with_parts(out)
    assert sorted(len(t) for t in attempts.values()) == [1, 2], attempts  # C's shard: two attempts, the second resumed
    assert _leftovers(out) == []
    resumed = int(re.search(r"resumed\W+(\d+) already scored", text).group(1))
    assert 0 < resumed < FILES
