"""What the scoring tasks hand to Prefect (parameters and results) must not grow with the number
of files (issue 15): a 100k-file job sends the API the same few records as a 10-file one. The
file lists travel as files next to the output; the tasks pass their paths and counts.

The task bodies run directly (``.fn``): the payloads are what Prefect would serialise.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from PIL import Image

from cvlib.inference.options import ScoreConfig
from tasks.score import plan_scoring, score_shard


def _folder(root: Path, n: int) -> Path:
    for i in range(n):
        d = root / f"c{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (12, 12), (i % 250, (7 * i) % 250, 40)).save(d / f"img{i:04d}.png")
    return root


def _payload(n: int, tmp_path: Path, checkpoint: Path) -> int:
    data = _folder(tmp_path / f"data{n}", n)
    config = ScoreConfig(batch_size=8, num_workers=0, part_size=16, device="cpu")
    job = plan_scoring.fn(str(data), str(checkpoint), str(tmp_path / "out"), shards=2)
    results = [score_shard.fn(job, shard, config) for shard in range(len(job.shard_lists))]
    assert sum(r.scored + r.errors for r in results) == n
    size = len(job.model_dump_json()) + sum(len(r.model_dump_json()) for r in results)
    shutil.rmtree(tmp_path / "out")
    return size


def test_scoring_task_payloads_do_not_grow_with_the_files(tmp_path, checkpoint):
    small, large = _payload(10, tmp_path, checkpoint), _payload(200, tmp_path, checkpoint)
    # Only numbers in the records change length (e.g. 10 -> 200 files, seconds): a few bytes.
    assert large - small < 40, (small, large)


def _run_job(data: Path, checkpoint: Path, out: Path, monkeypatch) -> tuple:
    from tasks import score as score_tasks

    monkeypatch.setattr(score_tasks, "create_markdown_artifact", lambda **kwargs: None)  # no flow run here
    config = ScoreConfig(batch_size=8, num_workers=0, part_size=16, device="cpu")
    job = plan_scoring.fn(str(data), str(checkpoint), str(out), shards=2)
    results = [score_tasks.score_shard.fn(job, shard, config) for shard in range(len(job.shard_lists))]
    return job, score_tasks.finish_scoring.fn(job, results, config, 1.0)


def test_unchanged_files_are_not_read_again(tmp_path, checkpoint, monkeypatch):
    import os

    import pandas as pd

    from cvlib.inference import decoding

    data = _folder(tmp_path / "data", 12)
    (data / "c0" / "broken.jpg").write_bytes(b"not a picture")
    for k, out in enumerate((tmp_path / "preds.parquet", tmp_path / "dataset"), 1):  # a single file and a dataset folder
        first_job, first = _run_job(data, checkpoint, out, monkeypatch)
        assert (first_job.unchanged, first.processed, first.files) == (0, 13, 13)

        opened: list[str] = []
        real = decoding.ScoringDataset.__getitem__
        monkeypatch.setattr(decoding.ScoringDataset, "__getitem__", lambda self, i: opened.append(self.files[i]) or real(self, i))
        job, again = _run_job(data, checkpoint, out, monkeypatch)
        assert (job.unchanged, again.processed, again.skipped, again.files) == (13, 0, 13, 13)
        assert opened == []  # not even read and hashed

        changed = data / "c1" / "img0001.png"
        Image.new("RGB", (12 + k, 12 + k), (1, 2, 3)).save(changed)
        os.utime(changed, ns=(k, k))
        job, third = _run_job(data, checkpoint, out, monkeypatch)
        assert (job.unchanged, third.processed) == (12, 1) and opened == ["c1/img0001.png"]
        rows = pd.read_parquet(out)
        assert len(rows) == 13 and rows["path"].is_unique
        monkeypatch.undo()
        if out.is_file():  # the output gone (the index stays): everything is scored again, nothing missing
            out.unlink()
            job, fourth = _run_job(data, checkpoint, out, monkeypatch)
            assert (job.unchanged, fourth.processed) == (0, 13)
