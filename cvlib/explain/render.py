"""The report's HTML page: one self-contained file that a reviewer opens before a new champion
goes live, or to see what a model looks at in a folder of images.

What it holds, in reading order: a summary (model, data, metrics, faithfulness of the maps), the
validation figures (confusion matrix, training curves, ...), the top confusions, the misclassified
examples ranked by loss (each with the CAM of the predicted and of the true class), then one
gallery per class (input crop, heat map, overlay, top-5 bars); optionally (off by default) the
feature maps of a few layers for the first few images
(:func:`cvlib.explain.samples.explain_feature_maps`). A small
inline script filters the cards (only misclassified, one class, a confusion pair, a file name).

Self-contained: images are PNG data URIs, the CSS and the script are inline, and a Content-
Security-Policy forbids every network fetch. Everything user-supplied (file names, labels) goes
through Jinja2's autoescaping; the script reads it back from escaped attributes, never from
strings spliced into code.

Pure library: jinja2 and the report's own records; no Prefect, no MLflow.
"""

from __future__ import annotations

import base64
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from jinja2 import Environment, PackageLoader, StrictUndefined

from cvlib.explain.faithfulness import DELETION_FRACTION
from cvlib.explain.samples import FeatureMapSample, ReportSample
from cvlib.explain.summary import FIGURES, faithfulness_summary, metric_table, top_confusions
from cvlib.files.atomic import write_bytes_atomic

__all__ = ["render_report", "write_report"]

_WIDE_FIGURES = {"training_curves.png", "augmentation_preview.png"}


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
    :func:`~cvlib.explain.samples.explain_files` returns them). ``confusions``: e.g.
    :func:`~cvlib.explain.summary.confusions_from_matrix` over the whole split; default: counted
    over ``samples``. ``figures``: PNG bytes by file name (:data:`~cvlib.explain.summary.FIGURES`
    names get captions). ``per_class``: ``val_metrics.json``'s, shown on the galleries.
    ``feature_maps``: :func:`~cvlib.explain.samples.explain_feature_maps`'s; None (the default)
    leaves the "Feature maps" section out."""
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
