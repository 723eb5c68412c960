"""The fine-tuning recipe: AdamW, warm-up + cosine per iteration, label smoothing, gradient
clipping, best/last checkpoints written atomically every epoch, and exact resume.

On top of that, torchvision's recipe where asked for: two phases with pretrained weights
(:mod:`cvlib.training.phases`), MixUp/CutMix (:mod:`cvlib.training.loaders`), an EMA of the
weights (:mod:`cvlib.training.ema`) and early stopping (:mod:`cvlib.training.early_stopping`).
The same :func:`fit` runs in one process or in each process of a ``torchrun`` launch (DDP; see
:mod:`cvlib.training.ddp`): data sharded per rank, metrics reduced over ranks, and only rank 0
checkpoints and reports epochs. Every random draw of an epoch is a function of (seed, epoch)
alone (:mod:`cvlib.training.seeding`), so a resumed run ends with the weights of an
uninterrupted one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from cvlib.data.options import AugmentConfig
from cvlib.data.transforms import preprocessing_record
from cvlib.models.factory import create_model, pick_device
from cvlib.models.precision import autocast_dtype, needs_grad_scaler
from cvlib.training import distributed as dist_
from cvlib.training.checkpoint import load_checkpoint, save_atomic
from cvlib.training.early_stopping import EarlyStopping
from cvlib.training.ema import ModelEma
from cvlib.training.epoch import run_epoch
from cvlib.training.loaders import TrainingData, batch_mixer
from cvlib.training.options import TrainConfig
from cvlib.training.phases import Phases, phase_param_groups, resolved_backbone_lr_ratio, resolved_head_epochs
from cvlib.training.records import EpochRecord, FitResult
from cvlib.training.schedule import phase_scheduler
from cvlib.training.seeding import seed_everything
from cvlib.training.state import Progress, best_state, last_state, restore
from cvlib.training.step import TrainStep

LAST = "last.pt"
_log = logging.getLogger(__name__)
BEST = "best.pt"


def fit(
    *,
    data_root: str | os.PathLike[str],
    manifest: pd.DataFrame,
    class_names: list[str],
    train: TrainConfig,
    augment: AugmentConfig,
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

    The checkpoints' metadata records ``train`` and ``augment`` under ``config``; ``extra_meta``
    adds to it (or replaces it, e.g. with the whole run's configuration).
    """
    dinfo = dist_.info()
    out = Path(out_dir)
    if dinfo.is_main:
        out.mkdir(parents=True, exist_ok=True)
    device = _train_device(train.device, dinfo)
    seed_everything(train.seed)

    data = TrainingData.build(data_root, manifest, train, augment, device, dinfo)
    model, model_kwargs = _build_model(train, augment, len(class_names), device)
    head_epochs = resolved_head_epochs(train)
    step = _build_step(model, train, augment, len(class_names), device, data.steps_per_epoch, head_epochs)
    meta = _package_meta(train, augment, class_names, model_kwargs) | (extra_meta or {})

    progress = Progress(EarlyStopping(train))
    last_path, best_path = out / LAST, out / BEST
    if resume and last_path.is_file():
        step = restore(step, progress, load_checkpoint(last_path, map_location=device), last_path)
    _check_ranks_resume_alike(progress.epoch, out, dinfo)

    phases = Phases(model, head_epochs, device, dinfo.distributed)
    cudnn_benchmark = torch.backends.cudnn.benchmark
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels once
    try:
        for epoch in range(progress.epoch, train.epochs):
            if progress.stopping.stopped:
                break
            record = run_epoch(epoch, step, phases, data, epochs=train.epochs, progress=train.progress)
            if dinfo.distributed:  # raises on every rank if the replicas ever differ
                digest = dist_.agreed_weights_digest(model, record.epoch)
                _log.info(
                    "rank %d: after epoch %d the weights of all %d ranks are %s",
                    dinfo.rank,
                    record.epoch,
                    dinfo.world_size,
                    digest,
                )
            is_best = progress.add(record)
            if dinfo.is_main:
                last = last_state(step, progress, meta, train.seed)
                if is_best:
                    save_atomic(best_state(step, last), best_path)
                save_atomic(last, last_path)
                if on_epoch is not None:
                    on_epoch(record)
        dist_.barrier()  # when fit returns on any rank, rank 0's checkpoints are on disk
    finally:
        torch.backends.cudnn.benchmark = cudnn_benchmark
        data.close()

    return FitResult(
        best_checkpoint=str(best_path),
        last_checkpoint=str(last_path),
        best_epoch=progress.best_epoch,
        best_val_top1=progress.best_top1,
        history=progress.history,
        device=str(device),
        stopped_early=bool(progress.stopping.stopped),
        stop_reason=progress.stopping.reason,
        world_size=dinfo.world_size,
    )


def _train_device(name: str, dinfo: dist_.DistInfo) -> torch.device:
    """The configured device; under DDP on CUDA, this rank's GPU."""
    device = pick_device(name)
    if device.type == "cuda":
        if device.index is None and dinfo.distributed:
            device = torch.device("cuda", dinfo.local_rank)
        if device.index is not None:
            torch.cuda.set_device(device)
    return device


def _build_model(tc: TrainConfig, ac: AugmentConfig, num_classes: int, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """The model on ``device`` in the configured memory format, and the keyword arguments a
    package needs to rebuild it."""
    # Vision transformers are built for one input size (their position embeddings); record it so
    # the package rebuilds the same model.
    model_kwargs = {"image_size": ac.image_size} if tc.arch.startswith("vit_") else {}
    model = create_model(
        tc.arch, num_classes, weights=tc.weights, hidden_dim=tc.hidden_dim, dropout=tc.dropout, **model_kwargs
    ).to(device)
    memory_format = torch.channels_last if tc.channels_last else torch.contiguous_format
    return model.to(memory_format=memory_format), model_kwargs


def _package_meta(tc: TrainConfig, ac: AugmentConfig, class_names: list[str], model_kwargs: dict[str, Any]) -> dict[str, Any]:
    """What a model package needs to rebuild the model and preprocess its inputs, and the options
    it was trained with."""
    return {
        "arch": tc.arch,
        "class_names": list(class_names),
        "preprocessing": preprocessing_record(ac),
        "head": {"hidden_dim": tc.hidden_dim, "dropout": tc.dropout},
        "model_kwargs": model_kwargs,
        "config": {"augment": ac.model_dump(mode="json"), "train": tc.model_dump(mode="json")},
    }


def _build_step(
    model: nn.Module,
    tc: TrainConfig,
    ac: AugmentConfig,
    num_classes: int,
    device: torch.device,
    steps_per_epoch: int,
    head_epochs: int,
) -> TrainStep:
    """The optimisation around ``model``: AdamW over the phase groups, the phase schedule,
    label-smoothed cross-entropy, the grad scaler its precision needs, MixUp/CutMix and the EMA."""
    amp_dtype = autocast_dtype(tc.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=needs_grad_scaler(device, amp_dtype))
    ratio = resolved_backbone_lr_ratio(tc)
    optimizer = torch.optim.AdamW(
        phase_param_groups(model, tc.weight_decay, lr=tc.lr, backbone_lr=tc.lr * ratio),
        lr=tc.lr,
        fused=device.type == "cuda" or None,  # one kernel for the whole update on CUDA
    )
    return TrainStep(
        model,
        optimizer,
        phase_scheduler(optimizer, tc, steps_per_epoch, head_epochs),
        scaler,
        nn.CrossEntropyLoss(label_smoothing=tc.label_smoothing),
        device,
        amp_dtype,
        torch.channels_last if tc.channels_last else torch.contiguous_format,
        tc.grad_clip,
        mixer=batch_mixer(ac, num_classes),
        ema=ModelEma(model, tc.ema_decay) if tc.ema_decay else None,
        ema_source=model,
    )


def _check_ranks_resume_alike(start_epoch: int, out: Path, dinfo: dist_.DistInfo) -> None:
    """Under DDP every rank must resume from the same epoch, or they would train different steps."""
    if not dinfo.distributed:
        return
    lo, hi = dist_.all_reduce_max([-start_epoch, start_epoch])
    if -lo != hi:
        raise RuntimeError(
            f"ranks found different checkpoints in {out} (epochs {int(-lo)} to {int(hi)}): the output folder "
            "must be storage every rank reads"
        )
