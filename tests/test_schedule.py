"""Schedule planning (train/schedule.py): steps from epochs, capped by max_steps and the time budget."""

from __future__ import annotations

import math

import pytest

from anomap.train.schedule import MARGIN, budget_steps, epochs_to_steps, schedule_steps, share_budget


def test_epochs_become_steps_capped_by_max_steps():
    assert epochs_to_steps(3, 10, 4) == math.ceil(30 / 4) and epochs_to_steps(0, 10, 4) == 1
    assert schedule_steps(3, 10, 4) == 8
    assert schedule_steps(3, 10, 4, min_steps=20) == 20
    assert schedule_steps(3, 10, 4, min_steps=20, max_steps=5) == 5


def test_one_stage_ends_inside_the_budget_at_the_estimated_speed():
    assert budget_steps(10_000, 8, images_per_s=32.0, budget_s=540.0) == int(MARGIN * 540 * 32 / 8)
    assert budget_steps(100, 8, images_per_s=32.0, budget_s=540.0) == 100  # fits: unchanged
    assert budget_steps(10_000, 8, images_per_s=32.0, budget_s=0.0) == 10_000  # no budget
    assert budget_steps(10_000, 8, images_per_s=1e-6, budget_s=1.0) == 1  # at least one step


@pytest.mark.parametrize("need", [(6000, 9000), (100, 9000), (9000, 100), (100, 100)])
def test_two_stages_share_the_budget_and_lend_each_other_unused_time(need):
    batch, speed, share, budget = (32, 16), (200.0, 65.0), 0.6, 900.0
    per_step = [batch[i] / speed[i] for i in range(2)]
    steps = share_budget(list(need), batch, speed, share, budget)
    seconds = [steps[i] * per_step[i] for i in range(2)]
    assert sum(seconds) <= MARGIN * budget + max(per_step)
    assert all(1 <= s <= n for s, n in zip(steps, need, strict=True))
    for i in range(2):
        own = (share if i == 0 else 1 - share) * MARGIN * budget
        if need[i] * per_step[i] <= own:  # fits its share: untouched
            assert steps[i] == need[i]
        other_spare = max(0.0, (1 - share if i == 0 else share) * MARGIN * budget - need[1 - i] * per_step[1 - i])
        assert steps[i] == min(need[i], int((own + other_spare) / per_step[i]))
    assert share_budget(list(need), batch, speed, share, 0.0) == list(need)  # no budget
