"""Classification metrics from predicted probabilities: what a reviewer needs to decide whether a
model may replace the champion, beyond a single accuracy number."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def confusion_matrix(targets: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(targets, int), np.asarray(preds, int)), 1)
    return cm


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, n_bins: int = 15) -> tuple[float, dict]:
    """ECE with equal-width confidence bins; also returns the bins for a reliability diagram."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == targets).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ids = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    counts = np.bincount(ids, minlength=n_bins).astype(float)
    acc = np.bincount(ids, weights=correct, minlength=n_bins) / np.maximum(counts, 1)
    mean_conf = np.bincount(ids, weights=conf, minlength=n_bins) / np.maximum(counts, 1)
    n = max(len(targets), 1)
    ece = float(np.sum(counts / n * np.abs(acc - mean_conf)))
    return ece, {"edges": edges.tolist(), "counts": counts.tolist(), "accuracy": acc.tolist(), "confidence": mean_conf.tolist()}


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros_like(a, dtype=float), where=b > 0)


def classification_metrics(targets: np.ndarray, probs: np.ndarray, class_names: Sequence[str], *, prefix: str = "val_") -> dict:
    """Top-1/top-5, per-class precision/recall/F1, macro-F1, balanced accuracy, ECE and the
    confusion matrix. Scalars are under ``metrics`` (ready for MLflow); arrays beside them."""
    targets = np.asarray(targets, dtype=int)
    probs = np.asarray(probs, dtype=float)
    k = len(class_names)
    if len(targets) == 0:
        raise ValueError("no samples to evaluate")
    preds = probs.argmax(axis=1)
    cm = confusion_matrix(targets, preds, k)
    tp = np.diag(cm).astype(float)
    precision = _safe_div(tp, cm.sum(axis=0).astype(float))
    support = cm.sum(axis=1).astype(float)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    present = support > 0  # classes absent from this split do not drag the averages to zero
    top = np.argsort(-probs, axis=1)[:, : min(5, k)]
    ece, bins = expected_calibration_error(probs, targets)
    metrics = {
        f"{prefix}top1": float((preds == targets).mean()),
        f"{prefix}top5": float((top == targets[:, None]).any(axis=1).mean()),
        f"{prefix}macro_f1": float(f1[present].mean()),
        f"{prefix}balanced_accuracy": float(recall[present].mean()),
        f"{prefix}ece": ece,
    }
    per_class = {
        name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
        for i, name in enumerate(class_names)
    }
    return {"metrics": metrics, "per_class": per_class, "confusion_matrix": cm.tolist(), "calibration": bins, "class_names": list(class_names)}
