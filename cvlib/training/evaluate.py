"""Validation: loss, top-1 and top-5 accuracy, and the raw predictions behind them."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader


@dataclass
class Evaluation:
    loss: float
    top1: float
    top5: float
    n: int
    targets: np.ndarray = field(repr=False)
    probs: np.ndarray = field(repr=False)  # (n, classes) softmax probabilities

    @property
    def preds(self) -> np.ndarray:
        return self.probs.argmax(axis=1)

    def metrics(self, prefix: str = "val_") -> dict[str, float]:
        return {f"{prefix}loss": self.loss, f"{prefix}top1": self.top1, f"{prefix}top5": self.top5}


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    *,
    amp_dtype: torch.dtype | None = None,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> Evaluation:
    """Evaluate in the inference loop (:func:`cvlib.inference.loop.infer_batches`): eval mode,
    every module's own mode restored afterwards, the model itself untouched (it may be the one
    being trained). Losses and probabilities are computed in fp32 even when the forward runs
    under autocast."""
    from contextlib import closing

    from cvlib.inference.loop import infer_batches

    losses, all_targets, all_probs = [], [], []
    pairs = ((targets, images) for images, targets in loader)
    with closing(infer_batches(model, pairs, device, amp_dtype=amp_dtype, memory_format=memory_format)) as results:
        for targets, logits in results:
            targets = targets.to(device, non_blocking=True)
            losses.append(nn.functional.cross_entropy(logits, targets, reduction="sum").item())
            all_probs.append(torch.softmax(logits, dim=1).cpu())
            all_targets.append(targets.cpu())
    if not all_targets:
        return Evaluation(float("nan"), float("nan"), float("nan"), 0, np.zeros(0, int), np.zeros((0, 0)))
    probs = torch.cat(all_probs)
    targets = torch.cat(all_targets)
    k = min(5, probs.shape[1])
    topk = probs.topk(k, dim=1).indices
    top1 = (topk[:, 0] == targets).float().mean().item()
    top5 = (topk == targets[:, None]).any(dim=1).float().mean().item()
    n = len(targets)
    return Evaluation(sum(losses) / n, top1, top5, n, targets.numpy(), probs.numpy())


def package_split_dataset(meta: dict, data_root, manifest, split: str):
    """One split of a manifest through a packaged model's own evaluation preprocessing, with
    targets in the package's class order: a label the model does not know is an error, since its
    images could never be scored right."""
    from cvlib.data.datasets import ManifestDataset
    from cvlib.data.transforms import eval_preset_from

    pre = meta["preprocessing"]
    ds = ManifestDataset(data_root, manifest, split, eval_preset_from(pre), draft_size=2 * int(pre["resize_size"]))
    index = {name: i for i, name in enumerate(meta["class_names"])}
    rows = manifest[(manifest["status"] == "ok") & (manifest["split"] == split)]
    missing = sorted(set(rows["label"]) - set(index))
    if missing:
        raise ValueError(f"the model does not know the classes {missing}")
    ds.targets = [index[label] for label in rows["label"]]
    return ds


def evaluate_split(
    model: nn.Module,
    meta: dict,
    data_root: str,
    manifest,
    split: str = "val",
    *,
    batch_size: int = 64,
    num_workers: int = 2,
    device: str = "auto",
) -> Evaluation:
    """Evaluate a packaged model on one split of a manifest, with the package's own
    preprocessing and its class order mapped onto the manifest's labels."""
    from cvlib.data.datasets import make_loader
    from cvlib.models.factory import pick_device

    ds = package_split_dataset(meta, data_root, manifest, split)
    dev = pick_device(device)
    return evaluate(model.to(dev), make_loader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers), dev)
