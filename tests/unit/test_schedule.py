"""cvlib.training.schedule: linear warm-up then cosine decay to a floor, stepped once per optimizer step.

The factor is checked as a pure function, then through a real AdamW and fit()'s LambdaLR, because that is
where off-by-one errors between "scheduler step" and "optimizer step" show up.
"""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch

from cvlib.training.options import TrainConfig
from cvlib.training.schedule import phase_scheduler, warmup_cosine_factor

W, TOTAL, FLOOR = 4, 20, 0.1


def warmup_cosine(
    opt: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int, min_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """fit()'s scheduler for a one-phase run (no head-only epochs), one step per epoch, so that
    epochs count optimizer steps."""
    tc = TrainConfig(epochs=total_steps, warmup_epochs=warmup_steps, min_lr_ratio=min_ratio)
    return phase_scheduler(opt, tc, steps_per_epoch=1, head_epochs=0)


def factor(step: int, warmup: int = W, total: int = TOTAL, floor: float = FLOOR) -> float:
    return warmup_cosine_factor(step, warmup_steps=warmup, total_steps=total, min_ratio=floor)


def test_warmup_rises_linearly_to_one():
    values = [factor(s) for s in range(W)]
    assert values == pytest.approx([0.25, 0.5, 0.75, 1.0])
    diffs = [b - a for a, b in pairwise(values)]
    assert diffs == pytest.approx([1 / W] * (W - 1))  # linear: constant increments
    assert factor(0) > 0  # the first step already trains


def test_cosine_starts_at_peak_and_ends_at_floor():
    assert factor(W) == pytest.approx(1.0)
    # Half-way through the decay (steps W .. total-1) the cosine is at the mid-point.
    total = 21  # decay over steps 4..20: the mid-point is step 12
    assert factor(12, total=total) == pytest.approx(FLOOR + (1 - FLOOR) / 2)
    # The last optimizer step (TOTAL - 1) and everything after sit on the floor.
    assert factor(TOTAL - 1) == pytest.approx(FLOOR)
    assert factor(TOTAL) == pytest.approx(FLOOR)


def test_never_below_floor_after_the_end():
    """Steps past the planned total (e.g. a resumed run with extra batches) stay on the floor."""
    for step in (TOTAL, TOTAL + 1, TOTAL * 3):
        assert factor(step) == pytest.approx(FLOOR)


def test_monotone_non_increasing_after_warmup():
    values = [factor(s) for s in range(W, TOTAL + 5)]
    assert all(b <= a + 1e-12 for a, b in pairwise(values))
    assert values[0] > values[-1]
    assert all(FLOOR - 1e-12 <= v <= 1.0 + 1e-12 for v in values)


def test_no_warmup_starts_at_peak():
    assert factor(0, warmup=0) == pytest.approx(1.0)
    assert factor(TOTAL - 1, warmup=0) == pytest.approx(FLOOR)
    assert factor(10, warmup=0, total=21) == pytest.approx(FLOOR + (1 - FLOOR) / 2)


def test_floor_of_one_is_constant_after_warmup():
    assert [factor(s, floor=1.0) for s in range(W - 1, TOTAL + 1)] == pytest.approx([1.0] * (TOTAL - W + 2))


def test_warmup_longer_than_run_does_not_divide_by_zero():
    """A one-epoch run with warmup_epochs=1 gives warmup == total: it must not crash."""
    assert factor(3, warmup=5, total=5) == pytest.approx(0.8)
    assert math.isfinite(factor(5, warmup=5, total=5))


def test_last_optimizer_step_uses_the_floor():
    """The docstring defines the factor *at optimizer step* ``step`` (0-based), so the last
    step of a run is ``total_steps - 1``. Here (20 steps, 4 of warm-up, floor 0.1) it is 0.109;
    for a short run such as 4 steps with 1 of warm-up and the default 0.01 floor it is 0.26,
    26x the floor: the cosine never reaches ``min_lr_ratio`` while training."""
    assert factor(TOTAL - 1) == pytest.approx(FLOOR)


# --------------------------------------------------------------------------- with a real optimizer


def _optimizer(lr: float = 1.0) -> torch.optim.Optimizer:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)


def _lrs_used(lr: float, warmup: int, total: int, floor: float) -> list[float]:
    """The lr each optimizer step actually runs with (read before its optimizer.step())."""
    opt = _optimizer(lr)
    sched = warmup_cosine(opt, warmup_steps=warmup, total_steps=total, min_ratio=floor)
    used = []
    for _ in range(total):
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    used.append(opt.param_groups[0]["lr"])  # after the run: what the last EpochRecord reports
    return used


def test_per_iteration_stepping_with_adamw():
    lr = 0.01
    used = _lrs_used(lr, W, TOTAL, FLOOR)
    assert used[0] == pytest.approx(lr / W)  # step 0 is the first warm-up step, not lr=0
    assert used[1] == pytest.approx(lr * 2 / W)
    assert used[W - 1] == pytest.approx(lr)
    assert used[W] == pytest.approx(lr)
    assert used[12] == pytest.approx(lr * factor(12))
    assert used[TOTAL] == pytest.approx(lr * FLOOR)
    # Each iteration changes the lr (per-iteration, not per-epoch plateaus).
    assert used[TOTAL - 1] == pytest.approx(lr * FLOOR)  # the last step trains at the floor
    after = [round(x, 12) for x in used[W - 1 :]]
    assert len(set(after)) == len(after) - 2  # only the peak (W-1, W) and the floor (TOTAL-1, TOTAL) repeat


def test_every_step_matches_the_pure_factor():
    lr = 3e-4
    used = _lrs_used(lr, 3, 11, 0.05)
    assert used == pytest.approx([lr * factor(s, 3, 11, 0.05) for s in range(12)])


def test_scheduler_applies_to_every_param_group():
    """fit() gives AdamW two groups (decay / no decay); both must follow the schedule."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(
        [{"params": [model.weight], "weight_decay": 0.1}, {"params": [model.bias], "weight_decay": 0.0}], lr=0.02
    )
    sched = warmup_cosine(opt, warmup_steps=2, total_steps=6, min_ratio=0.0)
    for _ in range(4):
        opt.step()
        sched.step()
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs[0] == pytest.approx(lrs[1])
    assert lrs[0] == pytest.approx(0.02 * factor(4, 2, 6, 0.0))


def test_state_dict_round_trip_continues_the_same_curve():
    """Resume: a fresh optimizer + scheduler loaded from state dicts continue exactly where the
    old ones stopped."""
    lr, warmup, total, floor = 0.01, 3, 15, 0.02
    opt = _optimizer(lr)
    sched = warmup_cosine(opt, warmup_steps=warmup, total_steps=total, min_ratio=floor)
    for _ in range(7):
        opt.step()
        sched.step()
    saved_opt, saved_sched = opt.state_dict(), sched.state_dict()
    assert saved_sched["last_epoch"] == 7

    opt2 = _optimizer(lr)
    sched2 = warmup_cosine(opt2, warmup_steps=warmup, total_steps=total, min_ratio=floor)
    assert opt2.param_groups[0]["lr"] == pytest.approx(lr / warmup)  # fresh: back at step 0
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved_sched)
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])

    for _ in range(total - 7):
        opt.step()
        sched.step()
        opt2.step()
        sched2.step()
        assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
    assert opt2.param_groups[0]["lr"] == pytest.approx(lr * floor)
    assert sched2.get_last_lr() == pytest.approx(sched.get_last_lr())
