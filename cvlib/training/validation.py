"""Validation of a trained checkpoint on the held-out splits: the numbers the promotion gate
compares, with the figures a reviewer looks at before a model replaces the champion."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from cvlib.training.evaluate import evaluate_split
from cvlib.training.metrics import classification_metrics
from cvlib.training.plots import confusion_matrix_png, per_class_f1_png, reliability_png, training_curves_png


@dataclass
class ValidationReport:
    metrics: dict[str, float]  # val_* (and test_* with a test split), ready for MLflow
    n: int  # validation samples


def validate_model(
    model: nn.Module,
    meta: Mapping[str, Any],
    data_dir: str | os.PathLike[str],
    manifest: pd.DataFrame,
    history: Sequence[Mapping[str, Any]],
    out_dir: str | os.PathLike[str],
    *,
    batch_size: int = 64,
    num_workers: int = 2,
) -> ValidationReport:
    """Evaluate ``model`` on the validation split and the test split when there is one; write
    each split's metrics as JSON, the validation figures and the training curves to ``out_dir``."""
    if not ((manifest["split"] == "val") & (manifest["status"] == "ok")).any():
        # The champion gate compares validation metrics: without them there is nothing to register on.
        raise ValueError(f"no validation images in the manifest of {data_dir}: set data.val_fraction above 0")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, float] = {}
    n = 0
    for split in ("val", "test"):
        if not ((manifest["split"] == split) & (manifest["status"] == "ok")).any():
            continue
        ev = evaluate_split(model, meta, data_dir, manifest, split, batch_size=batch_size, num_workers=num_workers)
        report = classification_metrics(ev.targets, ev.probs, meta["class_names"], prefix=f"{split}_")
        metrics |= report["metrics"] | {f"{split}_loss": ev.loss}
        (out / f"{split}_metrics.json").write_text(json.dumps(report, indent=2))
        if split == "val":
            (out / "confusion_matrix.png").write_bytes(confusion_matrix_png(report["confusion_matrix"], meta["class_names"]))
            (out / "per_class_f1.png").write_bytes(per_class_f1_png(report["per_class"]))
            (out / "reliability.png").write_bytes(reliability_png(report["calibration"]))
            n = ev.n
    (out / "training_curves.png").write_bytes(training_curves_png(history))
    return ValidationReport(metrics, n)
