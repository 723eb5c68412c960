"""Which images a Grad-CAM report explains. A CAM costs a forward and a partial backward per
image, so a report cannot explain every candidate; it explains the ones worth a look.

How they are chosen (:func:`screen_files` + :func:`choose_samples`): one cheap pass over all
candidates without CAM gives every image's prediction and loss; the misclassified ones come
first (worst loss first, spread across classes), the rest of the budget is stratified across
classes. Only the chosen images then get CAMs (:func:`cvlib.explain.samples.explain_files`),
and the page is drawn by :func:`cvlib.explain.render.render_report`.

Pure library: torch, numpy, PIL; no Prefect, no MLflow.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from cvlib.data.datasets import ForkingLoader
from cvlib.data.imageio import ImageReadError, load_rgb
from cvlib.data.transforms import eval_preset_from
from cvlib.explain.images import image_path as _source  # the name _Files reads it by
from cvlib.models.factory import pick_device
from cvlib.models.precision import inference_dtype

__all__ = ["Screening", "choose_samples", "sampling_note", "screen_files"]


@dataclass
class Screening:
    """One pass without CAM over the candidates: what the model predicts for each readable file."""

    files: list[str]
    labels: list[str | None]
    probs: np.ndarray  # (n, K) float32 softmax
    class_names: list[str]
    errors: list[dict] = field(default_factory=list)  # unreadable files: {"path", "error"}

    @property
    def preds(self) -> np.ndarray:
        return self.probs.argmax(axis=1) if len(self.files) else np.zeros(0, dtype=np.int64)

    @property
    def true_idx(self) -> np.ndarray:
        """Class index of each label, -1 where there is none (or it is not one of the model's)."""
        index = {c: i for i, c in enumerate(self.class_names)}
        return np.array([index.get(lbl, -1) if lbl is not None else -1 for lbl in self.labels], dtype=np.int64)

    @property
    def losses(self) -> np.ndarray:
        """Cross-entropy of each labelled file (NaN where unlabelled)."""
        t = self.true_idx
        out = np.full(len(t), np.nan, dtype=np.float64)
        known = t >= 0
        if known.any():
            p = self.probs[np.flatnonzero(known), t[known]].astype(np.float64)
            out[known] = -np.log(np.maximum(p, 1e-12))
        return out

    @property
    def labelled(self) -> np.ndarray:
        return self.true_idx >= 0


# --------------------------------------------------------------------------------------------
# screening: every candidate, one cheap pass, no CAM
# --------------------------------------------------------------------------------------------


class _Files(Dataset):
    def __init__(self, root: Path, files: Sequence[str], transform, draft: int) -> None:
        self.root, self.files, self.transform, self.draft = root, list(files), transform, (draft, draft)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            img = load_rgb(_source(self.root, self.files[i]), draft_size=self.draft)
        except ImageReadError as exc:
            return i, None, f"{exc.reason}: {exc.message}"
        return i, self.transform(img), None


def _as_list(items: list) -> list:
    return items


def screen_files(
    model: nn.Module,
    meta: Mapping,
    root: str | os.PathLike[str],
    files: Sequence[str],
    *,
    labels: Sequence[str | None] | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str = "auto",
    precision: str = "fp32",
) -> Screening:
    """Predict every file once (inference mode, no CAM): the cheap pass that decides which images
    are worth a CAM. Unreadable files are reported in ``errors``, never dropped silently.
    ``precision``: as for :func:`explain_files`, so that an image screened as misclassified is
    still misclassified when it is explained."""
    root = Path(root)
    labels = list(labels) if labels is not None else [None] * len(files)
    if len(labels) != len(files):
        raise ValueError(f"{len(labels)} labels for {len(files)} files")
    class_names = list(meta["class_names"])
    pre = meta["preprocessing"]
    ds = _Files(root, files, eval_preset_from(pre), int(pre["resize_size"]))
    loader = ForkingLoader(ds, batch_size=max(1, batch_size), shuffle=False, num_workers=num_workers, collate_fn=_as_list)
    dev = pick_device(device)
    model = model.to(dev)
    kept: list[int] = []
    probs: list[np.ndarray] = []
    errors: list[dict] = []

    def readable(batch: list) -> tuple[tuple[list[int], list[dict]], torch.Tensor | None]:
        """((indices of the readable files, errors of the others), their images stacked)."""
        good = [(i, t) for i, t, _ in batch if t is not None]
        bad = [{"path": ds.files[i], "error": err} for i, t, err in batch if t is None]
        return ([i for i, _ in good], bad), torch.stack([t for _, t in good]) if good else None

    from contextlib import closing

    from cvlib.inference.loop import infer_batches

    with closing(infer_batches(model, map(readable, loader), dev, amp_dtype=inference_dtype(precision, dev))) as results:
        for (good, bad), logits in results:
            errors += bad
            if logits is not None:
                probs.append(torch.softmax(logits, dim=1).cpu().numpy())
                kept += good
    return Screening(
        files=[ds.files[i] for i in kept],
        labels=[labels[i] for i in kept],
        probs=np.concatenate(probs).astype(np.float32) if probs else np.zeros((0, len(class_names)), np.float32),
        class_names=class_names,
        errors=errors,
    )


def choose_samples(
    true_idx: Sequence[int] | np.ndarray,
    pred_idx: Sequence[int] | np.ndarray,
    losses: Sequence[float] | np.ndarray,
    n: int,
    *,
    seed: int = 0,
    wrong_share: float = 0.5,
) -> list[int]:
    """Which screened images to explain (indices), at most ``n``.

    1. Misclassified images (``true_idx >= 0`` and ``!= pred_idx``), up to ``ceil(wrong_share *
       n)`` of them: one per class in turn (the class with the worst error first), the highest
       loss first within a class, so a single bad class cannot take every slot.
    2. The rest of the budget on correctly classified (or unlabelled) images, stratified across
       classes (true class; predicted class for unlabelled images): one per class in turn,
       classes in a seeded random order, a seeded random image within each class.
    3. Only if those run out: the misclassified images step 1 left out, as in step 1.

    Keeping half the budget for the rest means a weak model's report still shows, per class,
    what the model gets right. Deterministic for a given seed.
    """
    true_idx = np.asarray(true_idx, dtype=np.int64)
    pred_idx = np.asarray(pred_idx, dtype=np.int64)
    losses = np.nan_to_num(np.asarray(losses, dtype=np.float64), nan=0.0)
    total = len(pred_idx)
    if not (len(true_idx) == len(losses) == total):
        raise ValueError("true_idx, pred_idx and losses must have the same length")
    if not 0.0 <= wrong_share <= 1.0:
        raise ValueError(f"wrong_share must be in [0, 1], got {wrong_share}")
    n = max(0, min(int(n), total))
    rng = np.random.default_rng(seed)
    wrong = (true_idx >= 0) & (true_idx != pred_idx)
    group = np.where(true_idx >= 0, true_idx, pred_idx)

    def round_robin(queues: list[list[int]], budget: int) -> list[int]:
        out: list[int] = []
        queues = [list(q) for q in queues if q]
        while queues and len(out) < budget:
            for q in queues:
                if len(out) >= budget:
                    break
                out.append(q.pop(0))
            queues = [q for q in queues if q]
        return out

    wrong_by_class: dict[int, list[int]] = {}
    for i in sorted(np.flatnonzero(wrong), key=lambda i: (-losses[i], i)):
        wrong_by_class.setdefault(int(group[i]), []).append(int(i))
    first = round_robin(list(wrong_by_class.values()), min(int(wrong.sum()), math.ceil(wrong_share * n)))
    taken = set(first)

    rest: dict[int, list[int]] = {}
    for i in rng.permutation(total):  # correct (and unlabelled) images, in random order
        if not wrong[i]:
            rest.setdefault(int(group[i]), []).append(int(i))
    classes = list(rest)
    rng.shuffle(classes)
    second = round_robin([rest[g] for g in classes], n - len(first))
    # Only when there are too few of those: the misclassified ones phase 1 left out.
    leftover = [[i for i in items if i not in taken] for items in wrong_by_class.values()]
    return first + second + round_robin(leftover, n - len(first) - len(second))


def sampling_note(screening: Screening, picked: Sequence[int], what: str) -> str:
    """One sentence for the report on how its images were chosen (:func:`choose_samples`'s rule,
    with this run's counts), so a reader knows the page is not a random sample."""
    wrong = (screening.true_idx >= 0) & (screening.true_idx != screening.preds)
    chosen_wrong = int(wrong[picked].sum()) if picked else 0
    return (
        f"{len(picked)} of {len(screening.files)} {what} explained, chosen after one pass over all of them: "
        f"{chosen_wrong} of the {int(wrong.sum())} misclassified (highest loss first, spread across classes, at most half "
        f"the budget), then correctly classified ones stratified across classes."
    )
