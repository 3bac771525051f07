"""Schedule planning: stages, learning-rate factors, step counts, and fitting them into a time budget.

Everything that plans how many optimiser steps a run takes lives here (the loop's own stops at
``max_steps`` and at the end of the time budget are backstops):

* A method describes its training as a list of :class:`Stage`; :func:`epochs_to_steps` and
  :func:`schedule_steps` turn epochs into steps (capped by ``max_steps`` for tiny runs) and
  :func:`cosine_factor` gives the usual warm-up + cosine learning-rate factor.
* Time budget, planned ahead (``max_train_seconds``): from an assumed training speed
  (``est_images_per_s`` of the method's config) :func:`budget_steps` caps a one-stage schedule and
  :func:`share_budget` the stages of a two-stage one, so that the schedule, learning-rate decay
  included, ends inside :data:`MARGIN` of the budget.
* Time budget, measured (re-planning): on a slower or busier machine the planned schedule would be
  stopped by the budget with the learning rate still high. The training loop therefore times the
  first steps of the last stage (after :data:`WARMUP_STEPS`, with a :class:`ReplanProbe`) and, when
  the rest would not fit in what remains of the budget, shortens that stage once: the remaining part
  of its learning-rate schedule is compressed (:func:`compressed`, not cut), so it still decays to its
  final value inside the budget. The decision is stored in the resumable checkpoint
  (``meta["replanned"]``), so a resumed run follows the same shortened schedule (:func:`apply_replans`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

MARGIN = 0.95  # plan to use this share of the (remaining) budget; the loop's time check stays a backstop
# Steps of a stage not timed: the first ones are slow on a GPU (kernel selection, allocator growth, lazy
# initialisation). On an H200, timing gtrans from step 0 measured 26 steps/s where it then ran at 42,
# and the stage was shortened to use 100 s of a 180 s budget.
WARMUP_STEPS = 2


@dataclass
class Stage:
    """One phase of training (ssl_ae has one, ISSTAD two).

    Attributes:
        name: shown in the progress bar and stored in checkpoints.
        steps: optimiser steps in this stage.
        batch_size: images per step.
        make_optimizer: builds the optimiser for this stage's trainable parameters.
        lr_factor: multiplier of the base learning rate at a step (0-based) of this stage.
    """

    name: str
    steps: int
    batch_size: int
    make_optimizer: Callable[[], torch.optim.Optimizer]
    lr_factor: Callable[[int], float]


def cosine_factor(total: int, warmup: int = 0, final: float = 0.0) -> Callable[[int], float]:
    """Linear warm-up for ``warmup`` steps, then half a cosine from 1 to ``final`` at ``total``."""

    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        t = min(max(t, 0.0), 1.0)
        return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * t))

    return f


# --- planned ahead: steps from epochs, capped by max_steps and the time budget ------------------------


def epochs_to_steps(epochs: int, n_images: int, batch_size: int) -> int:
    """Steps for ``epochs`` passes over ``n_images`` (at least one step)."""
    return max(1, math.ceil(epochs * n_images / batch_size))


def schedule_steps(epochs: int, n_fit: int, batch_size: int, min_steps: int = 0, max_steps: int = 0) -> int:
    """Steps of a one-stage schedule: ``epochs`` over ``n_fit`` images, at least ``min_steps``, at most
    ``max_steps`` when that is set (tiny runs)."""
    steps = max(epochs_to_steps(epochs, n_fit, batch_size), min_steps)
    return min(steps, max_steps) if max_steps > 0 else steps


def budget_steps(steps: int, batch_size: int, images_per_s: float, budget_s: float) -> int:
    """Cap a one-stage schedule so that it ends within :data:`MARGIN` of ``budget_s`` at ``images_per_s``.

    Planning the schedule from the budget (rather than stopping it) lets the learning rate decay
    fully. ``budget_s <= 0``: no budget, ``steps`` unchanged.
    """
    if budget_s <= 0:
        return steps
    return max(1, min(steps, int(MARGIN * budget_s * images_per_s / batch_size)))


def share_budget(steps: Sequence[int], batch_sizes: Sequence[int], images_per_s: Sequence[float],
                 time_share: float, budget_s: float) -> list[int]:
    """Cap the steps of a two-stage schedule to :data:`MARGIN` of ``budget_s`` at the estimated speeds.

    The first stage may use ``time_share`` of the budget and the second the rest; each may also use
    the time the other one does not need. ``budget_s <= 0``: no budget, ``steps`` unchanged.
    """
    if budget_s <= 0:
        return list(steps)
    per_step = [b / r for b, r in zip(batch_sizes, images_per_s, strict=True)]
    budget = MARGIN * budget_s
    share = [time_share * budget, (1 - time_share) * budget]
    need = [s * t for s, t in zip(steps, per_step, strict=True)]
    spare = [max(0.0, share[i] - need[i]) for i in range(2)]
    allowed = [share[0] + spare[1], share[1] + spare[0]]
    return [max(1, min(steps[i], int(allowed[i] / per_step[i]))) for i in range(2)]


# --- measured: shortening the last stage when the machine is slower than assumed ----------------------


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


def compressed(factor: Callable[[int], float], at: int, old_total: int, new_total: int) -> Callable[[int], float]:
    """``factor`` (planned over ``old_total`` steps), unchanged before ``at``, then squeezed to end at ``new_total``."""
    scale = (old_total - at) / max(1, new_total - at)

    def f(step: int) -> float:
        if step < at:
            return factor(step)
        # a fractional step: the schedules are smooth functions of the step (cosine_factor), so this is fine
        return factor(min(float(old_total), at + (step - at) * scale))  # type: ignore[arg-type]

    return f


def shorten(stage: Stage, at: int, new_total: int) -> Stage:
    """The stage with ``new_total`` steps and its learning-rate schedule compressed after ``at``."""
    return dataclasses.replace(stage, steps=new_total,
                               lr_factor=compressed(stage.lr_factor, at, stage.steps, new_total))


def apply_replans(stages: list[Stage], decisions: dict[str, dict[str, Any]]) -> list[Stage] | None:
    """``stages`` shortened as stored in a checkpoint (``{name: {"at", "from", "to"}}``); None when a
    decision does not fit these stages (another method or plan)."""
    out = list(stages)
    for name, r in decisions.items():
        i = next((i for i, s in enumerate(out) if s.name == name), None)
        if i is None or out[i].steps != int(r["from"]):
            return None
        out[i] = shorten(out[i], int(r["at"]), int(r["to"]))
    return out


class ReplanProbe:
    """Times the last stage from ``WARMUP_STEPS`` after its first step and decides once whether to shorten it.

    Call :meth:`after_step` after every optimiser step. ``budget_left`` gives the seconds left of the
    time budget; ``agree`` averages the measurements over processes, so that every rank takes the same
    decision.
    """

    def __init__(self, first_step: int, total: int, budget_left: Callable[[], float],
                 agree: Callable[[dict[str, float]], dict[str, float]]):
        self.start = first_step + WARMUP_STEPS
        self.decide_at: int | None = self.start + probe_steps(total - self.start)
        self.since = (0.0, 0)  # (monotonic time, step) at ``start``: the warm-up steps are not timed
        self.budget_left = budget_left
        self.agree = agree

    def after_step(self, stage: Stage, step: int) -> int | None:
        """The new total of ``stage`` after its step ``step`` when it must be shortened (once at most), else None."""
        if step == self.start:
            self.since = (time.monotonic(), step)
        if step != self.decide_at:
            return None
        self.decide_at = None
        left = self.budget_left()
        rate = (step - self.since[1]) / max(1e-9, time.monotonic() - self.since[0])
        agreed = self.agree({"rate": rate, "left": left})
        new_total = shortened_total(step, stage.steps, agreed["rate"], agreed["left"])
        if new_total is not None:
            log.info("stage %s at %.2f steps/s: shortened from %d to %d steps to fit the time budget",
                     stage.name, agreed["rate"], stage.steps, new_total)
        return new_total
