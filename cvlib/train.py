"""The fine-tuning loop: AdamW, warm-up + cosine per iteration, label smoothing, gradient
clipping, best/last checkpoints written atomically every epoch, and exact resume."""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from cvlib.checkpoint import load_checkpoint, save_atomic
from cvlib.config import RetrainConfig
from cvlib.data import ManifestDataset, make_loader
from cvlib.evaluate import evaluate
from cvlib.models import create_model, pick_device
from cvlib.schedule import warmup_cosine
from cvlib.transforms import (
    EvalPreset,
    preprocessing_record,
    resize_size_for,
    train_preset,
)

LAST = "last.pt"
BEST = "best.pt"


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
    lr: float
    seconds: float


@dataclass
class FitResult:
    best_checkpoint: str
    last_checkpoint: str
    best_epoch: int
    best_val_top1: float
    history: list[EpochRecord] = field(default_factory=list)
    device: str = "cpu"

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
    epoch. Each epoch reseeds from (seed, epoch), so an interrupted and resumed run sees the same
    shuffles and augmentations as an uninterrupted one.
    """
    tc, ac = config.train, config.augment
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device(tc.device)
    seed_everything(tc.seed)

    draft = 2 * resize_size_for(ac)
    train_ds = ManifestDataset(data_root, manifest, "train", train_preset(ac), draft_size=draft)
    eval_tf = EvalPreset(image_size=ac.image_size, resize_size=resize_size_for(ac), mean=ac.mean, std=ac.std)
    val_ds = ManifestDataset(data_root, manifest, "val", eval_tf, draft_size=draft)
    if len(train_ds) == 0:
        raise ValueError("the training split is empty")
    pin = device.type == "cuda"
    val_loader = make_loader(val_ds, batch_size=tc.batch_size, shuffle=False, num_workers=tc.num_workers, pin_memory=pin)

    model = create_model(
        tc.arch,
        len(class_names),
        weights=tc.weights,
        hidden_dim=tc.hidden_dim,
        dropout=tc.dropout,
        freeze_backbone=tc.freeze_backbone,
    ).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr)
    # drop_last keeps BatchNorm away from a batch of one; tiny data sets keep their last batch.
    drop_last = len(train_ds) > tc.batch_size and len(train_ds) % tc.batch_size == 1
    steps_per_epoch = len(train_ds) // tc.batch_size if drop_last else math.ceil(len(train_ds) / tc.batch_size)
    total_steps = steps_per_epoch * tc.epochs
    scheduler = warmup_cosine(
        optimizer,
        warmup_steps=int(round(tc.warmup_epochs * steps_per_epoch)),
        total_steps=total_steps,
        min_ratio=tc.min_lr_ratio,
    )
    criterion = nn.CrossEntropyLoss(label_smoothing=tc.label_smoothing)

    meta = {
        "arch": tc.arch,
        "class_names": list(class_names),
        "preprocessing": preprocessing_record(ac),
        "head": {"hidden_dim": tc.hidden_dim, "dropout": tc.dropout},
        "config": config.model_dump(mode="json"),
        **(extra_meta or {}),
    }
    history: list[EpochRecord] = []
    start_epoch, best_top1, best_epoch = 0, -1.0, 0
    last_path, best_path = out / LAST, out / BEST
    if resume and last_path.is_file():
        state = load_checkpoint(last_path, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"])
        best_top1, best_epoch = float(state["best_val_top1"]), int(state["best_epoch"])
        history = [EpochRecord(**h) for h in state["history"]]

    for epoch in range(start_epoch, tc.epochs):
        t0 = time.perf_counter()
        seed_everything(tc.seed * 100_003 + epoch)
        loader = make_loader(
            train_ds,
            batch_size=tc.batch_size,
            shuffle=True,
            num_workers=tc.num_workers,
            seed=tc.seed * 100_003 + epoch,
            pin_memory=pin,
            drop_last=drop_last,
        )
        train_loss, train_top1 = _train_one_epoch(
            model, loader, optimizer, scheduler, criterion, device, tc.grad_clip, epoch, tc.epochs, tc.progress
        )
        ev = evaluate(model, val_loader, device)
        record = EpochRecord(
            epoch=epoch + 1,
            train_loss=train_loss,
            train_top1=train_top1,
            val_loss=ev.loss,
            val_top1=ev.top1,
            val_top5=ev.top5,
            lr=optimizer.param_groups[0]["lr"],
            seconds=time.perf_counter() - t0,
        )
        history.append(record)
        improved = not math.isnan(ev.top1) and ev.top1 > best_top1
        if improved or best_epoch == 0:
            best_top1, best_epoch = (ev.top1 if not math.isnan(ev.top1) else best_top1), epoch + 1
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch + 1,
            "best_val_top1": best_top1,
            "best_epoch": best_epoch,
            "history": [asdict(h) for h in history],
            "rng": {"torch": torch.get_rng_state(), "numpy_seed": int(tc.seed)},
            "meta": meta,
        }
        if best_epoch == epoch + 1:
            save_atomic({"model": state["model"], "meta": meta, "epoch": epoch + 1}, best_path)
        save_atomic(state, last_path)
        if on_epoch is not None:
            on_epoch(record)

    return FitResult(
        best_checkpoint=str(best_path),
        last_checkpoint=str(last_path),
        best_epoch=best_epoch,
        best_val_top1=best_top1,
        history=history,
        device=str(device),
    )


def _train_one_epoch(model, loader, optimizer, scheduler, criterion, device, grad_clip, epoch, epochs, progress):
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True)
    try:
        for images, targets in loader:
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            logits = model(images)
            loss = criterion(logits, targets)
            if not torch.isfinite(loss):
                raise TrainingDivergedError(f"loss became {loss.item()} at epoch {epoch + 1}; nothing will be registered")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            scheduler.step()
            n = targets.shape[0]
            total_loss += loss.item() * n
            correct += (logits.argmax(1) == targets).sum().item()
            seen += n
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{total_loss / seen:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    finally:
        if bar is not None:
            bar.close()
    return total_loss / max(seen, 1), correct / max(seen, 1)
