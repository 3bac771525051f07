"""Re-planning the last stage's schedule when the machine is slower than the time budget assumed.

Methods plan their schedules to end inside ``max_train_seconds`` from an assumed training speed
(``est_images_per_s``). On a slower or busier machine the budget would stop training before the
planned end, with the learning rate still high. :func:`train` therefore measures the real speed over
the first steps of the last stage (after ``WARMUP_STEPS``) and, when the rest would not fit in what
remains of the budget, shortens that stage once: the remaining part of its learning-rate schedule is
compressed (not cut), so it still decays to its final value inside the budget. The decision is stored
in the resumable checkpoint, so a resumed run follows the same shortened schedule.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from anomap.methods.base import Stage

MARGIN = 0.95  # plan to use this share of the remaining budget (the loop's time check stays a backstop)
# Steps of a stage not timed: the first ones are slow on a GPU (kernel selection, allocator growth, lazy
# initialisation). On an H200, timing gtrans from step 0 measured 26 steps/s where it then ran at 42,
# and the stage was shortened to use 100 s of a 180 s budget.
WARMUP_STEPS = 2


def probe_steps(steps_left: int) -> int:
    """Steps to time before deciding: 5% of what is left, at least 5 and at most 30."""
    return max(5, min(30, round(0.05 * steps_left)))


def shortened_total(step: int, total: int, steps_per_s: float, remaining_s: float) -> int | None:
    """A new total for a stage at ``step`` of ``total`` so that it ends in time, or None if it fits."""
    if steps_per_s <= 0 or step >= total:
        return None
    affordable = int(MARGIN * max(0.0, remaining_s) * steps_per_s)
    if total - step <= affordable:
        return None
    return step + max(1, affordable)


def decide(step: int, total: int, since: tuple[float, int], left_s: float,
           agree: Callable[[dict[str, float]], dict[str, float]]) -> tuple[int | None, float]:
    """(new total or None, measured steps/s) at ``step``, timed from ``since`` = (monotonic time, step).

    ``agree`` averages the measurements over processes, so that every rank takes the same decision.
    """
    rate = (step - since[1]) / max(1e-9, time.monotonic() - since[0])
    agreed = agree({"rate": rate, "left": left_s})
    return shortened_total(step, total, agreed["rate"], agreed["left"]), agreed["rate"]


def compressed(factor: Callable[[int], float], at: int, old_total: int, new_total: int) -> Callable[[int], float]:
    """``factor`` (planned over ``old_total`` steps), unchanged before ``at``, then squeezed to end at ``new_total``."""
    scale = (old_total - at) / max(1, new_total - at)

    def f(step: int) -> float:
        if step < at:
            return factor(step)
        return factor(min(float(old_total), at + (step - at) * scale))

    return f


def apply(stage: Stage, at: int, new_total: int) -> Stage:
    """The stage with ``new_total`` steps and its learning-rate schedule compressed after ``at``."""
    return dataclasses.replace(stage, steps=new_total,
                               lr_factor=compressed(stage.lr_factor, at, stage.steps, new_total))
