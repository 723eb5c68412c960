"""Grad-CAM report: one self-contained HTML file (images embedded as data URIs, nothing fetched)
that a reviewer opens before a new champion goes live. Everything user-supplied (file names,
labels) goes through Jinja2's autoescaping."""

from __future__ import annotations

import base64
import io
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from jinja2 import Environment, PackageLoader, select_autoescape
from PIL import Image
from torch import nn

from cvlib.atomic import write_bytes_atomic
from cvlib.gradcam import explain_batch, heatmap_rgb, overlay
from cvlib.imageio import ImageReadError, load_rgb
from cvlib.models import pick_device
from cvlib.transforms import denormalize, eval_preset_from


@dataclass
class ReportSample:
    path: str
    true: str | None
    pred: str
    correct: bool
    loss: float | None
    top5: list[tuple[str, float]]
    original: str  # base64 PNG
    heatmap: str
    overlay: str
    true_overlay: str | None = None


def png_b64(array_or_image: np.ndarray | Image.Image) -> str:
    img = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _env() -> Environment:
    return Environment(loader=PackageLoader("cvlib", "templates"), autoescape=select_autoescape(["html", "j2"]))


def explain_files(
    model: nn.Module,
    meta: Mapping,
    root: str | os.PathLike[str],
    files: Sequence[str],
    *,
    labels: Sequence[str | None] | None = None,
    batch_size: int = 16,
    device: str = "auto",
) -> tuple[list[ReportSample], list[dict]]:
    """Grad-CAM for each file; misclassified samples come first, worst loss first."""
    root = Path(root)
    dev = pick_device(device)
    model = model.to(dev)
    class_names = list(meta["class_names"])
    index = {c: i for i, c in enumerate(class_names)}
    pre = meta["preprocessing"]
    preset = eval_preset_from(pre)
    labels = list(labels) if labels is not None else [None] * len(files)
    samples: list[ReportSample] = []
    errors: list[dict] = []
    loaded: list[tuple[str, str | None, torch.Tensor]] = []
    for rel, label in zip(files, labels, strict=True):
        try:
            img = load_rgb(root / rel if root.is_dir() else root, draft_size=(pre["resize_size"],) * 2)
        except ImageReadError as exc:
            errors.append({"path": rel, "error": f"{exc.reason}: {exc.message}"})
            continue
        loaded.append((rel, label, preset(img)))
    k = min(5, len(class_names))
    for start in range(0, len(loaded), batch_size):
        chunk = loaded[start : start + batch_size]
        images = torch.stack([t for _, _, t in chunk]).to(dev)
        pred_result = explain_batch(model, images)
        true_idx = [index.get(lbl) if lbl is not None else None for _, lbl, _ in chunk]
        wrong = [i for i, t in enumerate(true_idx) if t is not None and t != int(pred_result.targets[i])]
        true_maps = {}
        if wrong:
            true_result = explain_batch(model, images[wrong], targets=[true_idx[i] for i in wrong])
            true_maps = {i: true_result.maps[j] for j, i in enumerate(wrong)}
        shown = (denormalize(images.float().cpu(), pre["mean"], pre["std"]) * 255).round().byte()
        shown = shown.permute(0, 2, 3, 1).numpy()
        for i, (rel, label, _) in enumerate(chunk):
            probs = pred_result.probs[i]
            top = np.argsort(-probs)[:k]
            pred = int(pred_result.targets[i])
            t = true_idx[i]
            loss = float(-np.log(max(float(probs[t]), 1e-12))) if t is not None else None
            samples.append(
                ReportSample(
                    path=rel,
                    true=label,
                    pred=class_names[pred],
                    correct=t is None or t == pred,
                    loss=loss,
                    top5=[(class_names[c], float(probs[c])) for c in top],
                    original=png_b64(shown[i]),
                    heatmap=png_b64(heatmap_rgb(pred_result.maps[i])),
                    overlay=png_b64(overlay(shown[i], pred_result.maps[i])),
                    true_overlay=png_b64(overlay(shown[i], true_maps[i])) if i in true_maps else None,
                )
            )
    samples.sort(key=lambda s: (s.correct, -(s.loss or 0.0), s.path))
    return samples, errors


def top_confusions(samples: Sequence[ReportSample], n: int = 10) -> list[dict]:
    counts = Counter((s.true, s.pred) for s in samples if s.true is not None and not s.correct)
    return [{"true": t, "pred": p, "count": c} for (t, p), c in counts.most_common(n)]


def render_report(
    samples: Sequence[ReportSample],
    *,
    title: str,
    subtitle: str = "",
    summary: Mapping[str, object] | None = None,
    figures: Mapping[str, bytes] | None = None,
    errors: Sequence[dict] = (),
) -> str:
    template = _env().get_template("report.html.j2")
    return template.render(
        title=title,
        subtitle=subtitle,
        summary=dict(summary or {}),
        figures={k: base64.b64encode(v).decode("ascii") for k, v in (figures or {}).items()},
        confusions=top_confusions(samples),
        items=list(samples),
        n_wrong=sum(not s.correct for s in samples),
        errors=list(errors),
    )


def write_report(html: str, out: str | os.PathLike[str]) -> Path:
    """Write atomically so a browser never opens half a report."""
    return write_bytes_atomic(out, html.encode("utf-8"))
