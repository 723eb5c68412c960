"""Grad-CAM report: one self-contained HTML file that a reviewer opens before a new champion goes
live, or to see what a model looks at in a folder of images.

What it holds, in reading order: a summary (model, data, metrics, faithfulness of the maps), the
validation figures (confusion matrix, training curves, ...), the top confusions, the misclassified
examples ranked by loss (each with the CAM of the predicted and of the true class), then one
gallery per class (input crop, heat map, overlay, top-5 bars); optionally (off by default) the
feature maps of a few layers for the first few images (:func:`explain_feature_maps`). A small
inline script filters the cards (only misclassified, one class, a confusion pair, a file name).

Self-contained: images are PNG data URIs, the CSS and the script are inline, and a Content-
Security-Policy forbids every network fetch. Everything user-supplied (file names, labels) goes
through Jinja2's autoescaping; the script reads it back from escaped attributes, never from
strings spliced into code.

How the images are chosen (:func:`screen_files` + :func:`choose_samples`): one cheap pass over
all candidates without CAM gives every image's prediction and loss; the misclassified ones come
first (worst loss first, spread across classes), the rest of the budget is stratified across
classes; only the chosen images then get CAMs (:func:`explain_files`).

Pure library: torch, numpy, PIL, jinja2; no Prefect, no MLflow.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from jinja2 import Environment, PackageLoader, StrictUndefined
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cvlib.data.imageio import ImageReadError, load_rgb
from cvlib.data.transforms import denormalize, eval_preset_from
from cvlib.explain.featuremaps import LayerMaps, choose_layers, feature_map_panels
from cvlib.explain.gradcam import deletion_score, explain_batch, heatmap_rgb, overlay
from cvlib.files.atomic import write_bytes_atomic
from cvlib.models.factory import eval_mode, pick_device
from cvlib.models.precision import autocast as precision_autocast
from cvlib.models.precision import inference_dtype

__all__ = [
    "DELETION_FRACTION",
    "FIGURES",
    "FeatureMapSample",
    "ReportSample",
    "Screening",
    "choose_samples",
    "confusions_from_matrix",
    "explain_feature_maps",
    "explain_files",
    "faithfulness_summary",
    "load_evaluation",
    "png_b64",
    "render_report",
    "screen_files",
    "top_confusions",
    "write_report",
]

#: Share of pixels blurred away to measure faithfulness (top CAM pixels vs random pixels).
DELETION_FRACTION = 0.2

#: Mean drop (CAM minus random) from which the summary calls the maps faithful.
FAITHFUL_GAP = 0.02

#: Validation figures the report embeds when it finds them, in this order, with their captions.
FIGURES: dict[str, str] = {
    "confusion_matrix.png": "Confusion matrix (rows: true class; colour: share of the row)",
    "training_curves.png": "Training curves",
    "per_class_f1.png": "Per-class F1 (validation)",
    "reliability.png": "Reliability diagram (calibration)",
    "augmentation_preview.png": "Augmentation preview (one training image)",
}

# Metric names the summary table knows, with how to show them.
_METRICS: dict[str, tuple[str, bool]] = {  # name -> (label, as percent)
    "top1": ("top-1", True),
    "top5": ("top-5", True),
    "macro_f1": ("macro F1", False),
    "balanced_accuracy": ("balanced acc.", True),
    "ece": ("ECE", False),
    "loss": ("loss", False),
}
_WIDE_FIGURES = {"training_curves.png", "augmentation_preview.png"}
_SPLITS = {"val": "validation", "test": "test", "train": "train", "": "images"}


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


def png_b64(array_or_image: np.ndarray | Image.Image) -> str:
    img = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _env() -> Environment:
    # autoescape=True for everything this environment renders (not by file name): the report
    # template is the only one, and user data must never reach it unescaped.
    env = Environment(loader=PackageLoader("cvlib.explain", "templates"), autoescape=True, undefined=StrictUndefined)
    env.filters["pct"] = lambda v, digits=1: "–" if v is None or _nan(v) else f"{100 * float(v):.{digits}f}%"
    env.filters["num"] = _num
    env.filters["signed"] = _signed
    return env


def _num(v: object, digits: int = 3) -> str:
    if v is None or _nan(v):
        return "–"
    text = f"{float(v):.{digits}f}"
    return f"{0:.{digits}f}" if float(text) == 0 else text.replace("-", "\u2212")


def _signed(v: object, digits: int = 2) -> str:
    if v is None or _nan(v):
        return "–"
    text = f"{float(v):+.{digits}f}"
    if float(text) == 0:  # no "-0.000"
        return f"{0:.{digits}f}"
    return text.replace("-", "\u2212")


def _nan(v: object) -> bool:
    return isinstance(v, float) and math.isnan(v)




def _source(root: Path, rel: str) -> Path:
    return root / rel if root.is_dir() else root


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
    loader = DataLoader(ds, batch_size=max(1, batch_size), shuffle=False, num_workers=num_workers, collate_fn=_as_list)
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


# --------------------------------------------------------------------------------------------
# explaining the chosen images
# --------------------------------------------------------------------------------------------


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
    index = {c: i for i, c in enumerate(class_names)}
    pre = meta["preprocessing"]
    preset = eval_preset_from(pre)
    labels = list(labels) if labels is not None else [None] * len(files)
    if len(labels) != len(files):
        raise ValueError(f"{len(labels)} labels for {len(files)} files")
    samples: list[ReportSample] = []
    errors: list[dict] = []
    loaded: list[tuple[str, str | None, torch.Tensor]] = []
    for rel, label in zip(files, labels, strict=True):
        try:
            loaded.append((rel, label, _crop(root, rel, pre, preset)))
        except ImageReadError as exc:
            errors.append({"path": rel, "error": f"{exc.reason}: {exc.message}"})
    k = min(5, len(class_names))
    for start in range(0, len(loaded), batch_size):
        chunk = loaded[start : start + batch_size]
        images = torch.stack([t for _, _, t in chunk]).to(dev)
        pred_result = explain_batch(model, images, precision=precision)
        true_idx = [index.get(lbl) if lbl is not None else None for _, lbl, _ in chunk]
        wrong = [i for i, t in enumerate(true_idx) if t is not None and t != int(pred_result.targets[i])]
        true_maps = {}
        if wrong:
            true_result = explain_batch(model, images[wrong], targets=[true_idx[i] for i in wrong], precision=precision)
            true_maps = {i: true_result.maps[j] for j, i in enumerate(wrong)}
        drops = None
        if faithfulness:
            drops = deletion_score(
                model, images, pred_result.maps, pred_result.targets, fraction=fraction, seed=seed + start,
                precision=precision,
            )
        shown = (denormalize(images.float().cpu(), pre["mean"], pre["std"]) * 255).round().byte()
        shown = shown.permute(0, 2, 3, 1).numpy()
        for i, (rel, label, _) in enumerate(chunk):
            probs = pred_result.probs[i]
            top = np.argsort(-probs, kind="stable")[:k]
            pred = int(pred_result.targets[i])
            t = true_idx[i]
            samples.append(
                ReportSample(
                    path=rel,
                    true=label,
                    pred=class_names[pred],
                    correct=t is None or t == pred,
                    loss=float(-np.log(max(float(probs[t]), 1e-12))) if t is not None else None,
                    top5=[(class_names[c], float(probs[c])) for c in top],
                    original=png_b64(shown[i]),
                    heatmap=png_b64(heatmap_rgb(pred_result.maps[i])),
                    overlay=png_b64(overlay(shown[i], pred_result.maps[i])),
                    true_overlay=png_b64(overlay(shown[i], true_maps[i])) if i in true_maps else None,
                    true_heatmap=png_b64(heatmap_rgb(true_maps[i])) if i in true_maps else None,
                    confidence=float(probs[pred]),
                    p_true=float(probs[t]) if t is not None else None,
                    cam_drop=float(drops["cam_drop"][i]) if drops is not None else None,
                    random_drop=float(drops["random_drop"][i]) if drops is not None else None,
                    size=int(shown.shape[1]),
                    flat=not bool(pred_result.maps[i].max() > 0),
                    true_flat=i in true_maps and not bool(true_maps[i].max() > 0),
                )
            )
    samples.sort(key=lambda s: (s.correct, -(s.loss or 0.0), s.path))
    return samples, errors


def _crop(root: Path, rel: str, pre: Mapping, preset) -> torch.Tensor:
    """The normalised crop the model sees for one file (raises ImageReadError)."""
    return preset(load_rgb(_source(root, rel), draft_size=(int(pre["resize_size"]),) * 2))


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
            crops.append(_crop(root, s.path, pre, preset))
        except ImageReadError:  # it was read a moment ago; gone now: the next image takes its place
            continue
        picked.append(s)
    if not picked:
        return []
    panels = feature_map_panels(model, torch.stack(crops), chosen, channels=channels)
    return [FeatureMapSample(path=s.path, original=s.original, layers=p) for s, p in zip(picked, panels, strict=True)]


# --------------------------------------------------------------------------------------------
# what the report says about them
# --------------------------------------------------------------------------------------------


def top_confusions(samples: Sequence[ReportSample], n: int = 10) -> list[dict]:
    """Most frequent (true, predicted) pairs among the explained images."""
    counts = Counter((s.true, s.pred) for s in samples if s.true is not None and not s.correct)
    totals = Counter(s.true for s in samples if s.true is not None)
    return [
        {"true": t, "pred": p, "count": c, "share": c / totals[t] if totals[t] else None}
        for (t, p), c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
    ]


def confusions_from_matrix(cm: Sequence[Sequence[int]] | np.ndarray, class_names: Sequence[str], n: int = 10) -> list[dict]:
    """Most frequent off-diagonal cells of a confusion matrix (rows true, columns predicted), with
    each cell's share of its true class."""
    cm = np.asarray(cm, dtype=np.int64)
    k = len(class_names)
    if cm.shape != (k, k):
        raise ValueError(f"confusion matrix must be {k}x{k} for {k} classes, got {cm.shape}")
    rows = cm.sum(axis=1)
    cells = [(int(cm[i, j]), i, j) for i in range(k) for j in range(k) if i != j and cm[i, j] > 0]
    cells.sort(key=lambda c: (-c[0], c[1], c[2]))
    return [
        {"true": class_names[i], "pred": class_names[j], "count": c, "share": c / rows[i] if rows[i] else None}
        for c, i, j in cells[:n]
    ]


def faithfulness_summary(samples: Sequence[ReportSample]) -> dict | None:
    """Means of the per-image confidence drops, and how often the CAM beat random deletion."""
    scored = [s for s in samples if s.cam_drop is not None and s.random_drop is not None]
    if not scored:
        return None
    cam = np.array([s.cam_drop for s in scored], dtype=np.float64)
    rnd = np.array([s.random_drop for s in scored], dtype=np.float64)
    gap = float(cam.mean() - rnd.mean())
    wins = int((cam > rnd).sum())
    if max(abs(cam.mean()), abs(rnd.mean())) < FAITHFUL_GAP / 2:
        verdict, level = "inconclusive: blurring barely moves the model's confidence (a low-confidence model, or images too smooth for the blur)", "meh"
    elif gap >= FAITHFUL_GAP and 2 * wins > len(scored):
        verdict, level = "the maps point at pixels the model relies on", "ok"
    elif gap > 0:
        verdict, level = "weak: the maps are only slightly better than random pixels", "meh"
    else:
        verdict, level = "the maps are no better than random pixels: do not trust them", "warn"
    return {
        "verdict": verdict,
        "level": level,
        "n": len(scored),
        "fraction": DELETION_FRACTION,
        "cam_drop_mean": float(cam.mean()),
        "random_drop_mean": float(rnd.mean()),
        "gap": gap,
        "beats_random": wins,
    }


def load_evaluation(*folders: str | os.PathLike[str] | None) -> tuple[dict[str, bytes], dict | None]:
    """The validation figures (:data:`FIGURES`, first folder that has each) and
    ``val_metrics.json`` (None when absent) written by the validation stage."""
    figures: dict[str, bytes] = {}
    metrics: dict | None = None
    dirs = [Path(f) for f in folders if f]
    for name in FIGURES:
        for d in dirs:
            if (d / name).is_file():
                figures[name] = (d / name).read_bytes()
                break
    for d in dirs:
        if (d / "val_metrics.json").is_file():
            metrics = json.loads((d / "val_metrics.json").read_text())
            break
    return figures, metrics


def metric_table(metrics: Mapping[str, float]) -> dict:
    """``{"columns": [...], "rows": [{"split", "values"}]}`` from flat ``{split}_{name}``
    metrics (``val_top1``, ``test_loss``, or ``top1`` with no split)."""
    found: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        for name in _METRICS:
            if key == name or key.endswith("_" + name):
                split = key[: -len(name)].rstrip("_")
                found.setdefault(split, {})[name] = value
                break
    columns = [n for n in _METRICS if any(n in v for v in found.values())]
    order = sorted(found, key=lambda s: (list(_SPLITS).index(s) if s in _SPLITS else 99, s))
    rows = []
    for split in order:
        values = []
        for name in columns:
            v = found[split].get(name)
            if v is None or _nan(float(v)):
                values.append("–")
            elif _METRICS[name][1]:
                values.append(f"{100 * float(v):.1f}%")
            else:
                values.append(f"{float(v):.3f}")
        rows.append({"split": _SPLITS.get(split, split), "values": values})
    return {"columns": [_METRICS[c][0] for c in columns], "rows": rows}


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _galleries(samples: Sequence[ReportSample], class_names: Sequence[str], per_class: Mapping | None) -> list[dict]:
    order = {c: i for i, c in enumerate(class_names)}
    names = sorted({s.group for s in samples}, key=lambda c: (order.get(c, len(order)), c))
    out = []
    for name in names:
        mine = [s for s in samples if s.group == name]
        out.append(
            {
                "name": name,
                "items": [s for s in mine if s.correct],
                "n_wrong": sum(not s.correct for s in mine),
                "stats": (per_class or {}).get(name),
            }
        )
    return out


def render_report(
    samples: Sequence[ReportSample],
    *,
    title: str,
    subtitle: str = "",
    summary: Mapping[str, object] | None = None,
    metrics: Mapping[str, float] | None = None,
    figures: Mapping[str, bytes] | None = None,
    errors: Sequence[dict] = (),
    confusions: Sequence[Mapping] | None = None,
    confusions_scope: str = "",
    per_class: Mapping[str, Mapping] | None = None,
    class_names: Sequence[str] | None = None,
    sampling: str = "",
    feature_maps: Sequence[FeatureMapSample] | None = None,
) -> str:
    """The HTML page. ``samples`` in display order (misclassified first by loss, as
    :func:`explain_files` returns them). ``confusions``: e.g. :func:`confusions_from_matrix` over
    the whole split; default: counted over ``samples``. ``figures``: PNG bytes by file name
    (:data:`FIGURES` names get captions). ``per_class``: ``val_metrics.json``'s, shown on the
    galleries. ``feature_maps``: :func:`explain_feature_maps`'s; None (the default) leaves the
    "Feature maps" section out."""
    samples = list(samples)
    wrong = [s for s in samples if not s.correct]
    if confusions is None:
        confusions = top_confusions(samples)
        confusions_scope = confusions_scope or f"among the {len(samples)} explained images"
    pairs = Counter((s.true, s.pred) for s in wrong)
    confusions = [dict(c, explained=pairs.get((c["true"], c["pred"]), 0)) for c in confusions]
    class_names = list(class_names) if class_names is not None else []
    figs = [
        {"name": name, "caption": FIGURES.get(name, name), "data": base64.b64encode(data).decode("ascii"), "wide": name in _WIDE_FIGURES}
        for name, data in sorted((figures or {}).items(), key=lambda kv: (list(FIGURES).index(kv[0]) if kv[0] in FIGURES else 99, kv[0]))
    ]
    cm_figure = next((f for f in figs if f["name"] == "confusion_matrix.png"), None)
    figs = [f for f in figs if f is not cm_figure]
    galleries = _galleries(samples, class_names, per_class)
    template = _env().get_template("report.html.j2")
    return template.render(
        title=title,
        subtitle=subtitle,
        summary={str(k): _fmt(v) for k, v in (summary or {}).items()},
        metrics=metric_table(metrics or {}),
        faith=faithfulness_summary(samples),
        figures=figs,
        cm_figure=cm_figure,
        confusions=list(confusions),
        confusions_scope=confusions_scope,
        wrong=wrong,
        galleries=galleries,
        filter_classes=[g["name"] for g in galleries],
        n_items=len(samples),
        n_labelled=sum(s.true is not None for s in samples),
        errors=list(errors),
        sampling=sampling,
        pixelated=bool(samples) and min(s.size or 999 for s in samples) < 96,
        fraction_pct=round(100 * DELETION_FRACTION),
        feature_maps=_feature_map_context(feature_maps),
    )


def _feature_map_context(feature_maps: Sequence[FeatureMapSample] | None) -> dict | None:
    if feature_maps is None:
        return None
    items = [
        {
            "path": fm.path,
            "original": fm.original,
            "layers": [
                {"name": lm.layer, "channels": list(lm.channels), "n_channels": lm.n_channels, "h": lm.size[0],
                 "w": lm.size[1], "data": base64.b64encode(lm.png).decode("ascii")}
                for lm in fm.layers
            ],
        }
        for fm in feature_maps
    ]
    layers = list(dict.fromkeys(lm["name"] for item in items for lm in item["layers"]))
    shown = max((len(lm["channels"]) for item in items for lm in item["layers"]), default=0)
    return {"items": items, "layers": layers, "channels": shown}


def write_report(html: str, out: str | os.PathLike[str]) -> Path:
    """Write atomically so a browser never opens half a report."""
    return write_bytes_atomic(out, html.encode("utf-8"))
