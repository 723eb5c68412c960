"""What a report says about the model, beyond the pictures: the most frequent confusions (over
the explained images or a whole split's confusion matrix), a verdict on the maps' faithfulness,
the metrics table, and the validation stage's figures and metrics read back from disk.

Plain data in, plain data out (dicts and lists the template and the Prefect markdown artifact
both read), so the numbers a reviewer sees in the UI and in the HTML are the same.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from cvlib.explain.faithfulness import DELETION_FRACTION
from cvlib.explain.samples import ReportSample

__all__ = [
    "FAITHFUL_GAP",
    "FIGURES",
    "confusions_from_matrix",
    "faithfulness_summary",
    "load_evaluation",
    "metric_table",
    "top_confusions",
]

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
_SPLITS = {"val": "validation", "test": "test", "train": "train", "": "images"}


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
            if v is None or math.isnan(float(v)):
                values.append("–")
            elif _METRICS[name][1]:
                values.append(f"{100 * float(v):.1f}%")
            else:
                values.append(f"{float(v):.3f}")
        rows.append({"split": _SPLITS.get(split, split), "values": values})
    return {"columns": [_METRICS[c][0] for c in columns], "rows": rows}
