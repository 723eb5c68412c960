"""Distributed training on the CPU: two processes on the gloo backend, launched the way torchrun
launches them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), each running
``python -m cvlib.training.ddp``'s ``main`` with a little instrumentation around it (and a
recording :class:`cvlib.training.ddp.Tracker`, the hook ``python -m flows.ddp`` logs to MLflow with).

One run covers what DDP must guarantee: disjoint shards of every epoch, identical weights on both
ranks at the end (parameters, BatchNorm statistics and the EMA, across the head -> full phase
boundary where the DDP wrapper is rebuilt), checkpoints and epoch reports from rank 0 only, and
validation metrics equal to one process evaluating the whole validation split.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cvlib.config import RetrainConfig
from cvlib.data.options import AugmentConfig
from cvlib.models.factory import create_model
from cvlib.training.checkpoint import load_checkpoint
from cvlib.training.distributed import (
    DistInfo,
    all_reduce_sum,
    any_rank,
    barrier,
    info,
    init_from_env,
    is_main,
)
from cvlib.training.options import TrainConfig
from tests.unit.test_train import CLASSES, PER_CLASS, _image

REPO = Path(__file__).resolve().parents[2]
WORLD = 2

_RANK = r"""
import json, os, sys
from pathlib import Path
import torch
import cvlib.training.fit as train
from cvlib.data.datasets import EpochSampler

report = Path(sys.argv[1]) / f"rank{os.environ['RANK']}"
shards, saves, models, emas = [], [], [], []

real_iter = EpochSampler.__iter__
def recording_iter(self):
    pairs = list(real_iter(self))
    shards.append([i for i, _ in pairs])
    return iter(pairs)
EpochSampler.__iter__ = recording_iter

real_save = train.save_atomic
def recording_save(obj, path):
    saves.append(Path(path).name)
    return real_save(obj, path)
train.save_atomic = recording_save

real_create = train.create_model
def capturing_create(*args, **kwargs):
    models.append(real_create(*args, **kwargs))
    return models[-1]
train.create_model = capturing_create

class CapturingEma(train.ModelEma):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        emas.append(self)
train.ModelEma = CapturingEma

calls = []
class RecordingTracker:  # what the MLflow launcher (flows.ddp) plugs in
    def __init__(self): calls.append("built")
    def started(self, launch): calls.append(f"started, world of {launch.world_size}")
    def epoch(self, record): calls.append(f"epoch {record.epoch}")
    def finished(self, result): calls.append(f"finished at epoch {result.history[-1].epoch}")
    def failed(self, error): calls.append("failed")

from cvlib.training.ddp import main
main(sys.argv[2:], tracker=RecordingTracker)
torch.save({"model": models[-1].state_dict(), "ema": emas[-1].module.state_dict()}, str(report) + ".pt")
Path(str(report) + ".json").write_text(json.dumps({"shards": shards, "saves": saves, "tracker": calls}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    data = base / "images"
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (data / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            _image(c, i, rng).save(data / name / f"img_{i:02d}.png")
    torch.manual_seed(5)
    weights = base / "backbone.pt"  # "pretrained": two phases, so the DDP wrapper is rebuilt once
    torch.save(create_model("simple_cnn", len(CLASSES), weights="none", hidden_dim=16).state_dict(), weights)
    cfg = RetrainConfig(
        train=TrainConfig(arch="simple_cnn", weights=str(weights), epochs=2, batch_size=4, lr=3e-3, warmup_epochs=0.5,
                          hidden_dim=16, num_workers=0, progress=False, ema_decay=0.9),
        augment=AugmentConfig(image_size=16, resize_ratio=1.125, rotation=10.0, mixup_alpha=0.2),
    )
    cfg.data.val_fraction = 0.25
    (base / "config.json").write_text(cfg.model_dump_json())
    out, report = base / "run", base / "report"
    report.mkdir()
    port = _free_port()
    procs = []
    for rank in range(WORLD):
        env = dict(os.environ, PYTHONPATH=str(REPO), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                   LOCAL_WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo",
                   OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        cmd = [sys.executable, "-c", _RANK, str(report), str(data), "--out", str(out), "--config", str(base / "config.json"),
               "--backend", "gloo"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=300)
            outputs.append((p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (code, _, stderr) in enumerate(outputs):
        assert code == 0, f"rank {rank} failed:\n{stderr[-4000:]}"
    reports = [json.loads((report / f"rank{r}.json").read_text()) for r in range(WORLD)]
    states = [torch.load(report / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    return out, cfg, outputs, reports, states


def test_ranks_train_on_disjoint_shards_of_every_epoch(ddp_run):
    out, _, _, reports, _ = ddp_run
    from cvlib.data.manifest import read_manifest

    manifest = read_manifest(out / "manifest.parquet")  # built by rank 0, read by both
    n_train = int(((manifest["split"] == "train") & (manifest["status"] == "ok")).sum())
    assert [len(r["shards"]) for r in reports] == [2, 2]  # one shard per epoch
    for epoch in range(2):
        a, b = (reports[r]["shards"][epoch] for r in range(WORLD))
        assert len(a) == len(b) == -(-n_train // WORLD)
        if n_train % WORLD == 0:
            assert set(a).isdisjoint(b)
        assert set(a) | set(b) == set(range(n_train))
    assert reports[0]["shards"][0] != reports[0]["shards"][1]  # reshuffled per epoch


def test_both_ranks_end_with_identical_weights_statistics_and_ema(ddp_run):
    _, _, _, _, states = ddp_run
    for part in ("model", "ema"):
        a, b = states[0][part], states[1][part]
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (part, key)
    assert any("running_mean" in k for k in states[0]["model"])


def test_only_rank_zero_checkpoints_and_reports(ddp_run):
    out, _, outputs, reports, states = ddp_run
    assert reports[1]["saves"] == []
    assert sorted(set(reports[0]["saves"])) == ["best.pt", "last.pt"]
    assert "epoch 1:" in outputs[0][1] and "epoch 2:" in outputs[0][1]
    assert outputs[1][1].strip() == ""  # rank 1 prints nothing
    last = load_checkpoint(out / "last.pt")
    assert last["epoch"] == 2
    for key, value in states[0]["model"].items():
        assert torch.equal(last["model"][key], value), key


def test_only_rank_zero_builds_and_calls_the_tracker(ddp_run):
    _, _, _, reports, _ = ddp_run
    assert reports[1]["tracker"] == []  # never even built on rank 1: it cannot reach what a tracker talks to
    assert reports[0]["tracker"] == ["built", "started, world of 2", "epoch 1", "epoch 2", "finished at epoch 2"]


def test_validation_metrics_equal_one_process_on_the_whole_split(ddp_run):
    out, cfg, outputs, _, states = ddp_run
    from cvlib.data.datasets import ManifestDataset, make_loader
    from cvlib.data.manifest import class_names, read_manifest
    from cvlib.data.transforms import EvalPreset, resize_size_for
    from cvlib.training.evaluate import evaluate

    result = json.loads(outputs[0][1].strip().splitlines()[-1])
    assert result["world_size"] == WORLD
    final = result["history"][-1]
    manifest = read_manifest(out / "manifest.parquet")
    ac = cfg.augment
    ds = ManifestDataset(out.parent / "images", manifest, "val",
                         EvalPreset(image_size=ac.image_size, resize_size=resize_size_for(ac), mean=ac.mean, std=ac.std),
                         draft_size=2 * resize_size_for(ac))
    assert len(ds) >= WORLD
    model = create_model("simple_cnn", len(class_names(manifest)), weights="none", hidden_dim=16)
    model.load_state_dict(states[0]["ema"])  # with EMA on, the EMA weights are what is validated
    ev = evaluate(model, make_loader(ds, batch_size=64, num_workers=0), torch.device("cpu"))
    # Same counts of hits (one process computes the fractions in float32, the reduction in float64).
    assert round(final["val_top1"] * ev.n) == round(ev.top1 * ev.n)
    assert final["val_top1"] == pytest.approx(ev.top1, abs=1e-6)
    assert final["val_top5"] == pytest.approx(ev.top5, abs=1e-6)
    assert final["val_loss"] == pytest.approx(ev.loss, rel=1e-5)


# --------------------------------------------------------------------------- single process


def test_helpers_are_identities_in_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_from_env() == DistInfo(0, 1, 0)
    assert info() == DistInfo() and is_main()
    barrier()
    assert all_reduce_sum([1.5, 2]) == [1.5, 2.0]
    assert any_rank(torch.tensor(True)) and not any_rank(False)
