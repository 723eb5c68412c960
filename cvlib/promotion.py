"""The champion/challenger promotion rule.

Pure: the registry task reads the champion and re-measures it, then asks :func:`decide`. Keeping
the rule free of MLflow lets every branch of it be tested without a server.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field

from cvlib.strict import StrictModel


class GateConfig(StrictModel):
    """When a new version may replace the champion."""

    metric: str = Field("val_top1", description="Validation metric compared (higher is better).")
    margin: float = Field(0.0, ge=0.0, description="The challenger must beat the champion by more than this.")
    promote_on_class_change: bool = Field(
        False, description="Promote when the class list changed (the champion cannot be scored on the new labels)."
    )


class _Record(BaseModel):
    """Immutable: a decision, once taken, is what the tags and the artifact say."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Champion(_Record):
    """What the gate knows of the version holding the champion alias."""

    version: str
    class_names: tuple[str, ...]
    score: float | None = Field(
        None, description="The gate metric re-measured on the challenger's validation split; None when it was not "
        "measured (same version, or a changed class list)."
    )


class GateDecision(_Record):
    """The gate's verdict and the numbers behind it (become version tags and a Prefect artifact)."""

    promoted: bool
    reason: str
    metric: str
    challenger_score: float
    champion_score: float | None = None
    champion_version: str | None = None


def class_change(champion_classes: Sequence[str], challenger_classes: Sequence[str]) -> str | None:
    """Why the two versions cannot be compared, or None when they can.

    A champion trained on other labels cannot be scored on the challenger's split, so the caller
    measures it only when this is None.
    """
    if list(champion_classes) == list(challenger_classes):
        return None
    return f"class list changed ({len(champion_classes)} -> {len(challenger_classes)} classes)"


def challenger_score(gate: GateConfig, metrics: Mapping[str, float]) -> float:
    """The challenger's score on the gate metric; an unknown metric is a configuration error."""
    return score_on(gate.metric, metrics)


def score_on(metric: str, metrics: Mapping[str, float]) -> float:
    """``metrics[metric]``, or an error naming the metrics there are (a misspelt gate metric)."""
    if metric not in metrics:
        raise ValueError(f"unknown gate metric {metric!r}; choose one of {sorted(metrics)}")
    return float(metrics[metric])


def decide(
    gate: GateConfig,
    challenger_version: str,
    challenger_metrics: Mapping[str, float],
    challenger_classes: Sequence[str],
    champion: Champion | None,
) -> GateDecision:
    """Promote when there is no champion yet, or when the challenger's ``gate.metric`` beats the
    champion's, re-measured on the same split, by more than ``gate.margin``. Scores recorded at
    the champion's own training time came from another split and are never compared."""
    new = challenger_score(gate, challenger_metrics)
    record = {"metric": gate.metric, "challenger_score": new}
    if champion is None:
        return GateDecision(promoted=True, reason="no champion yet: the first version becomes champion", **record)
    record["champion_version"] = champion.version
    if champion.version == challenger_version:
        return GateDecision(promoted=True, reason="already champion", **record)
    changed = class_change(champion.class_names, challenger_classes)
    if changed:
        promoted = gate.promote_on_class_change
        kept = "promoted by configuration" if promoted else f"kept champion v{champion.version}"
        return GateDecision(promoted=promoted, reason=f"{changed}; {kept}", **record)
    if champion.score is None:
        raise ValueError(f"champion v{champion.version} has the same classes but was not re-measured on {gate.metric!r}")
    promoted = new > champion.score + gate.margin
    reason = (
        f"{gate.metric}: challenger {new:.4f} vs champion v{champion.version} {champion.score:.4f} "
        f"(margin {gate.margin}): {'challenger wins' if promoted else 'champion stays'}"
    )
    return GateDecision(promoted=promoted, reason=reason, champion_score=champion.score, **record)
