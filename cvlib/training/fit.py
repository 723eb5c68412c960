"""The fine-tuning loop: AdamW, warm-up + cosine per iteration, label smoothing, gradient
clipping, best/last checkpoints written atomically every epoch, and exact resume.

On top of that, torchvision's recipe where asked for: two phases with pretrained weights (the head
alone first, then everything with a lower backbone learning rate), MixUp/CutMix, an EMA of the
weights, and early stopping. The same :func:`fit` runs in one process or in each process of a
``torchrun`` launch (DDP; see :mod:`cvlib.training.ddp`): data sharded per rank, metrics reduced over
ranks, and only rank 0 checkpoints and reports epochs.

Reproducibility: every random draw of an epoch is a function of (seed, epoch) alone: the shuffle,
each sample's augmentation (see :mod:`cvlib.data.datasets`, independent of the number of DataLoader
workers), and the main process's generator (dropout, MixUp/CutMix). A run resumed from
``last.pt`` in a fresh process therefore ends with the same weights as an uninterrupted one (bit
for bit on the CPU, where the default precision is fp32).
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import AveragedModel

from cvlib.config import RetrainConfig
from cvlib.data.datasets import (
    CudaPrefetcher,
    EpochSampler,
    ManifestDataset,
    ShardSampler,
    make_loader,
)
from cvlib.data.options import AugmentConfig
from cvlib.data.transforms import (
    EvalPreset,
    preprocessing_record,
    resize_size_for,
    train_preset,
)
from cvlib.models.factory import create_model, head_parameters, pick_device
from cvlib.models.precision import autocast, autocast_dtype, needs_grad_scaler
from cvlib.training import distributed as dist_
from cvlib.training.checkpoint import load_checkpoint, save_atomic
from cvlib.training.evaluate import evaluate
from cvlib.training.options import TrainConfig
from cvlib.training.schedule import warmup_cosine_factor

LAST = "last.pt"
BEST = "best.pt"
# On CUDA the loss is checked for NaN every this many steps (a check is a host-device sync that
# would otherwise stall the GPU every step); on the CPU every step, where a check is free.
CUDA_CHECK_EVERY = 16


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite: the run must fail and nothing may be registered."""


@dataclass
class EpochRecord:
    epoch: int  # 1-based
    train_loss: float
    train_top1: float
    val_loss: float
    val_top1: float
    val_top5: float
    lr: float  # the head's learning rate at the end of the epoch
    seconds: float
    backbone_lr: float = float("nan")  # 0 while the backbone is frozen


@dataclass
class FitResult:
    best_checkpoint: str
    last_checkpoint: str
    best_epoch: int
    best_val_top1: float
    history: list[EpochRecord] = field(default_factory=list)
    device: str = "cpu"
    stopped_early: bool = False
    stop_reason: str | None = None
    world_size: int = 1

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["history"] = [asdict(h) for h in self.history]
        return d


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and normalisation weights (1-D tensors): decaying them
    only fights the normalisation."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def phase_param_groups(model: nn.Module, weight_decay: float, *, lr: float, backbone_lr: float) -> list[dict[str, Any]]:
    """Head and backbone, each split decay / no decay (1-D tensors), in that order; empty groups
    are left out. Every parameter is included, trainable now or not: the backbone joins the
    optimisation when its phase starts, without changing the optimizer's shape (so a checkpoint
    from either phase loads). Each group carries a ``name`` (``head.decay``...)."""
    head = {id(p) for p in head_parameters(model)}
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {
        ("head", True): [], ("head", False): [], ("backbone", True): [], ("backbone", False): []
    }  # fmt: skip
    for p in model.parameters():
        buckets[("head" if id(p) in head else "backbone", p.ndim > 1)].append(p)
    groups = []
    for (role, decay), params in buckets.items():
        if params:
            groups.append(
                {
                    "params": params,
                    "weight_decay": weight_decay if decay else 0.0,
                    "lr": lr if role == "head" else backbone_lr,
                    "name": f"{role}.{'decay' if decay else 'no_decay'}",
                }
            )
    return groups


def uses_pretrained_weights(tc: TrainConfig) -> bool:
    return str(tc.weights).lower() not in ("none", "")


def resolved_head_epochs(tc: TrainConfig) -> int:
    """Epochs of the head-only phase: the configured number, or 1 with pretrained weights
    (never the whole run) and 0 from random initialisation. ``freeze_backbone`` makes every
    epoch a head epoch."""
    if tc.freeze_backbone:
        return tc.epochs
    if tc.head_epochs is not None:
        return min(tc.head_epochs, tc.epochs)
    return 1 if uses_pretrained_weights(tc) and tc.epochs > 1 else 0


def resolved_backbone_lr_ratio(tc: TrainConfig) -> float:
    if tc.backbone_lr_ratio is not None:
        return tc.backbone_lr_ratio
    return 0.1 if uses_pretrained_weights(tc) else 1.0


def train_draft_size(ac: AugmentConfig) -> int:
    """Short side JPEGs are draft-decoded to for training: a square RandomResizedCrop of the
    smallest area fraction (``scale_min``) still spans ``image_size`` pixels, so typical crops
    are downscaled, not upscaled, while a 12 MP photo decodes at 1/8 of its size."""
    return math.ceil(ac.image_size / math.sqrt(ac.scale_min))


def batch_mixer(ac: AugmentConfig, num_classes: int) -> Callable | None:
    """MixUp and/or CutMix on whole batches (torchvision.transforms.v2), or None when both
    alphas are 0. Returns (images, soft targets) for (images, class indices)."""
    from torchvision.transforms import v2

    ops: list[Any] = []
    if ac.mixup_alpha > 0:
        ops.append(v2.MixUp(alpha=ac.mixup_alpha, num_classes=num_classes))
    if ac.cutmix_alpha > 0:
        ops.append(v2.CutMix(alpha=ac.cutmix_alpha, num_classes=num_classes))
    if not ops:
        return None
    return ops[0] if len(ops) == 1 else v2.RandomChoice(ops)


class ModelEma:
    """Exponential moving average of a model's weights and buffers (BatchNorm statistics), on
    ``torch.optim.swa_utils.AveragedModel``. The decay warms up as ``min(decay, (1 + n) / (10 + n))``
    over the first updates ``n``, so that a short fine-tune's average is not dominated by the
    initial weights."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.averaged = AveragedModel(model, multi_avg_fn=self._average, use_buffers=True)
        self.averaged.requires_grad_(False)

    @property
    def module(self) -> nn.Module:
        return self.averaged.module

    @torch.no_grad()
    def _average(self, ema: list[torch.Tensor], current: list[torch.Tensor], _n: Any) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        if torch.is_floating_point(ema[0]):
            torch._foreach_lerp_(ema, current, 1.0 - d)
        else:  # integer buffers (BatchNorm's num_batches_tracked): follow the model
            for e, c in zip(ema, current, strict=True):
                e.copy_(c)

    def update(self, model: nn.Module) -> None:
        self.averaged.update_parameters(model)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.averaged.load_state_dict(state)
        self.updates = int(self.averaged.n_averaged.item())


def fit(
    *,
    data_root: str | os.PathLike[str],
    manifest: pd.DataFrame,
    class_names: list[str],
    config: RetrainConfig,
    out_dir: str | os.PathLike[str],
    resume: bool = False,
    extra_meta: dict[str, Any] | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
) -> FitResult:
    """Train and validate; returns where the best and last checkpoints are.

    With ``resume`` and a ``last.pt`` in ``out_dir``, training continues after the last completed
    epoch (a run that stopped early stays stopped). Each epoch reseeds from (seed, epoch), so an
    interrupted and resumed run sees the same shuffles and augmentations as an uninterrupted one.

    Inside an initialised ``torch.distributed`` process group (see :mod:`cvlib.training.distributed`),
    every rank calls ``fit`` with the same arguments: each trains on its shard of every epoch
    (``batch_size`` is per process), validation is sharded and reduced, only rank 0 writes
    checkpoints and calls ``on_epoch``, and every rank returns the same result. ``out_dir`` must
    be storage all ranks read when resuming.
    """
    tc, ac = config.train, config.augment
    dinfo = dist_.info()
    is_main = dinfo.is_main
    out = Path(out_dir)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    device = _train_device(tc.device, dinfo)
    seed_everything(tc.seed)

    # ----------------------------------------------------------------- data
    train_ds = ManifestDataset(data_root, manifest, "train", train_preset(ac), draft_size=train_draft_size(ac))
    eval_tf = EvalPreset(image_size=ac.image_size, resize_size=resize_size_for(ac), mean=ac.mean, std=ac.std)
    # The same draft as scoring and validate (evaluate_split) use, so the numbers agree.
    val_ds = ManifestDataset(data_root, manifest, "val", eval_tf, draft_size=2 * resize_size_for(ac))
    if len(train_ds) == 0:
        raise ValueError("the training split is empty")
    base_seed = tc.seed * 100_003
    loader_opts = {
        "num_workers": tc.num_workers,
        "pin_memory": device.type == "cuda",
        "persistent_workers": tc.num_workers > 0,
        "prefetch_factor": tc.prefetch_factor if tc.num_workers > 0 else None,
    }
    sampler = EpochSampler(train_ds, seed=base_seed, shuffle=True, num_replicas=dinfo.world_size, rank=dinfo.rank)
    shard = len(sampler)  # samples per rank and epoch
    # drop_last keeps BatchNorm away from a batch of one; tiny data sets keep their last batch.
    drop_last = shard > tc.batch_size and shard % tc.batch_size == 1
    steps_per_epoch = shard // tc.batch_size if drop_last else math.ceil(shard / tc.batch_size)
    train_loader = make_loader(train_ds, batch_size=tc.batch_size, sampler=sampler, drop_last=drop_last, seed=base_seed, **loader_opts)
    val_sampler = ShardSampler(len(val_ds), rank=dinfo.rank, num_replicas=dinfo.world_size) if dinfo.distributed else None
    val_loader = make_loader(val_ds, batch_size=tc.batch_size, sampler=val_sampler, **loader_opts)

    # ----------------------------------------------------------------- model and optimisation
    # Vision transformers are built for one input size (their position embeddings); record it so
    # the package rebuilds the same model.
    model_kwargs = {"image_size": ac.image_size} if tc.arch.startswith("vit_") else {}
    model = create_model(
        tc.arch,
        len(class_names),
        weights=tc.weights,
        hidden_dim=tc.hidden_dim,
        dropout=tc.dropout,
        **model_kwargs,
    ).to(device)
    memory_format = torch.channels_last if tc.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    amp_dtype = autocast_dtype(tc.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=needs_grad_scaler(device, amp_dtype))
    head_epochs = resolved_head_epochs(tc)
    ratio = resolved_backbone_lr_ratio(tc)
    optimizer = torch.optim.AdamW(
        phase_param_groups(model, tc.weight_decay, lr=tc.lr, backbone_lr=tc.lr * ratio),
        lr=tc.lr,
        fused=device.type == "cuda" or None,  # one kernel for the whole update on CUDA
    )
    scheduler = _scheduler(optimizer, tc, steps_per_epoch, head_epochs)
    criterion = nn.CrossEntropyLoss(label_smoothing=tc.label_smoothing)
    mixer = batch_mixer(ac, len(class_names))
    ema = ModelEma(model, tc.ema_decay) if tc.ema_decay else None
    head_ids = {id(p) for p in head_parameters(model)}

    meta = {
        "arch": tc.arch,
        "class_names": list(class_names),
        "preprocessing": preprocessing_record(ac),
        "head": {"hidden_dim": tc.hidden_dim, "dropout": tc.dropout},
        "model_kwargs": model_kwargs,
        "config": config.model_dump(mode="json"),
        **(extra_meta or {}),
    }

    # ----------------------------------------------------------------- resume
    history: list[EpochRecord] = []
    start_epoch, best_top1, best_epoch = 0, -1.0, 0
    stopping = {"best": None, "bad_epochs": 0, "stopped": False, "reason": None}
    last_path, best_path = out / LAST, out / BEST
    if resume and last_path.is_file():
        state = load_checkpoint(last_path, map_location=device)
        model.load_state_dict(state["model"])
        try:
            optimizer.load_state_dict(state["optimizer"])
        except ValueError as exc:
            raise ValueError(
                f"{last_path} was written with other optimizer parameter groups (an older visionflow or another "
                f"model); resume needs the same configuration, or use a new output folder: {exc}"
            ) from exc
        scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        if ema is not None and "ema" in state:
            ema.load_state_dict(state["ema"])
        elif ema is not None:
            ema = ModelEma(model, tc.ema_decay)  # EMA switched on for the rest of the run
        start_epoch = int(state["epoch"])
        best_top1, best_epoch = float(state["best_val_top1"]), int(state["best_epoch"])
        history = [EpochRecord(**h) for h in state["history"]]
        stopping.update(state.get("early_stopping", {}))
    if dinfo.distributed:
        lo, hi = dist_.all_reduce_max([-start_epoch, start_epoch])
        if -lo != hi:
            raise RuntimeError(
                f"ranks found different checkpoints in {out} (epochs {int(-lo)} to {int(hi)}): the output folder "
                "must be storage every rank reads"
            )

    # ----------------------------------------------------------------- epochs
    train_model: nn.Module = model
    head_only: bool | None = None
    frozen_norms: list[nn.Module] = []
    cudnn_benchmark = torch.backends.cudnn.benchmark
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels once
    try:
        for epoch in range(start_epoch, tc.epochs):
            if stopping["stopped"]:
                break
            t0 = time.perf_counter()
            if head_only is None or head_only != (epoch < head_epochs):
                head_only = epoch < head_epochs
                frozen_norms = _set_backbone_trainable(model, head_ids, not head_only)
                train_model = _wrap_ddp(model, device) if dinfo.distributed else model
            # Ranks draw different dropout masks; rank 0's stream is the single-process one.
            seed_everything(base_seed + epoch + 7919 * dinfo.rank)
            sampler.set_epoch(epoch)
            step = _Step(
                train_model, optimizer, scheduler, scaler, criterion, device, amp_dtype, memory_format, tc.grad_clip,
                mixer=mixer, ema=ema, ema_source=model,
            )
            batches = CudaPrefetcher(train_loader, device, memory_format)
            train_loss, train_top1 = _train_one_epoch(step, batches, epoch, tc.epochs, tc.progress and is_main, frozen_norms)
            if dinfo.distributed:  # BatchNorm statistics: rank 0's, everywhere
                dist_.broadcast_buffers(model)
                if ema is not None:
                    dist_.broadcast_buffers(ema.module)
            evaluated = ema.module if ema is not None else model
            val_loss, val_top1, val_top5 = _validate(evaluated, val_loader, device, amp_dtype, memory_format, dinfo.distributed)
            record = EpochRecord(
                epoch=epoch + 1,
                train_loss=train_loss,
                train_top1=train_top1,
                val_loss=val_loss,
                val_top1=val_top1,
                val_top5=val_top5,
                lr=_last_step_lr(scheduler, "head."),
                seconds=time.perf_counter() - t0,
                backbone_lr=_last_step_lr(scheduler, "backbone."),
            )
            history.append(record)
            improved = not math.isnan(val_top1) and val_top1 > best_top1
            if improved or best_epoch == 0:
                best_top1, best_epoch = (val_top1 if not math.isnan(val_top1) else best_top1), epoch + 1
            _early_stopping(stopping, tc, record)
            if is_main:
                state = {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "epoch": epoch + 1,
                    "best_val_top1": best_top1,
                    "best_epoch": best_epoch,
                    "history": [asdict(h) for h in history],
                    "early_stopping": dict(stopping),
                    "rng": {"torch": torch.get_rng_state(), "numpy_seed": int(tc.seed)},
                    "meta": meta,
                }
                if ema is not None:
                    state["ema"] = ema.state_dict()
                if best_epoch == epoch + 1:
                    best_weights = ema.module.state_dict() if ema is not None else state["model"]
                    save_atomic({"model": best_weights, "meta": meta, "epoch": epoch + 1}, best_path)
                save_atomic(state, last_path)
                if on_epoch is not None:
                    on_epoch(record)
        dist_.barrier()  # when fit returns on any rank, rank 0's checkpoints are on disk
    finally:
        torch.backends.cudnn.benchmark = cudnn_benchmark
        _close_workers(train_loader, val_loader)

    return FitResult(
        best_checkpoint=str(best_path),
        last_checkpoint=str(last_path),
        best_epoch=best_epoch,
        best_val_top1=best_top1,
        history=history,
        device=str(device),
        stopped_early=bool(stopping["stopped"]),
        stop_reason=stopping["reason"],
        world_size=dinfo.world_size,
    )


# --------------------------------------------------------------------------- helpers of fit


def _train_device(name: str, dinfo: dist_.DistInfo) -> torch.device:
    device = pick_device(name)
    if device.type == "cuda":
        if device.index is None and dinfo.distributed:
            device = torch.device("cuda", dinfo.local_rank)
        if device.index is not None:
            torch.cuda.set_device(device)
    return device


def _scheduler(optimizer: torch.optim.Optimizer, tc: TrainConfig, steps_per_epoch: int, head_epochs: int) -> LambdaLR:
    """Warm-up + cosine per iteration for every group. Backbone groups stay at 0 through the
    head phase, then warm up again over ``warmup_epochs`` from where the phase ends (a fresh
    optimizer state meets a pretrained backbone gently) and follow the same cosine."""
    total = steps_per_epoch * tc.epochs
    warmup = round(tc.warmup_epochs * steps_per_epoch)
    head_steps = steps_per_epoch * head_epochs

    def head(step: int) -> float:
        return warmup_cosine_factor(step, warmup_steps=warmup, total_steps=total, min_ratio=tc.min_lr_ratio)

    def backbone(step: int) -> float:
        if step < head_steps:
            return 0.0
        factor = head(step)
        if head_steps > 0 and warmup > 0:
            factor *= min(1.0, (step - head_steps + 1) / warmup)
        return factor

    lambdas = [head if g.get("name", "head").startswith("head") else backbone for g in optimizer.param_groups]
    return LambdaLR(optimizer, lambdas)


def _last_step_lr(scheduler: LambdaLR, prefix: str) -> float:
    """The learning rate the epoch's last optimizer step used in the first group named
    ``prefix...`` (the lr now in the optimizer is the next step's: across the phase boundary the
    two differ)."""
    step = max(scheduler.last_epoch - 1, 0)
    for g, factor in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        if str(g.get("name", "")).startswith(prefix):
            return float(g["initial_lr"] * factor(step))
    return float("nan")


def _set_backbone_trainable(model: nn.Module, head_ids: set[int], trainable: bool) -> list[nn.Module]:
    """Freeze or unfreeze every parameter outside the head. Returns the backbone's BatchNorm
    layers to keep in eval mode while frozen (a frozen backbone keeps its running statistics)."""
    for p in model.parameters():
        if id(p) not in head_ids:
            p.requires_grad_(trainable)
    if trainable:
        return []
    return [
        m for m in model.modules()
        if isinstance(m, _BatchNorm) and not any(id(p) in head_ids for p in m.parameters(recurse=False))
    ]  # fmt: skip


def _wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """A DDP wrapper over the parameters that train in this phase (DDP fixes its set when it is
    built, so a new phase gets a new wrapper)."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, output_device=ids[0] if ids else None)  # buffers synced each forward


def _validate(
    model: nn.Module, loader, device: torch.device, amp_dtype, memory_format, distributed: bool
) -> tuple[float, float, float]:
    ev = evaluate(model, loader, device, amp_dtype=amp_dtype, memory_format=memory_format)
    if not distributed:
        return ev.loss, ev.top1, ev.top5
    n = ev.n
    sums = [0.0, 0.0, 0.0, 0.0] if n == 0 else [ev.loss * n, round(ev.top1 * n), round(ev.top5 * n), n]
    loss_sum, top1, top5, total = dist_.all_reduce_sum(sums)
    if total == 0:
        return float("nan"), float("nan"), float("nan")
    return loss_sum / total, top1 / total, top5 / total


def _early_stopping(stopping: dict[str, Any], tc: TrainConfig, record: EpochRecord) -> None:
    """Count epochs without improvement of the monitored metric; mark the run stopped when the
    patience is spent (not on the last epoch, which ends the run anyway)."""
    value = getattr(record, tc.early_stopping_monitor)
    higher = tc.early_stopping_monitor == "val_top1"
    best = stopping["best"]
    if not math.isnan(value) and (
        best is None
        or (higher and value > best + tc.early_stopping_min_delta)
        or (not higher and value < best - tc.early_stopping_min_delta)
    ):
        stopping["best"], stopping["bad_epochs"] = float(value), 0
    else:
        stopping["bad_epochs"] += 1
    patience = tc.early_stopping_patience
    if patience is not None and stopping["bad_epochs"] >= patience and record.epoch < tc.epochs:
        stopping["stopped"] = True
        stopping["reason"] = (
            f"{tc.early_stopping_monitor} did not improve for {stopping['bad_epochs']} epochs; stopped after epoch {record.epoch}"
        )


def _close_workers(*loaders) -> None:
    """Shut persistent DataLoader workers down now rather than when the loader is collected
    (an exception's traceback may keep it alive for a long time)."""
    for loader in loaders:
        it = getattr(loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        if hasattr(loader, "_iterator"):
            loader._iterator = None


@dataclass
class _Step:
    """One optimisation step, with everything it needs held together."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    device: torch.device
    amp_dtype: torch.dtype | None
    memory_format: torch.memory_format
    grad_clip: float | None
    mixer: Callable | None = None
    ema: ModelEma | None = None
    ema_source: nn.Module | None = None  # the unwrapped model (not its DDP wrapper)
    check_every: int = 0  # 0: every step on the CPU, CUDA_CHECK_EVERY on CUDA

    def __post_init__(self) -> None:
        if self.check_every <= 0:
            self.check_every = CUDA_CHECK_EVERY if self.device.type == "cuda" else 1
        self._calls = 0
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the batch's mean loss and number of correct top-1 predictions, as tensors on
        the device (reading them is a sync the caller decides when to pay)."""
        images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
        targets = targets.to(self.device, non_blocking=True)
        labels = targets
        if self.mixer is not None:
            images, targets = self.mixer(images, targets)
            images = images.contiguous(memory_format=self.memory_format)
        with autocast(self.device, self.amp_dtype):
            logits = self.model(images)
            loss = self.criterion(logits.float(), targets)
        self._nonfinite |= ~torch.isfinite(loss.detach())
        self._calls += 1
        if self._calls % self.check_every == 0:
            self.check(epoch)  # before the step: a bad batch never reaches the weights
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.ema_source if self.ema_source is not None else self.model)
        return loss.detach(), (logits.detach().argmax(1) == labels).sum()

    def check(self, epoch: int) -> None:
        """Raise on every rank at once if the loss was NaN or infinite on any rank."""
        if dist_.any_rank(self._nonfinite):
            raise TrainingDivergedError(f"the loss became NaN or infinite at epoch {epoch + 1}; nothing will be registered")


def _train_one_epoch(
    step: _Step, loader: Iterable, epoch: int, epochs: int, progress: bool, frozen_norms: Sequence[nn.Module] = ()
) -> tuple[float, float]:
    step.model.train()
    for m in frozen_norms:
        m.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=step.device)
    correct = torch.zeros((), dtype=torch.int64, device=step.device)
    seen = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True, disable=None)  # None: off when not a terminal
    try:
        for images, targets in loader:
            loss, hits = step(images, targets, epoch)
            n = targets.shape[0]
            loss_sum += loss.double() * n
            correct += hits
            seen += n
            if bar is not None:
                bar.update(1)
                if step._calls % step.check_every == 0:
                    bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", lr=f"{step.optimizer.param_groups[0]['lr']:.2e}")
        step.check(epoch)
    finally:
        if bar is not None:
            bar.close()
    total_loss, total_correct, total_seen = dist_.all_reduce_sum([loss_sum.item(), correct.item(), seen])
    return total_loss / max(total_seen, 1), total_correct / max(total_seen, 1)
