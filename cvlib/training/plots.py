"""Figures for MLflow and the report, rendered to PNG bytes with matplotlib's object API and the
Agg canvas (no pyplot: it would touch a notebook's global figure state and backend)."""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", facecolor="white")
    return buf.getvalue()


def confusion_matrix_png(cm: Sequence[Sequence[int]], class_names: Sequence[str]) -> bytes:
    cm = np.asarray(cm)
    n = len(class_names)
    size = min(14.0, 3.0 + 0.45 * n)
    fig = _figure(size, size * 0.85)
    ax = fig.add_subplot()
    row = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, row, out=np.zeros_like(cm, dtype=float), where=row > 0)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    ax.set_xticks(range(n), labels=list(class_names), rotation=45, ha="right")
    ax.set_yticks(range(n), labels=list(class_names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 25:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8, color="white" if norm[i, j] > 0.5 else "black")
    ax.set_title("Confusion matrix (validation)")
    return _png(fig)


def per_class_f1_png(per_class: dict[str, dict[str, float]]) -> bytes:
    names = list(per_class)
    f1 = [per_class[n]["f1"] for n in names]
    fig = _figure(max(5.0, 0.4 * len(names) + 2), 3.5)
    ax = fig.add_subplot()
    ax.bar(range(len(names)), f1, color="#3e63dd")
    ax.set_xticks(range(len(names)), labels=names, rotation=45, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("F1")
    ax.set_title("Per-class F1 (validation)")
    return _png(fig)


def reliability_png(calibration: dict) -> bytes:
    edges = np.asarray(calibration["edges"])
    acc = np.asarray(calibration["accuracy"])
    counts = np.asarray(calibration["counts"])
    centers = (edges[:-1] + edges[1:]) / 2
    fig = _figure(4.5, 4.5)
    ax = fig.add_subplot()
    mask = counts > 0
    ax.bar(centers[mask], acc[mask], width=np.diff(edges)[mask], edgecolor="black", color="#3e63dd", alpha=0.8, label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability diagram")
    ax.legend(loc="upper left")
    return _png(fig)


def _history_rows(history: Sequence[Any]) -> list[Mapping[str, Any]]:
    rows = []
    for h in history:
        if dataclasses.is_dataclass(h) and not isinstance(h, type):
            h = dataclasses.asdict(h)
        if not isinstance(h, Mapping):
            raise TypeError(f"history entries must be dicts (or EpochRecord), got {type(h).__name__}")
        rows.append(h)
    return rows


def training_curves_png(history: Sequence[Mapping[str, Any]]) -> bytes:
    """Loss and top-1 accuracy per epoch, train and validation, side by side, as a PNG.

    ``history``: ``FitResult.to_dict()["history"]`` (dicts with ``epoch``, ``train_loss``,
    ``val_loss``, ``train_top1``, ``val_top1``), or the ``EpochRecord`` objects themselves. A
    missing or NaN value (no validation split) leaves a gap rather than failing. Markers on every
    point, so a one- or two-epoch run still shows something.
    """
    rows = _history_rows(history)
    if not rows:
        raise ValueError("history is empty: no epoch to plot")
    epochs = [int(r.get("epoch", i + 1)) for i, r in enumerate(rows)]

    def series(key: str) -> list[float]:
        return [float(r[key]) if r.get(key) is not None else math.nan for r in rows]

    fig = _figure(9, 3.4)
    for j, (metric, label) in enumerate((("loss", "loss"), ("top1", "top-1 accuracy"))):
        ax = fig.add_subplot(1, 2, j + 1)
        for split, style in (("train", "o-"), ("val", "s--")):
            values = series(f"{split}_{metric}")
            if not all(math.isnan(v) for v in values):
                ax.plot(epochs, values, style, label=split, markersize=4)
        ax.set_xlabel("epoch")
        ax.set_title(label, fontsize=10)
        if metric == "top1":
            ax.set_ylim(-0.02, 1.02)
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if ax.lines:
            ax.legend(fontsize=8)
    return _png(fig)
