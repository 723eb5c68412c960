"""The production features of cvlib.training.fit.fit around the basic loop (tests/unit/test_train.py):
the seeded input pipeline with workers, two-phase fine-tuning from a pretrained file, MixUp/CutMix,
EMA, TrivialAugment/RandomErasing, early stopping, and the CUDA input path (skipped without a GPU).

Training runs use the small simple_cnn on 16 px images (a few hundred milliseconds an epoch), so the
whole module stays within seconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torchvision.transforms import v2

from cvlib.config import RetrainConfig
from cvlib.data.datasets import (
    EpochSampler,
    ManifestDataset,
    ShardSampler,
    make_loader,
    sample_seed,
)
from cvlib.data.options import IMAGENET_MEAN, IMAGENET_STD, AugmentConfig, DataConfig
from cvlib.data.transforms import TrainPreset, train_preset
from cvlib.models.factory import create_model, head_parameters
from cvlib.training.checkpoint import load_checkpoint
from cvlib.training.fit import BEST, LAST, fit
from cvlib.training.loaders import batch_mixer, train_draft_size
from cvlib.training.options import TrainConfig
from cvlib.training.phases import phase_param_groups, resolved_backbone_lr_ratio, resolved_head_epochs
from tests.unit.test_train import _image, build_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, pd.DataFrame, list[str]]:
    return build_dataset(tmp_path_factory.mktemp("images"))


def config(epochs: int = 2, augment: dict | None = None, **train) -> RetrainConfig:
    opts = {"arch": "simple_cnn", "weights": "none", "epochs": epochs, "batch_size": 8, "lr": 3e-3, "warmup_epochs": 0.5,
            "hidden_dim": 16, "num_workers": 0, "progress": False, "seed": 0}
    opts.update(train)
    return RetrainConfig(
        data=DataConfig(val_fraction=0.25),
        train=TrainConfig(**opts),
        augment=AugmentConfig(image_size=16, resize_ratio=1.125, rotation=10.0, **(augment or {})),
    )


def _fit(dataset, out: Path, cfg: RetrainConfig, **kwargs):
    root, manifest, names = dataset
    return fit(data_root=root, manifest=manifest, class_names=names, train=cfg.train, augment=cfg.augment, out_dir=out,
               **kwargs)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def pretrained(dataset, tmp_path_factory) -> Path:
    """A 'pretrained' simple_cnn backbone file, as a user would pass with --weights PATH."""
    torch.manual_seed(123)
    model = create_model("simple_cnn", 3, weights="none", hidden_dim=16)
    path = tmp_path_factory.mktemp("weights") / "backbone.pt"
    torch.save(model.state_dict(), path)
    return path


# --------------------------------------------------------------------------- input pipeline


def test_epoch_sampler_shards_are_disjoint_and_seeds_depend_on_epoch_and_index_only():
    data = list(range(10))
    shards = [list(EpochSampler(data, seed=5, num_replicas=2, rank=r)) for r in (0, 1)]
    idx = [[i for i, _ in s] for s in shards]
    assert len(idx[0]) == len(idx[1]) == 5
    assert set(idx[0]).isdisjoint(idx[1]) and set(idx[0]) | set(idx[1]) == set(data)
    for i, s in shards[0] + shards[1]:
        assert s == sample_seed(5, i)  # epoch 0: seed + 0
    one = EpochSampler(data, seed=5)
    first = list(one)
    one.set_epoch(1)
    second = list(one)
    assert [i for i, _ in first] != [i for i, _ in second]  # a new shuffle each epoch
    assert dict(second) == {i: sample_seed(6, i) for i in data}
    assert sorted(i for i, _ in first) == data
    assert list(ShardSampler(7, rank=1, num_replicas=3)) == [1, 4]


def test_seeded_item_is_reproducible_and_leaves_the_global_generators_alone(dataset):
    root, manifest, _ = dataset
    ds = ManifestDataset(root, manifest, "train", train_preset(AugmentConfig(image_size=16)))
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a, _ = ds[(0, 42)]
    b, _ = ds[(0, 42)]
    c, _ = ds[(0, 43)]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), before)


def test_workers_give_the_same_batches_as_the_main_process(dataset):
    """Persistent workers over two epochs: the same tensors as loading in-process."""
    root, manifest, _ = dataset
    ds = ManifestDataset(root, manifest, "train", train_preset(AugmentConfig(image_size=16)))

    def epochs(workers: int) -> list[torch.Tensor]:
        sampler = EpochSampler(ds, seed=7)
        loader = make_loader(ds, batch_size=4, sampler=sampler, num_workers=workers, persistent_workers=workers > 0,
                             prefetch_factor=2 if workers else None)
        out = []
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            out += [x for x, _ in loader]
        return out

    in_process, with_workers = epochs(0), epochs(2)
    assert len(in_process) == len(with_workers)
    assert all(torch.equal(a, b) for a, b in zip(in_process, with_workers))


def test_train_draft_size_keeps_the_smallest_crop_at_full_resolution():
    assert train_draft_size(AugmentConfig(image_size=128, scale_min=0.5)) == 182
    assert train_draft_size(AugmentConfig(image_size=224, scale_min=1.0)) == 224


# --------------------------------------------------------------------------- augmentation options


def test_augmentation_options_are_off_by_default():
    a = AugmentConfig()
    assert (a.trivial_augment, a.random_erase, a.mixup_alpha, a.cutmix_alpha) == (False, 0.0, 0.0, 0.0)
    t = TrainConfig()
    assert (t.head_epochs, t.backbone_lr_ratio, t.ema_decay, t.early_stopping_patience) == (None, None, None, None)
    assert batch_mixer(a, 3) is None


def test_trivial_augment_and_random_erasing_in_the_preset():
    plain = TrainPreset(image_size=16, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    full = TrainPreset(image_size=16, mean=IMAGENET_MEAN, std=IMAGENET_STD, trivial_augment=True, random_erase=1.0)
    steps = full.transforms.transforms
    assert len(steps) == len(plain.transforms.transforms) + 2
    assert isinstance(steps[-1], v2.RandomErasing)  # on the normalised tensor
    assert any(isinstance(s, v2.TrivialAugmentWide) for s in steps)
    img = _image(0, 0, np.random.default_rng(1))
    torch.manual_seed(0)
    out = full(img)
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    assert (out == 0).any()  # the erased rectangle
    cfg = AugmentConfig(image_size=16, trivial_augment=True, random_erase=0.25)
    assert len(train_preset(cfg).transforms.transforms) == len(steps)


@pytest.mark.parametrize(("mixup", "cutmix", "kind"), [(0.2, 0.0, v2.MixUp), (0.0, 1.0, v2.CutMix), (0.2, 1.0, v2.RandomChoice)])
def test_batch_mixer_gives_soft_targets(mixup, cutmix, kind):
    mix = batch_mixer(AugmentConfig(mixup_alpha=mixup, cutmix_alpha=cutmix), 3)
    assert isinstance(mix, kind)
    torch.manual_seed(0)
    images, targets = mix(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 1]))
    assert images.shape == (4, 3, 8, 8) and targets.shape == (4, 3)
    assert torch.allclose(targets.sum(1), torch.ones(4))


# --------------------------------------------------------------------------- two phases


def test_phase_defaults_follow_the_weights():
    assert resolved_head_epochs(TrainConfig(weights="DEFAULT", epochs=5)) == 1
    assert resolved_head_epochs(TrainConfig(weights="DEFAULT", epochs=1)) == 0  # never the whole run
    assert resolved_head_epochs(TrainConfig(weights="none", epochs=5)) == 0
    assert resolved_head_epochs(TrainConfig(weights="none", epochs=5, head_epochs=2)) == 2
    assert resolved_head_epochs(TrainConfig(epochs=4, freeze_backbone=True)) == 4
    assert resolved_backbone_lr_ratio(TrainConfig(weights="DEFAULT")) == pytest.approx(0.1)
    assert resolved_backbone_lr_ratio(TrainConfig(weights="none")) == 1.0
    assert resolved_backbone_lr_ratio(TrainConfig(weights="none", backbone_lr_ratio=0.5)) == 0.5


def test_phase_param_groups_split_head_and_backbone_then_decay():
    model = create_model("simple_cnn", 3, weights="none", hidden_dim=8)
    groups = phase_param_groups(model, 0.05, lr=1e-3, backbone_lr=1e-4)
    assert [g["name"] for g in groups] == ["head.decay", "head.no_decay", "backbone.decay", "backbone.no_decay"]
    assert [g["lr"] for g in groups] == [1e-3, 1e-3, 1e-4, 1e-4]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0, 0.05, 0.0]
    head = {id(p) for p in head_parameters(model)}
    assert {id(p) for g in groups[:2] for p in g["params"]} == head
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    torch.optim.AdamW(groups, lr=1e-3)


@pytest.fixture(scope="module")
def full_recipe(dataset, pretrained, tmp_path_factory):
    """Pretrained file (two phases: head, then all), EMA, MixUp + CutMix, TrivialAugment and
    RandomErasing, two workers: an uninterrupted run, and one interrupted after epoch 1 (the
    phase boundary) then resumed in-process."""
    cfg = config(
        weights=str(pretrained), ema_decay=0.9, num_workers=2,
        augment={"mixup_alpha": 0.2, "cutmix_alpha": 1.0, "trivial_augment": True, "random_erase": 0.25},
    )
    straight_dir = tmp_path_factory.mktemp("recipe-straight")
    epoch1: dict[str, torch.Tensor] = {}
    records = []

    def keep(record):
        records.append(record)
        if record.epoch == 1:
            epoch1.update(load_checkpoint(straight_dir / LAST)["model"])

    straight = _fit(dataset, straight_dir, cfg, on_epoch=keep)

    class Stop(Exception):
        pass

    def stop(record):
        raise Stop

    resumed_dir = tmp_path_factory.mktemp("recipe-resumed")
    with pytest.raises(Stop):
        _fit(dataset, resumed_dir, cfg, on_epoch=stop)
    resumed = _fit(dataset, resumed_dir, cfg, resume=True)
    return cfg, straight_dir, straight, epoch1, records, resumed_dir, resumed


def test_head_phase_leaves_the_backbone_and_its_statistics_untouched(full_recipe, pretrained):
    _, straight_dir, _, epoch1, records, _, _ = full_recipe
    init = torch.load(pretrained, weights_only=True)
    backbone = [k for k in init if not k.startswith("fc.")]
    assert any("running_mean" in k for k in backbone)
    for k in backbone:  # weights and BatchNorm running statistics
        assert torch.equal(epoch1[k], init[k]), k
    final = load_checkpoint(straight_dir / LAST)["model"]
    assert not torch.equal(final["features.block1.conv.weight"], init["features.block1.conv.weight"])
    assert not torch.equal(epoch1["fc.4.weight"], final["fc.4.weight"])
    assert records[0].backbone_lr == 0.0 and records[1].backbone_lr > 0
    assert records[1].lr == pytest.approx(3e-3 * 0.01)  # the cosine floor
    assert records[1].backbone_lr == pytest.approx(3e-3 * 0.1 * 0.01)  # the floor, times the ratio (0.1: pretrained)


def test_ema_weights_are_checkpointed_and_saved_as_best(full_recipe):
    _, straight_dir, straight, *_ = full_recipe
    last = load_checkpoint(straight_dir / LAST)
    assert "ema" in last and int(last["ema"]["n_averaged"]) > 0
    ema = {k.removeprefix("module."): v for k, v in last["ema"].items() if k.startswith("module.")}
    assert ema.keys() == last["model"].keys()
    assert not _same(ema, last["model"])
    best = load_checkpoint(straight_dir / BEST)
    if best["epoch"] == 2:
        assert _same(best["model"], ema)
    assert all(np.isfinite(h.train_loss) for h in straight.history)


def test_resume_is_exact_across_the_phase_boundary_with_every_option_on(full_recipe):
    _, straight_dir, straight, _, _, resumed_dir, resumed = full_recipe
    a, b = load_checkpoint(straight_dir / LAST), load_checkpoint(resumed_dir / LAST)
    assert _same(a["model"], b["model"])
    assert _same(a["ema"], b["ema"])
    assert [h.val_top1 for h in straight.history] == [h.val_top1 for h in resumed.history]
    assert [h.train_loss for h in straight.history] == [h.train_loss for h in resumed.history]


# --------------------------------------------------------------------------- early stopping


def test_early_stopping_stops_records_and_stays_stopped(dataset, tmp_path):
    # A min_delta nothing can beat: epoch 1 sets the reference, epoch 2 is the one bad epoch.
    cfg = config(epochs=4, early_stopping_patience=1, early_stopping_monitor="val_loss", early_stopping_min_delta=1e9)
    seen = []
    result = _fit(dataset, tmp_path, cfg, on_epoch=seen.append)
    assert result.stopped_early and [h.epoch for h in result.history] == [1, 2]
    assert "val_loss did not improve for 1 epochs" in result.stop_reason
    assert [r.epoch for r in seen] == [1, 2]
    assert load_checkpoint(tmp_path / LAST)["early_stopping"]["stopped"] is True
    again = _fit(dataset, tmp_path, cfg, resume=True, on_epoch=seen.append)
    assert [r.epoch for r in seen] == [1, 2]  # nothing more trained
    assert again.stopped_early and len(again.history) == 2
    assert result.to_dict()["stopped_early"] is True


def test_without_patience_the_run_goes_to_the_end(dataset, tmp_path):
    result = _fit(dataset, tmp_path, config(epochs=2, early_stopping_min_delta=1e9))
    assert not result.stopped_early and result.stop_reason is None and len(result.history) == 2


# --------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_run_with_workers_pinned_memory_and_amp(dataset, tmp_path):
    from cvlib.data.datasets import CudaPrefetcher

    root, manifest, _ = dataset
    ds = ManifestDataset(root, manifest, "train", train_preset(AugmentConfig(image_size=16)))
    loader = make_loader(ds, batch_size=4, sampler=EpochSampler(ds, seed=0), num_workers=2, pin_memory=True, persistent_workers=True)
    x, y = next(iter(CudaPrefetcher(loader, torch.device("cuda"), torch.channels_last)))
    assert x.is_cuda and y.is_cuda and x.is_contiguous(memory_format=torch.channels_last)
    result = _fit(dataset, tmp_path, config(epochs=2, device="cuda", num_workers=2, ema_decay=0.9,
                                            augment={"mixup_alpha": 0.2}))
    assert result.device.startswith("cuda")
    assert all(np.isfinite(h.train_loss) for h in result.history)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_nan_is_caught_within_the_check_interval(dataset, tmp_path, monkeypatch):
    from cvlib.training.step import TrainingDivergedError

    monkeypatch.setattr(nn.CrossEntropyLoss, "forward", lambda self, logits, targets: logits.sum() * float("nan"))
    with pytest.raises(TrainingDivergedError, match="epoch 1"):
        _fit(dataset, tmp_path, config(device="cuda"))
    assert not (tmp_path / LAST).exists()
