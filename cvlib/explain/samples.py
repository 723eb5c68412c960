"""Explaining the chosen images: each becomes a :class:`ReportSample` (its crop, the CAM of the
predicted class and, when the model is wrong, of the true class, the top-5 probabilities and
the deletion faithfulness of the map), and the first few optionally get their feature maps
(:class:`FeatureMapSample`).

Which images are chosen is :mod:`cvlib.explain.screening`'s business; how the samples are shown
is :mod:`cvlib.explain.render`'s.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cvlib.data.imageio import ImageReadError
from cvlib.data.transforms import eval_preset_from
from cvlib.explain.faithfulness import DELETION_FRACTION, deletion_score
from cvlib.explain.featuremaps import LayerMaps, choose_layers, feature_map_panels
from cvlib.explain.gradcam import CamResult, explain_batch
from cvlib.explain.heatmap import heatmap_rgb, overlay
from cvlib.explain.images import display_crops, load_crop, png_b64
from cvlib.models.factory import pick_device

__all__ = ["FeatureMapSample", "ReportSample", "explain_feature_maps", "explain_files"]


@dataclass
class ReportSample:
    """One explained image. Images are base64 PNGs at the crop the model saw."""

    path: str
    true: str | None
    pred: str
    correct: bool
    loss: float | None
    top5: list[tuple[str, float]]
    original: str
    heatmap: str
    overlay: str
    true_overlay: str | None = None
    true_heatmap: str | None = None
    confidence: float = math.nan  # p(predicted class)
    p_true: float | None = None
    cam_drop: float | None = None  # p(pred | clean) - p(pred | top CAM pixels blurred)
    random_drop: float | None = None  # same with as many random pixels blurred
    size: int = 0  # crop side in pixels
    flat: bool = False  # the predicted-class map is all zero: no positive evidence anywhere
    true_flat: bool = False

    @property
    def group(self) -> str:
        """The gallery the image belongs to: its true class, else (unlabelled) the predicted one."""
        return self.true if self.true is not None else self.pred


@dataclass
class FeatureMapSample:
    """Feature maps of one explained image: its crop (base64 PNG, as in :class:`ReportSample`)
    and, per layer, the most active channels as a PNG grid."""

    path: str
    original: str
    layers: list[LayerMaps]


def explain_files(
    model: nn.Module,
    meta: Mapping,
    root: str | os.PathLike[str],
    files: Sequence[str],
    *,
    labels: Sequence[str | None] | None = None,
    batch_size: int = 16,
    device: str = "auto",
    faithfulness: bool = True,
    fraction: float = DELETION_FRACTION,
    seed: int = 0,
    precision: str = "fp32",
) -> tuple[list[ReportSample], list[dict]]:
    """Grad-CAM (predicted class; true class too when they differ) for each file, and the
    deletion faithfulness score of the predicted-class map. Misclassified samples come first,
    worst loss first. ``precision``: the trunk's, see :func:`cvlib.explain.gradcam.explain_batch`."""
    root = Path(root)
    dev = pick_device(device)
    model = model.to(dev)
    class_names = list(meta["class_names"])
    pre = meta["preprocessing"]
    preset = eval_preset_from(pre)
    labels = list(labels) if labels is not None else [None] * len(files)
    if len(labels) != len(files):
        raise ValueError(f"{len(labels)} labels for {len(files)} files")
    errors: list[dict] = []
    loaded: list[tuple[str, str | None, torch.Tensor]] = []
    for rel, label in zip(files, labels, strict=True):
        try:
            loaded.append((rel, label, load_crop(root, rel, pre, preset)))
        except ImageReadError as exc:
            errors.append({"path": rel, "error": f"{exc.reason}: {exc.message}"})
    samples: list[ReportSample] = []
    for start in range(0, len(loaded), batch_size):
        batch = _explain_batch_of_files(
            model, loaded[start : start + batch_size], class_names, pre, dev,
            fraction=fraction if faithfulness else None, seed=seed + start, precision=precision,
        )
        samples += batch.samples()
    samples.sort(key=lambda s: (s.correct, -(s.loss or 0.0), s.path))
    return samples, errors


@dataclass
class _ExplainedBatch:
    """What one batch of crops yields before it is cut into samples: the predicted-class CAMs
    (and probabilities), the true-class CAMs of the misclassified, the deletion drops, and the
    crops as a reader sees them."""

    files: list[tuple[str, str | None]]  # (path, label)
    class_names: list[str]
    true_idx: list[int | None]
    pred: CamResult
    true_maps: dict[int, np.ndarray]
    drops: dict | None
    shown: np.ndarray

    def samples(self) -> list[ReportSample]:
        return [self._sample(i, rel, label) for i, (rel, label) in enumerate(self.files)]

    def _sample(self, i: int, rel: str, label: str | None) -> ReportSample:
        probs = self.pred.probs[i]
        top = np.argsort(-probs, kind="stable")[: min(5, len(self.class_names))]
        pred = int(self.pred.targets[i])
        t = self.true_idx[i]
        cam, true_cam, shown = self.pred.maps[i], self.true_maps.get(i), self.shown[i]
        return ReportSample(
            path=rel,
            true=label,
            pred=self.class_names[pred],
            correct=t is None or t == pred,
            loss=float(-np.log(max(float(probs[t]), 1e-12))) if t is not None else None,
            top5=[(self.class_names[c], float(probs[c])) for c in top],
            original=png_b64(shown),
            heatmap=png_b64(heatmap_rgb(cam)),
            overlay=png_b64(overlay(shown, cam)),
            true_overlay=png_b64(overlay(shown, true_cam)) if true_cam is not None else None,
            true_heatmap=png_b64(heatmap_rgb(true_cam)) if true_cam is not None else None,
            confidence=float(probs[pred]),
            p_true=float(probs[t]) if t is not None else None,
            cam_drop=float(self.drops["cam_drop"][i]) if self.drops is not None else None,
            random_drop=float(self.drops["random_drop"][i]) if self.drops is not None else None,
            size=int(shown.shape[0]),
            flat=not bool(cam.max() > 0),
            true_flat=true_cam is not None and not bool(true_cam.max() > 0),
        )


def _explain_batch_of_files(
    model: nn.Module,
    files: list[tuple[str, str | None, torch.Tensor]],
    class_names: list[str],
    pre: Mapping,
    dev: torch.device,
    *,
    fraction: float | None,
    seed: int,
    precision: str,
) -> _ExplainedBatch:
    """One forward for the predicted-class CAMs, a second only for the misclassified images'
    true classes, and (``fraction`` not None) the deletion score of the predicted-class maps."""
    index = {c: i for i, c in enumerate(class_names)}
    images = torch.stack([t for _, _, t in files]).to(dev)
    pred = explain_batch(model, images, precision=precision)
    true_idx = [index.get(lbl) if lbl is not None else None for _, lbl, _ in files]
    wrong = [i for i, t in enumerate(true_idx) if t is not None and t != int(pred.targets[i])]
    true_maps = {}
    if wrong:
        true_result = explain_batch(model, images[wrong], targets=[true_idx[i] for i in wrong], precision=precision)
        true_maps = {i: true_result.maps[j] for j, i in enumerate(wrong)}
    drops = None
    if fraction is not None:
        drops = deletion_score(model, images, pred.maps, pred.targets, fraction=fraction, seed=seed, precision=precision)
    return _ExplainedBatch(
        [(rel, label) for rel, label, _ in files], class_names, true_idx, pred, true_maps, drops, display_crops(images, pre)
    )


def explain_feature_maps(
    model: nn.Module,
    meta: Mapping,
    root: str | os.PathLike[str],
    samples: Sequence[ReportSample],
    *,
    layers: Sequence[str] | None = None,
    images: int = 2,
    channels: int = 16,
) -> list[FeatureMapSample]:
    """Feature maps for the first ``images`` of ``samples`` (the report's order: misclassified
    first, worst loss first), at the crop the model saw. ``layers``: module names, checked before
    any image is read; none: a few layers from early to late
    (:func:`cvlib.explain.featuremaps.default_layers`). Per image and layer, the ``channels`` channels
    with the highest mean activation. One forward for all the images, hooks on every layer."""
    chosen = choose_layers(model, layers)
    if images < 1:
        return []
    root = Path(root)
    pre = meta["preprocessing"]
    preset = eval_preset_from(pre)
    picked: list[ReportSample] = []
    crops: list[torch.Tensor] = []
    for s in samples:
        if len(picked) >= images:
            break
        try:
            crops.append(load_crop(root, s.path, pre, preset))
        except ImageReadError:  # it was read a moment ago; gone now: the next image takes its place
            continue
        picked.append(s)
    if not picked:
        return []
    panels = feature_map_panels(model, torch.stack(crops), chosen, channels=channels)
    return [FeatureMapSample(path=s.path, original=s.original, layers=p) for s, p in zip(picked, panels, strict=True)]
