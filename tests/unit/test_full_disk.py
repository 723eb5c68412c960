"""A full disk mid-write: a checkpoint, a Parquet part of predictions, the HTML report.

The disk is real: a small tmpfs mounted for the test (root only; CI runs as root) and filled to
the last few kilobytes with a filler file, so writes fail with the kernel's own ENOSPC. For each
of the three writers: the previous good file stays intact and readable, the error is an
``OSError`` with errno ENOSPC whose message names the file, no temporary file is left, and once
the filler is deleted a rerun resumes (training from its last epoch, scoring from the parts
already written) and completes.
"""

from __future__ import annotations

import errno
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cvlib.explain.render import write_report
from cvlib.files.atomic import WriteFailed
from cvlib.inference.options import ScoreConfig
from cvlib.inference.output import PART_GLOB, read_predictions
from cvlib.inference.predict import score_to_parts
from cvlib.models.factory import create_model
from cvlib.training.checkpoint import load_checkpoint
from cvlib.training.fit import LAST, fit
from cvlib.training.records import EpochRecord
from tests.threads import one_torch_thread
from tests.unit.test_train import build_dataset, config

_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


class SmallDisk:
    """A mounted tmpfs that can be filled up to a few free bytes and freed again."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.filler = root / "filler.bin"

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def fill(self, leave: int = 0) -> None:
        """Leave at most ``leave`` bytes free (tmpfs counts whole pages)."""
        with open(self.filler, "ab") as f:
            chunk = b"\0" * 65536
            while self.free_bytes() > leave:
                try:
                    f.write(chunk[: max(4096, min(len(chunk), self.free_bytes() - leave))])
                    f.flush()
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def leftovers(self) -> list[str]:
        """Temporary files an atomic writer would leave behind (hidden ``.NAME.*.tmp``)."""
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob(".*.tmp"))


@pytest.fixture
def small_disk() -> Iterator[SmallDisk]:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root (the CI machine runs the tests as root)")
    root = Path(tempfile.mkdtemp(prefix="visionflow-small-disk-"))
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(root)], capture_output=True, text=True)
    if mounted.returncode != 0:
        root.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield SmallDisk(root)
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)
        root.rmdir()


def _no_space(exc: BaseException) -> OSError:
    """The ENOSPC error in ``exc`` or its causes."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return seen
        seen = seen.__cause__
    raise AssertionError(f"no ENOSPC in {exc!r}")


# --------------------------------------------------------------------------- checkpoint


def test_checkpoint_on_a_full_disk_keeps_the_last_good_one_and_training_resumes(small_disk, tmp_path):
    (tmp_path / "images").mkdir()
    root, manifest, names = build_dataset(tmp_path / "images")
    out = small_disk.root / "run"

    def train(epochs: int) -> list[int]:
        seen: list[EpochRecord] = []
        cfg = config(epochs=epochs)
        cfg.train.arch = "simple_cnn"  # small checkpoints: the disk is what is tested
        fit(data_root=root, manifest=manifest, class_names=names, train=cfg.train, augment=cfg.augment, out_dir=out,
            resume=True, on_epoch=seen.append)
        return [r.epoch for r in seen]

    assert train(1) == [1]  # records count epochs from 1
    good = (out / LAST).read_bytes()

    small_disk.fill(leave=0)
    with pytest.raises(OSError) as err:
        train(2)
    assert err.value.errno == errno.ENOSPC
    assert isinstance(err.value, WriteFailed)
    assert str(out) in str(err.value) and "no space left" in str(err.value)
    assert (out / LAST).read_bytes() == good and load_checkpoint(out / LAST)["epoch"] == 1
    assert small_disk.leftovers() == []

    small_disk.free()
    assert train(2) == [2]  # epoch 1 is not trained again
    assert load_checkpoint(out / LAST)["epoch"] == 2


# --------------------------------------------------------------------------- Parquet parts

CLASSES = ["red", "green", "blue"]
META = {
    "arch": "simple_cnn",
    "class_names": CLASSES,
    "preprocessing": {"image_size": 16, "resize_size": 16, "mean": [0.5] * 3, "std": [0.5] * 3},
    "head": {"hidden_dim": 16, "dropout": 0.0},
}


def _images(root: Path, n: int) -> list[str]:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    names = []
    for i in range(n):
        arr = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / f"img_{i:02d}.png")
        names.append(f"img_{i:02d}.png")
    return names


def test_parquet_part_on_a_full_disk_keeps_written_parts_and_scoring_resumes(small_disk, tmp_path):
    torch.manual_seed(0)
    model = create_model("simple_cnn", len(CLASSES), weights="none", hidden_dim=16, dropout=0.0).eval()
    files = _images(tmp_path / "in", 12)
    parts = small_disk.root / "preds"
    cfg = ScoreConfig(batch_size=4, part_size=4, num_workers=0, device="cpu", precision="fp32")

    def fill_after_first_part(done: int, total: int) -> None:
        if done == 0 or small_disk.filler.exists():
            return
        deadline = time.monotonic() + 30
        while not list(parts.glob(PART_GLOB)) and time.monotonic() < deadline:  # written by a thread
            time.sleep(0.02)
        small_disk.fill(leave=0)

    with pytest.raises(RuntimeError) as err:
        score_to_parts(model, META, tmp_path / "in", files, parts, model_version="1", config=cfg, progress=fill_after_first_part)
    assert _no_space(err.value).errno == errno.ENOSPC
    assert str(parts) in str(err.value) and "no space left" in str(err.value)
    written = sorted(parts.glob(PART_GLOB))
    assert len(written) == 1
    first = read_predictions(parts, "1")
    assert list(first["path"]) == files[:4]
    assert small_disk.leftovers() == []

    small_disk.free()
    stats = score_to_parts(model, META, tmp_path / "in", files, parts, model_version="1", config=cfg)
    assert stats.skipped == 4 and stats.processed == 8
    df = read_predictions(parts, "1")
    assert list(df["path"]) == files and (df["status"] == "ok").all()
    pd.testing.assert_frame_equal(df.head(4).reset_index(drop=True), first)  # the good part was kept as written


# --------------------------------------------------------------------------- the report


def test_report_on_a_full_disk_keeps_the_previous_report(small_disk):
    out = small_disk.root / "report" / "index.html"
    write_report("<html><body>first report</body></html>", out)

    small_disk.fill(leave=0)
    bigger = "<html><body>" + "<p>sample</p>" * 100_000 + "</body></html>"
    with pytest.raises(OSError) as err:
        write_report(bigger, out)
    assert err.value.errno == errno.ENOSPC
    assert str(out) in str(err.value)
    assert out.read_text() == "<html><body>first report</body></html>"
    assert small_disk.leftovers() == []

    small_disk.free()
    write_report(bigger, out)
    assert out.read_text() == bigger
