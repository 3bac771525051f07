"""The one training loop every method uses: stages of optimiser steps, checkpoints, resume, budgets.

Read :func:`train` top to bottom. For each stage of ``method.stages(n)`` it builds the stage's
optimiser and runs ``stage.steps`` steps; each step sets the learning rate from the stage's schedule,
draws a batch of image indices, lets the method corrupt/convert them (``make_batch``), computes the
loss (``training_step``) and steps the optimiser. Around the step: the run's state and checkpoints
(:class:`anomap.train.state.RunState`), the best weights (:class:`anomap.train.best.BestWeights`) and
the re-planning of the last stage (:class:`anomap.train.schedule.ReplanProbe`).

Determinism: batch indices are a pure function of (seed, stage, step); the method's random numbers
come from one numpy Generator and torch's global RNG, both seeded from ``seed`` and both stored in
checkpoints, so a resumed run ends with exactly the weights of an uninterrupted one (on CPU).

Several processes (torchrun, ``dist``): every rank draws the same global batch and keeps its slice
(:mod:`anomap.train.distributed`); DDP averages the gradients; rank 0 alone writes checkpoints, shows
the bar and runs ``eval_fn``; decisions that end training are taken by all ranks together.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from anomap.errors import AnomapError
from anomap.train.distributed import (
    SINGLE,
    DistContext,
    any_rank,
    data_parallel,
    mean_scalars,
    shard,
    shard_batch,
    sync_batchnorm,
)
from anomap.train.schedule import ReplanProbe, Stage
from anomap.train.state import RunState, TrainResult
from anomap.train.trainable import Trainable

__all__ = ["TrainResult", "batch_indices", "train"]


def batch_indices(n: int, batch_size: int, seed: int, stage_index: int, step: int) -> np.ndarray:
    """Image indices for one step: consecutive slices of a per-epoch permutation (drop_last).

    With fewer images than ``batch_size`` every image is used once and the rest is drawn with
    replacement. The result depends only on the arguments, so resuming needs no extra state.
    """
    if n < batch_size:
        g = np.random.default_rng([seed, stage_index, step])
        return np.concatenate([g.permutation(n), g.integers(0, n, batch_size - n)])
    per_epoch = n // batch_size
    epoch, pos = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, stage_index, epoch]).permutation(n)
    return perm[pos * batch_size : (pos + 1) * batch_size]


def train(method: Trainable, images: np.ndarray, *, seed: int, device: torch.device, ckpt_path: Path | None = None,
          resume: bool = False, checkpoint_every: int = 200, max_seconds: float = 0.0, log_every: int = 10,
          progress: bool = True, eval_fn: Callable[[], float] | None = None, eval_every: int = 0,
          extra_meta: dict[str, Any] | None = None, dist: DistContext = SINGLE) -> TrainResult:
    """Train ``method`` (already on ``device``) on uint8 images (N, H, W, C) through all its stages.

    Args:
        method: a :class:`Trainable` (an anomap Method).
        images: the fit images at the working size.
        seed: seeds torch, the batch order and the method's numpy Generator.
        device: where batches are moved.
        ckpt_path: resumable checkpoint, written every ``checkpoint_every`` steps (0: only at stage
            ends) and when a stage ends or training stops early.
        resume: continue from ``ckpt_path`` when it exists.
        max_seconds: stop all training once this much time (across resumes) has passed, 0 = no limit;
            the last stage is shortened once when it would overrun (:class:`ReplanProbe`).
        log_every: steps between history entries. progress: show a tqdm bar per stage.
        eval_fn: validation loss (lower is better), called under ``torch.no_grad()`` in eval mode
            every ``eval_every`` steps of the last stage and at its end; the best weights are kept.
        extra_meta: stored in checkpoints; its "method" and "config" must match on resume.
        dist: this process's place in a torchrun job (default: one process). Every rank calls
            ``train`` with the same arguments; the global batch is each stage's batch size.

    Returns:
        A TrainResult; the method is left in eval mode.

    Raises:
        AnomapError: the loss became nan/inf (the last checkpoint is left as it was).
        CheckpointError: the checkpoint to resume from is unreadable or belongs to another run.
        ConfigError: the number of processes does not divide a stage's batch size.
    """
    n = len(images)
    if n == 0:
        raise AnomapError("no images to train on.", fix="give a folder with at least one good image")
    stages = method.stages(n)
    for s in stages:
        shard(s.batch_size, dist)  # fail before any work when the processes do not divide a batch
    run = RunState(stages, n, seed, device, dist, ckpt_path, extra_meta)  # seeds torch and the numpy Generator
    if resume:
        run.resume()  # plan, position, history, best weights and time spent of the checkpoint, if any
    if run.at_stage_end:
        run.restore(method)  # weights and RNG states before the next stage's set_stage
    max_steps = method.config.max_steps
    stopped_by = "schedule"
    for si in range(run.stage_index, len(stages)):
        stage, is_last = stages[si], si == len(stages) - 1
        method.set_stage(stage.name)
        opt = _optimizer(stage)
        step = run.restore(method, opt) if si == run.stage_index and run.mid_stage else 0
        evaluate = eval_fn if is_last and dist.is_main else None  # validation: the last stage, on rank 0
        probe = None  # times the last stage and shortens it once if it would overrun the time budget
        if is_last and max_seconds > 0 and max_steps <= 0 and stage.name not in run.replanned:
            probe = ReplanProbe(step, stage.steps, lambda: max_seconds - run.elapsed(),
                                lambda v: mean_scalars(v, dist, device))
        meter = _Meter(stage, step, run.history, log_every, progress and dist.is_main, dist, device)
        with meter, sync_batchnorm(method, dist), data_parallel(method, opt, dist, device) as step_fn:
            while step < stage.steps:
                stopped_by = _stop_reason(run, max_steps, max_seconds, device)
                if stopped_by != "schedule":
                    break
                _set_lr(opt, stage.lr_factor(step))
                idx = batch_indices(n, stage.batch_size, seed, si, step)
                batch = method.make_batch(images[idx], run.rng, images)  # the global batch, on every rank
                batch = _to_device(shard_batch(batch, stage.batch_size, dist), device)  # this rank's rows

                method.train()
                out = step_fn(batch, step)
                loss = out["loss"]
                value = mean_scalars({"loss": float(loss.detach())}, dist, device)["loss"]
                if not math.isfinite(value):
                    raise AnomapError(f"training diverged: loss is {value} at stage {stage.name} step {step}",
                                      fix="lower lr or check the images")
                loss.backward()  # type: ignore[no-untyped-call]  # torch's stub leaves backward untyped
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                run.steps_done[stage.name] = step

                new_total = None if probe is None else probe.after_step(stage, step)
                if new_total is not None:
                    stage = run.replan(si, step, new_total)
                    meter.bar.total = new_total
                meter.update(step, stage.steps, value, float(opt.param_groups[0]["lr"]), out, run.elapsed)
                if evaluate and ((eval_every > 0 and step % eval_every == 0) or step == stage.steps):
                    run.best.evaluate(method, evaluate, step)
                if checkpoint_every > 0 and step % checkpoint_every == 0 and step < stage.steps:
                    run.save(method, si, step, opt)
        if evaluate and stopped_by != "schedule" and run.best.last_eval != step and step > 0:
            run.best.evaluate(method, evaluate, step)  # the weights training stopped with count too
        run.save(method, si, step, opt)
        if stopped_by != "schedule":
            break

    run.best.load_into(method)
    method.eval()
    return run.result(stopped_by)


def _set_lr(opt: torch.optim.Optimizer, factor: float) -> None:
    """Every group's learning rate at ``factor`` times its initial one."""
    for group in opt.param_groups:
        group["lr"] = group["initial_lr"] * factor


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _optimizer(stage: Stage) -> torch.optim.Optimizer:
    """The stage's optimiser; each group remembers its base learning rate (``initial_lr``) for the schedule."""
    opt = stage.make_optimizer()
    for group in opt.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return opt


def _stop_reason(run: RunState, max_steps: int, max_seconds: float, device: torch.device) -> str:
    """"max_steps" or "time_budget" when training must stop before the next step, else "schedule".

    The time check is a collective (every rank stops when one is over the budget).
    """
    total = sum(run.steps_done.values())
    if max_steps > 0 and total >= max_steps:
        return "max_steps"
    if max_seconds > 0 and any_rank(total > 0 and run.elapsed() > max_seconds, run.dist, device):
        return "time_budget"
    return "schedule"


class _Meter:
    """A stage's progress bar and its history entries: the mean loss every ``log_every`` steps."""

    def __init__(self, stage: Stage, step: int, history: list[dict[str, Any]], log_every: int, show: bool,
                 dist: DistContext, device: torch.device):
        self.bar = tqdm(total=stage.steps, initial=step, desc=stage.name, disable=not show, dynamic_ncols=True)
        self.name, self.history, self.log_every = stage.name, history, log_every
        self.dist, self.device = dist, device
        self.window: list[float] = []

    def update(self, step: int, total: int, loss: float, lr: float, out: dict[str, Any],
               elapsed: Callable[[], float]) -> None:
        """After ``step`` of ``total``: show the loss; every ``log_every`` steps (a collective) add a history entry."""
        self.window.append(loss)
        self.bar.set_postfix(loss=f"{sum(self.window) / len(self.window):.4g}", lr=f"{lr:.3g}", refresh=False)
        self.bar.update(1)
        if self.log_every > 0 and (step % self.log_every == 0 or step == total):
            entry = {**mean_scalars(_scalars(out), self.dist, self.device), "loss": sum(self.window) / len(self.window)}
            self.history.append({**entry, "stage": self.name, "step": step, "lr": lr, "elapsed": elapsed()})
            self.window = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


def _scalars(out: dict[str, Any]) -> dict[str, float]:
    """Loggable scalar entries of a training_step output."""
    return {k: float(v.detach()) for k, v in out.items() if isinstance(v, Tensor) and v.numel() == 1}
