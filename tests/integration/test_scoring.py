"""The score flow on a real Prefect server: a Parquet dataset of part files, one row per input
file, a rerun that resumes instead of duplicating, the same rows from two Dask worker processes
as from one process, and the CLI with a torchvision model and a list of paths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cvlib.inference.options import ScoreConfig
from tests.integration.support import scoring_inputs

pytestmark = pytest.mark.store_agnostic  # the servers only record the runs (tests/conftest.py)


@pytest.fixture(scope="module")
def inputs(digits_dir, tmp_path_factory) -> Path:
    """30 real digits in sub-folders, plus a text file and an empty file that claim to be images."""
    root = scoring_inputs(digits_dir, tmp_path_factory.mktemp("score-inputs"), every=4, count=30)
    (root / "empty.png").write_bytes(b"")
    return root


def _rows(out: Path) -> pd.DataFrame:
    from cvlib.inference.output import read_predictions

    return read_predictions(out).drop(columns=["scored_at"]).reset_index(drop=True)


def _same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert a["path"].tolist() == b["path"].tolist()
    for col in ("status", "sha256", "width", "height", "top1_label", "model_version"):
        assert [None if pd.isna(x) else x for x in a[col]] == [None if pd.isna(x) else x for x in b[col]], col
    for pa_, pb in zip(a["top5_probs"], b["top5_probs"], strict=True):
        assert (pa_ is None) == (pb is None)
        if pa_ is not None:
            assert np.allclose(pa_, pb, atol=1e-5)


def _summary_markdown() -> str:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["scoring-summary"])),
                                      sort=ArtifactSort.CREATED_DESC, limit=1)
    return found[0].data


def test_dataset_output_one_row_per_file_and_rerun_resumes(on_prefect, inputs, checkpoint, tmp_path):
    from flows.score import score

    out = tmp_path / "predictions"
    cfg = ScoreConfig(num_workers=0, batch_size=8, precision="fp32", part_size=8)
    first = score(input_dir=str(inputs), model_uri=str(checkpoint), out=str(out), config=cfg)
    rows = _rows(out)
    assert (first.files, first.errors, first.skipped, first.layout) == (32, 2, 0, "dataset")
    assert len(rows) == 32 and rows["path"].is_unique
    assert rows.set_index("path").loc[["broken.jpg", "empty.png"], "status"].tolist() == ["not_an_image", "empty"]
    assert first.model_version.startswith("digits.pt-")  # a checkpoint's version is its content
    parts = sorted(out.glob("part-*.parquet"))
    assert len(parts) == 4 and not list((out / ".visionflow").glob("job-*"))  # shard lists cleaned up
    assert "| 32 | 30 | 2 | 0 |" in _summary_markdown()

    parts[1].unlink()  # as if the run had died before writing its second part
    again = score(input_dir=str(inputs), model_uri=str(checkpoint), out=str(out), config=cfg)
    assert (again.skipped, again.processed, again.files) == (24, 8, 32)
    _same(_rows(out), rows)


def test_old_parameter_names_work_for_one_release(on_prefect, inputs, checkpoint, tmp_path, monkeypatch):
    """Deployments written for the old flow: ``workers`` and an ``engine`` section still run."""
    import flows.score
    from flows.score import score

    warned: list[str] = []
    real = flows.score.get_run_logger

    class Recording:  # Prefect's run logger does not propagate to pytest's log capture
        def __getattr__(self, name):
            return getattr(real(), name)

        def warning(self, msg, *args):
            warned.append(msg % args if args else msg)

    monkeypatch.setattr(flows.score, "get_run_logger", Recording)

    out = tmp_path / "predictions"
    cfg = ScoreConfig(num_workers=0, batch_size=8, precision="fp32")
    result = score(input_dir=str(inputs), model_uri=str(checkpoint), out=str(out), config=cfg, workers=1, engine={"part_size": 16})
    assert (result.files, result.shards) == (32, 1)
    assert len(sorted(out.glob("part-*.parquet"))) == 2  # 32 rows in parts of 16: the engine's part_size was used
    assert any("'workers' is deprecated" in w for w in warned) and any("'engine' is deprecated" in w for w in warned)


def test_two_dask_workers_give_the_rows_of_one_process(on_prefect, inputs, checkpoint, tmp_path):
    """A 2-worker local Dask cluster (processes, one thread each, loopback only) given by its
    address: two shards, each worker loads the model once, same rows as one process."""
    pytest.importorskip("prefect_dask", reason="prefect-dask is not installed")
    from prefect_dask import DaskTaskRunner

    from flows.score import local_cluster, score, task_runner

    cfg = ScoreConfig(num_workers=0, batch_size=8, precision="fp32")
    one = tmp_path / "one.parquet"
    score(input_dir=str(inputs), model_uri=str(checkpoint), out=str(one), config=cfg)

    runner = task_runner(dask_workers=2)
    assert isinstance(runner, DaskTaskRunner) and runner.cluster_kwargs == {"n_workers": 2}
    with local_cluster(n_workers=2) as cluster:
        addresses = [cluster.scheduler_address, *cluster.scheduler_info["workers"]]
        assert len(addresses) == 3 and all(a.startswith("tcp://127.0.0.1:") for a in addresses), addresses
        two = tmp_path / "two"
        result = score(input_dir=str(inputs), model_uri=str(checkpoint), out=str(two), config=cfg,
                       dask_address=cluster.scheduler_address)
    assert result.shards == 2 and result.files == 32
    markdown = _summary_markdown()
    workers = markdown.split("Workers: ")[1].split(";")[0].split(", ")
    assert all(w.startswith("tcp://127.0.0.1:") for w in workers), workers
    _same(_rows(two), pd.read_parquet(one).drop(columns=["scored_at"]))


def test_cli_scores_a_list_with_a_torchvision_model(on_prefect, inputs, tmp_path, monkeypatch, capsys):
    from flows.cli import main

    listed = sorted(p for p in inputs.rglob("*") if p.is_file())[:6]
    paths = tmp_path / "paths.txt"
    paths.write_text("\n".join(str(p) for p in listed) + f"\n{inputs / 'no_such.jpg'}\n")
    out = tmp_path / "imagenet.parquet"
    code = main(["score", str(paths), "--model", "torchvision/resnet18", "--weights", "none", "--out", str(out),
                 "--loader-workers", "0", "--batch-size", "4"])
    assert code == 0, capsys.readouterr().err
    df = pd.read_parquet(out)
    assert len(df) == 7 and (df["model_version"] == "random-seed0").all() and (df["model_uri"] == "torchvision/resnet18").all()
    assert df.set_index("path").loc["no_such.jpg", "status"] == "missing"
    from cvlib.files.parquet import read_metadata

    assert len(json.loads(read_metadata(out)["visionflow.class_names"])) == 1000
    assert not (tmp_path / ".imagenet.parquet.parts").exists()

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    code = main(["score", str(paths), "--model", "torchvision/resnet18", "--out", str(tmp_path / "x.parquet")])
    err = capsys.readouterr().err
    if code == 0:
        pytest.skip("pretrained weights were available (network or cache)")
    assert code == 2 and "--weights none" in err and "Traceback" not in err
