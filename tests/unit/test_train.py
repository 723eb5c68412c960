"""cvlib.training.fit.fit on a tiny real image folder (3 classes of 16x16 px colour/pattern images,
resnet18 from random init, 2 epochs of 2 steps each): checkpoints, history, repeatability, exact
resume after an interruption, and NaN handling.

The expensive runs are module-scoped fixtures shared by several tests: one uninterrupted run,
and a second one with the same seed interrupted after epoch 1, then resumed. A third run, in a
subprocess with DataLoader workers, is SIGKILLed after epoch 1 and resumed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from cvlib.config import RetrainConfig
from cvlib.data.ingest import build_manifest
from cvlib.data.manifest import class_names
from cvlib.data.options import AugmentConfig, DataConfig
from cvlib.training.checkpoint import load_checkpoint
from cvlib.training.fit import BEST, LAST, fit
from cvlib.training.options import TrainConfig
from cvlib.training.records import EpochRecord
from cvlib.training.step import TrainingDivergedError
from tests.threads import one_torch_thread

CLASSES = ("red_stripes", "green_checks", "blue_dots")
PER_CLASS = 8


def _image(cls: int, i: int, rng: np.random.Generator) -> Image.Image:
    """A class colour with a class pattern plus per-image noise (so no two files are equal)."""
    arr = np.zeros((24, 24, 3), dtype=np.int16)
    arr[..., cls] = 180
    yy, xx = np.mgrid[0:24, 0:24]
    if cls == 0:
        mask = (yy // 3) % 2 == 0
    elif cls == 1:
        mask = ((yy // 4) + (xx // 4)) % 2 == 0
    else:
        mask = ((yy % 6) - 3) ** 2 + ((xx % 6) - 3) ** 2 < 4
    arr[mask] += 60
    arr += rng.integers(-25, 26, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="RGB")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, pd.DataFrame, list[str]]:
    return build_dataset(tmp_path_factory.mktemp("images"))


def build_dataset(root: Path) -> tuple[Path, pd.DataFrame, list[str]]:
    """The tiny image folder both training test modules use, and its manifest."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir()
        for i in range(PER_CLASS):
            _image(c, i, rng).save(root / name / f"img_{i:02d}.png")
    manifest, _ = build_manifest(root, DataConfig(val_fraction=0.25), workers=2, near_duplicates=False)
    assert (manifest["status"] == "ok").all()
    splits = manifest["split"].value_counts()
    # The split is a pure function of the bytes above: fixed for this fixture. Two train steps
    # of 10 per epoch (no batch of one for BatchNorm) and a non-empty validation split.
    assert 11 <= splits["train"] <= 20 and splits["train"] % 10 != 1
    assert splits.get("val", 0) >= 2
    return root, manifest, class_names(manifest)


def config(epochs: int = 2, seed: int = 0, **train) -> RetrainConfig:
    return RetrainConfig(
        data=DataConfig(val_fraction=0.25),
        train=TrainConfig(
            arch="resnet18",
            weights="none",
            epochs=epochs,
            batch_size=10,
            lr=3e-3,
            warmup_epochs=0.5,
            hidden_dim=32,
            num_workers=0,
            progress=False,
            seed=seed,
            **train,
        ),
        augment=AugmentConfig(image_size=16, resize_ratio=1.125, rotation=10.0),
    )


@dataclass
class Run:
    out: Path
    result: object
    epochs_seen: list[EpochRecord]
    epoch1_weights: dict[str, torch.Tensor] | None = None


def _run(dataset, out: Path, cfg: RetrainConfig, **kwargs) -> Run:
    root, manifest, names = dataset
    seen: list[EpochRecord] = []
    on_epoch = kwargs.pop("on_epoch", seen.append)
    result = fit(data_root=root, manifest=manifest, class_names=names, train=cfg.train, augment=cfg.augment, out_dir=out,
                 on_epoch=on_epoch, **kwargs)
    return Run(out, result, seen)


def _link_copy(src: Path, dst: Path) -> Path:
    """A run folder whose files are symlinks to ``src``'s: resuming from it reads the old
    checkpoints, and any write (an ``os.replace``) swaps a link for a real file without touching
    ``src``. Cheaper than copying ~180 MB of resnet18 + AdamW state, and shows what was written."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).symlink_to(f)
    return dst


_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


@pytest.fixture(scope="module")
def straight(dataset, tmp_path_factory) -> Run:
    """Two epochs without interruption; the epoch-1 weights are kept for the repeatability test."""
    out = tmp_path_factory.mktemp("straight")
    seen: list[EpochRecord] = []
    epoch1: dict[str, torch.Tensor] = {}

    def on_epoch(record: EpochRecord) -> None:
        seen.append(record)
        if record.epoch == 1:
            epoch1.update(_weights(out / LAST))

    run = _run(dataset, out, config(), on_epoch=on_epoch, extra_meta={"dataset_hash": "abc"})
    return Run(out, run.result, seen, epoch1)


class _Interrupt(Exception):
    """Stands in for the process being killed right after an epoch's checkpoint."""


@pytest.fixture(scope="module")
def interrupted(dataset, tmp_path_factory) -> Path:
    """A second run with the same seed, stopped after epoch 1 (last.pt and best.pt of epoch 1
    on disk); kept pristine: tests resume from symlinked copies."""
    out = tmp_path_factory.mktemp("interrupted")

    def stop(record: EpochRecord) -> None:
        raise _Interrupt(record.epoch)

    with pytest.raises(_Interrupt):
        _run(dataset, out, config(), on_epoch=stop)
    return out


@pytest.fixture(scope="module")
def resumed(dataset, interrupted, tmp_path_factory) -> Run:
    out = _link_copy(interrupted, tmp_path_factory.mktemp("resumed") / "run")
    return _run(dataset, out, config(), resume=True)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.allclose(value.float(), b[key].float(), rtol=0, atol=1e-6), key


# --------------------------------------------------------------------------- a normal run


def test_fit_writes_best_and_last(straight):
    out = straight.out
    assert (out / BEST).is_file() and (out / LAST).is_file()
    assert Path(straight.result.best_checkpoint) == out / BEST
    assert Path(straight.result.last_checkpoint) == out / LAST
    assert not [p.name for p in out.iterdir() if p.name not in (BEST, LAST)]  # no temp files left


def test_history_has_one_record_per_epoch(straight):
    history = straight.result.history
    assert [h.epoch for h in history] == [1, 2]
    assert [h.epoch for h in straight.epochs_seen] == [1, 2]  # on_epoch called once per epoch
    for h in history:
        assert np.isfinite(h.train_loss) and h.train_loss > 0
        assert 0.0 <= h.train_top1 <= 1.0 and 0.0 <= h.val_top1 <= h.val_top5 <= 1.0
        assert h.seconds > 0
    # Per-iteration cosine: the lr at the end of the run is the floor (lr * min_lr_ratio).
    assert history[-1].lr == pytest.approx(3e-3 * 0.01)
    assert history[0].lr > history[-1].lr
    assert 1 <= straight.result.best_epoch <= 2
    assert straight.result.best_val_top1 == max(h.val_top1 for h in history)
    assert straight.result.device == "cpu"
    assert straight.result.to_dict()["history"][0]["epoch"] == 1


def test_checkpoints_carry_what_resume_and_scoring_need(straight, dataset):
    _, _, names = dataset
    last = load_checkpoint(straight.out / LAST)  # weights_only=True: plain data only
    assert {"model", "optimizer", "scheduler", "epoch", "history", "meta", "rng"} <= set(last)
    assert last["epoch"] == 2
    assert last["scheduler"]["last_epoch"] == 4  # 2 epochs x 2 steps, stepped per iteration
    meta = last["meta"]
    assert meta["arch"] == "resnet18" and meta["class_names"] == names
    assert meta["preprocessing"] == {"image_size": 16, "resize_size": 18, "mean": list(AugmentConfig().mean), "std": list(AugmentConfig().std)}
    assert meta["head"] == {"hidden_dim": 32, "dropout": 0.3}
    assert meta["config"]["train"]["epochs"] == 2
    assert meta["dataset_hash"] == "abc"  # extra_meta travels with the weights
    best = load_checkpoint(straight.out / BEST)
    assert best["epoch"] == straight.result.best_epoch
    if best["epoch"] == 2:
        _assert_same_weights(best["model"], last["model"])


def test_training_changes_the_weights(straight, dataset):
    """Guards the comparisons below: equal weights must not come from a loop that never steps."""
    _, _, names = dataset
    torch.manual_seed(0)
    from cvlib.models.factory import create_model

    init = create_model("resnet18", len(names), weights="none", hidden_dim=32, dropout=0.3).state_dict()
    trained = _weights(straight.out / LAST)
    assert not torch.equal(init["conv1.weight"], trained["conv1.weight"])
    assert not torch.equal(init["fc.4.weight"], trained["fc.4.weight"])


def test_same_seed_gives_identical_weights(straight, interrupted):
    """Two independent fit() calls with the same seed: identical weights after epoch 1 (the
    interrupted run stopped there), bit for bit on CPU."""
    assert straight.epoch1_weights
    _assert_same_weights(straight.epoch1_weights, _weights(interrupted / LAST))
    first = load_checkpoint(interrupted / LAST)["history"][0]
    assert first["train_loss"] == straight.result.history[0].train_loss


# --------------------------------------------------------------------------- resume


def test_interrupted_run_left_epoch_one(interrupted):
    state = load_checkpoint(interrupted / LAST)
    assert state["epoch"] == 1
    assert len(state["history"]) == 1
    assert (interrupted / BEST).is_file()


def test_resume_matches_the_uninterrupted_run(straight, resumed):
    """Killed after epoch 1, resumed: the final weights are those of the straight run
    (model, optimizer, scheduler and per-epoch RNG all restored)."""
    assert [h.epoch for h in resumed.result.history] == [1, 2]
    assert [h.epoch for h in resumed.epochs_seen] == [2]  # only the missing epoch was trained
    _assert_same_weights(_weights(straight.out / LAST), _weights(resumed.out / LAST))
    a, b = load_checkpoint(straight.out / LAST), load_checkpoint(resumed.out / LAST)
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]
    for h1, h2 in zip(straight.result.history, resumed.result.history):
        assert h1.train_loss == pytest.approx(h2.train_loss, abs=1e-6)
        assert h1.val_top1 == h2.val_top1 and h1.lr == pytest.approx(h2.lr)
    assert resumed.result.best_epoch == straight.result.best_epoch


def test_resume_of_a_finished_run_trains_nothing(dataset, straight, tmp_path):
    out = _link_copy(straight.out, tmp_path / "done")
    again = _run(dataset, out, config(), resume=True)
    assert again.epochs_seen == []
    assert [h.epoch for h in again.result.history] == [1, 2]
    assert all(p.is_symlink() for p in out.iterdir())  # nothing rewritten
    assert sorted(p.name for p in out.iterdir()) == [BEST, LAST]


# --------------------------------------------------------------------------- divergence


def test_nan_loss_stops_the_run_and_keeps_previous_checkpoints(dataset, interrupted, tmp_path, monkeypatch):
    """A NaN in epoch 2 raises TrainingDivergedError; best.pt and last.pt of epoch 1 are left
    untouched (still the symlinks to the epoch-1 files), and nothing else is written."""
    out = _link_copy(interrupted, tmp_path / "nan")
    calls = []

    def nan_forward(self, logits, targets):
        calls.append(1)
        return logits.sum() * float("nan")

    monkeypatch.setattr(nn.CrossEntropyLoss, "forward", nan_forward)
    with pytest.raises(TrainingDivergedError, match="epoch 2"):
        _run(dataset, out, config(), resume=True)
    assert calls == [1]  # stopped at the first bad batch
    assert sorted(p.name for p in out.iterdir()) == [BEST, LAST]
    assert all(p.is_symlink() for p in out.iterdir())
    assert load_checkpoint(out / LAST)["epoch"] == 1


def test_nan_loss_in_first_epoch_writes_no_checkpoint(dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(nn.CrossEntropyLoss, "forward", lambda self, logits, targets: logits.sum() / 0.0)
    out = tmp_path / "inf"
    with pytest.raises(TrainingDivergedError):
        _run(dataset, out, config())
    assert list(out.iterdir()) == []


def test_empty_training_split_is_an_error(dataset, tmp_path):
    root, manifest, names = dataset
    only_val = manifest.assign(split="val")
    cfg = config()
    with pytest.raises(ValueError, match="training split is empty"):
        fit(data_root=root, manifest=only_val, class_names=names, train=cfg.train, augment=cfg.augment, out_dir=tmp_path)


# --------------------------------------------------------------------------- a real kill

_KILLED_AFTER_EPOCH_1 = """
import sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)  # as in the parent (see _one_thread): reductions must add in the same order
from cvlib.config import RetrainConfig
from cvlib.data.manifest import class_names, read_manifest
from cvlib.training.fit import fit

root, manifest_path, config_path, out, ready = sys.argv[1:6]
manifest = read_manifest(manifest_path)

def wait_for_the_kill(record):
    Path(ready).write_text(str(record.epoch))
    time.sleep(600)  # SIGKILLed here: no exception, no cleanup, workers die with the group

cfg = RetrainConfig.model_validate_json(Path(config_path).read_text())
fit(data_root=root, manifest=manifest, class_names=class_names(manifest),
    train=cfg.train, augment=cfg.augment, out_dir=out, on_epoch=wait_for_the_kill)
"""


def test_sigkilled_process_resumes_to_the_uninterrupted_weights(dataset, straight, tmp_path):
    """A training process (with two DataLoader workers) SIGKILLed after its first epoch's
    checkpoints; a new fit() resumes from last.pt and ends with the weights of the straight run,
    which loaded in-process (workers do not change what a seed means)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root, manifest, _ = dataset
    manifest_path, config_path = tmp_path / "manifest.parquet", tmp_path / "config.json"
    manifest.to_parquet(manifest_path)
    cfg = config()
    cfg.train.num_workers = 2
    config_path.write_text(cfg.model_dump_json())
    out, ready = tmp_path / "run", tmp_path / "ready"
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_AFTER_EPOCH_1, str(root), str(manifest_path), str(config_path), str(out), str(ready)],
        env=dict(os.environ, PYTHONPATH=str(repo)), stderr=subprocess.PIPE, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the first epoch did not finish in time"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert load_checkpoint(out / LAST)["epoch"] == 1

    resumed = _run(dataset, out, cfg, resume=True)
    assert [h.epoch for h in resumed.epochs_seen] == [2]
    _assert_same_weights(_weights(straight.out / LAST), _weights(out / LAST))
    assert [h.train_loss for h in resumed.result.history] == [h.train_loss for h in straight.result.history]


def test_validate_model_writes_metrics_and_figures(straight, dataset, tmp_path):
    from cvlib.training.checkpoint import model_from_checkpoint
    from cvlib.training.validation import validate_model

    root, manifest, _ = dataset
    model, meta = model_from_checkpoint(straight.result.best_checkpoint)
    history = [asdict(r) for r in straight.epochs_seen]
    report = validate_model(model, meta, root, manifest, history, tmp_path, batch_size=8, num_workers=0)
    n_val = int(((manifest["split"] == "val") & (manifest["status"] == "ok")).sum())
    assert report.n == n_val > 0 and 0.0 <= report.metrics["val_top1"] <= 1.0
    assert {p.name for p in tmp_path.iterdir()} >= {"val_metrics.json", "confusion_matrix.png", "training_curves.png"}


def test_validate_model_without_a_validation_split_says_so(straight, dataset, tmp_path):
    from cvlib.training.checkpoint import model_from_checkpoint
    from cvlib.training.validation import validate_model

    root, manifest, _ = dataset
    model, meta = model_from_checkpoint(straight.result.best_checkpoint)
    no_val = manifest.assign(split=manifest["split"].replace("val", "train"))
    with pytest.raises(ValueError, match="val_fraction"):
        validate_model(model, meta, root, no_val, [], tmp_path)
