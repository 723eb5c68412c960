"""cvlib.promotion: the champion/challenger rule on its own, without an MLflow server.

The reason texts are pinned: they become version tags and the line the report shows, so a
reviewer reads the same words whatever changes around the rule.
"""

from __future__ import annotations

import pickle

import pytest
from pydantic import ValidationError

from cvlib.promotion import Champion, GateConfig, GateDecision, challenger_score, class_change, decide

DIGITS = tuple(str(d) for d in range(10))


def _champion(score: float | None = 0.8, version: str = "3", classes: tuple[str, ...] = DIGITS) -> Champion:
    return Champion(version=version, class_names=classes, score=score)


def _decide(new: float, champion: Champion | None, gate: GateConfig | None = None, classes=DIGITS) -> GateDecision:
    return decide(gate or GateConfig(), "4", {"val_top1": new, "val_loss": 0.3}, classes, champion)


def test_first_version_becomes_champion():
    d = _decide(0.1, None)
    assert d == GateDecision(
        promoted=True, reason="no champion yet: the first version becomes champion", metric="val_top1", challenger_score=0.1
    )
    assert d.champion_score is None and d.champion_version is None


def test_a_version_that_already_holds_the_alias_stays_champion():
    """A retried gate finds its own version as champion: nothing to compare, and no score needed."""
    d = decide(GateConfig(margin=0.5), "3", {"val_top1": 0.0}, DIGITS, _champion(score=None, version="3"))
    assert (d.promoted, d.reason, d.champion_version, d.champion_score) == (True, "already champion", "3", None)


def test_challenger_that_wins_by_more_than_the_margin_is_promoted():
    d = _decide(0.9, _champion(0.8), GateConfig(margin=0.05))
    assert d.promoted is True
    assert d.reason == "val_top1: challenger 0.9000 vs champion v3 0.8000 (margin 0.05): challenger wins"
    assert (d.challenger_score, d.champion_score, d.champion_version) == (0.9, 0.8, "3")


@pytest.mark.parametrize(
    ("new", "margin"),
    [(0.5, 0.0), (0.7, 0.25), (0.75, 0.25), (0.25, 0.0)],  # exact in binary: no rounding decides
    ids=["tie", "inside-margin", "exactly-the-margin", "worse"],
)
def test_tie_or_win_inside_the_margin_keeps_the_champion(new, margin):
    """The margin must be beaten, not reached: a tie keeps the champion."""
    d = _decide(new, _champion(0.5), GateConfig(margin=margin))
    assert d.promoted is False
    assert d.reason == f"val_top1: challenger {new:.4f} vs champion v3 0.5000 (margin {margin}): champion stays"
    assert _decide(0.5 + margin + 0.0625, _champion(0.5), GateConfig(margin=margin)).promoted is True


def test_the_gate_compares_the_configured_metric():
    d = decide(GateConfig(metric="val_loss"), "4", {"val_top1": 0.1, "val_loss": 0.5}, DIGITS, _champion(0.4))
    assert d.promoted is True and d.metric == "val_loss" and d.challenger_score == 0.5
    assert d.reason.startswith("val_loss: challenger 0.5000 vs champion v3 0.4000")


@pytest.mark.parametrize(
    ("classes", "promote", "promoted", "reason"),
    [
        (DIGITS[:9], False, False, "class list changed (10 -> 9 classes); kept champion v3"),
        (DIGITS[:9], True, True, "class list changed (10 -> 9 classes); promoted by configuration"),
        (tuple(reversed(DIGITS)), False, False, "class list changed (10 -> 10 classes); kept champion v3"),
    ],
    ids=["kept", "promoted-by-configuration", "same-classes-other-order"],
)
def test_class_list_change_follows_the_configuration(classes, promote, promoted, reason):
    """The champion cannot be scored on other labels: the configuration decides, whatever the scores."""
    d = _decide(0.99, _champion(score=None), GateConfig(promote_on_class_change=promote), classes=classes)
    assert (d.promoted, d.reason, d.champion_version, d.champion_score) == (promoted, reason, "3", None)


def test_class_change_names_both_sizes_and_only_an_identical_list_is_comparable():
    assert class_change(DIGITS, list(DIGITS)) is None
    assert class_change(DIGITS, DIGITS + ("x",)) == "class list changed (10 -> 11 classes)"
    assert class_change(("a", "b"), ("b", "a")) is not None


def test_unknown_metric_is_a_configuration_error_naming_the_choices():
    with pytest.raises(ValueError, match=r"unknown gate metric 'val_f1'; choose one of \['val_loss', 'val_top1'\]"):
        _decide(0.9, None, GateConfig(metric="val_f1"))
    with pytest.raises(ValueError, match="unknown gate metric"):
        challenger_score(GateConfig(metric="top1"), {"val_top1": 0.5})
    assert challenger_score(GateConfig(), {"val_top1": 1}) == 1.0


def test_a_comparable_champion_must_have_been_measured():
    """Promoting against a champion nobody measured would be a guess: the caller's bug, said loudly."""
    with pytest.raises(ValueError, match="v3 has the same classes but was not re-measured"):
        _decide(0.9, _champion(score=None))


def test_the_decision_is_immutable_and_survives_serialisation():
    """It is a persisted Prefect task result (pickled) and part of the flow's returned record."""
    d = _decide(0.9, _champion(0.8))
    with pytest.raises(ValidationError):
        d.promoted = False
    assert pickle.loads(pickle.dumps(d)) == d
    assert GateDecision.model_validate_json(d.model_dump_json()) == d
    with pytest.raises(ValidationError):
        GateDecision.model_validate({**d.model_dump(), "extra": 1})
