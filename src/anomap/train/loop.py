"""The one training loop every method uses: stages of optimiser steps, checkpoints, resume, budgets.

Read :func:`train` top to bottom. For each stage of ``method.stages(n)`` it builds the stage's
optimiser and runs ``stage.steps`` steps; each step sets the learning rate from the stage's schedule,
draws a batch of image indices, lets the method corrupt/convert them (``make_batch``), computes the
loss (``training_step``) and steps the optimiser.

Determinism: batch indices are a pure function of (seed, stage, step); the method's random numbers
come from one numpy Generator and torch's global RNG, both seeded from ``seed`` and both stored in
checkpoints, so a resumed run ends with exactly the weights of an uninterrupted one (on CPU).

Several processes (torchrun, ``dist``): every rank draws the same global batch and keeps its slice
(:mod:`anomap.train.distributed`); DDP averages the gradients; rank 0 alone writes checkpoints, shows
the bar and runs ``eval_fn``; decisions that end training are taken by all ranks together.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from anomap.errors import AnomapError, CheckpointError
from anomap.train import replan
from anomap.train.checkpoint import (
    flatten_optimizer_state,
    load_checkpoint,
    save_checkpoint,
    unflatten_optimizer_state,
)
from anomap.train.distributed import (
    SINGLE,
    DistContext,
    any_rank,
    data_parallel,
    gather_objects,
    mean_scalars,
    rank_seed,
    run_on_main,
    shard,
    shard_batch,
    sync_batchnorm,
)
from anomap.train.resume import check_compatible

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What :func:`train` did.

    Attributes:
        steps: steps done per stage (counting steps done before a resume).
        planned: steps the schedule planned per stage.
        stopped_by: "schedule", "time_budget" or "max_steps".
        seconds: training time, summed across resumes.
        history: one dict (stage, step, loss, lr, elapsed, other logged scalars) every ``log_every`` steps.
        best_step: step of the last stage whose weights were kept (``eval_fn`` only), else None.
        replanned: per shortened stage ``{"at": step, "from": planned, "to": new total}`` (see
            :mod:`anomap.train.replan`); empty when every schedule fitted the time budget.
    """

    steps: dict[str, int]
    planned: dict[str, int]
    stopped_by: str
    seconds: float
    history: list[dict] = field(default_factory=list)
    best_step: int | None = None
    replanned: dict[str, dict] = field(default_factory=dict)


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


def _scalars(out: dict[str, Any]) -> dict[str, float]:
    """Loggable scalar entries of a training_step output."""
    return {k: float(v.detach()) for k, v in out.items() if isinstance(v, Tensor) and v.numel() == 1}


def train(
    method: Any,
    images: np.ndarray,
    *,
    seed: int,
    device: torch.device,
    ckpt_path: Path | None = None,
    resume: bool = False,
    checkpoint_every: int = 200,
    max_seconds: float = 0.0,
    log_every: int = 10,
    progress: bool = True,
    eval_fn: Callable[[], float] | None = None,
    eval_every: int = 0,
    extra_meta: dict | None = None,
    dist: DistContext = SINGLE,
) -> TrainResult:
    """Train ``method`` (already on ``device``) on uint8 images (N, H, W, C) through all its stages.

    Args:
        method: an anomap Method.
        images: the fit images at the working size.
        seed: seeds torch, the batch order and the method's numpy Generator.
        device: where batches are moved.
        ckpt_path: resumable checkpoint, written every ``checkpoint_every`` steps (0: only at stage
            ends) and when a stage ends or training stops early.
        resume: continue from ``ckpt_path`` when it exists.
        max_seconds: stop all training once this much time (across resumes) has passed; 0 = no limit.
        log_every: steps between history entries.
        progress: show a tqdm bar per stage.
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
    planned = {s.name: int(s.steps) for s in stages}
    max_steps = int(getattr(getattr(method, "config", None), "max_steps", 0) or 0)
    extra_meta = dict(extra_meta or {})
    ckpt_path = None if ckpt_path is None else Path(ckpt_path)
    for s in stages:
        shard(s.batch_size, dist)  # fail before any work when the processes do not divide a batch

    # --- seeds, then (maybe) the state to resume from --------------------------------------------
    torch.manual_seed(rank_seed(seed, dist.rank))  # same as one process on rank 0
    rng = np.random.default_rng(seed)
    history: list[dict] = []
    steps_done = {name: 0 for name in planned}
    replanned: dict[str, dict] = {}
    start_stage, start_step, prior_elapsed = 0, 0, 0.0
    saved: dict[str, Tensor] | None = None
    saved_meta: dict = {}
    restore_before_stage = False  # the checkpoint was written at a stage end
    best_state: dict[str, Tensor] | None = None
    best_step: int | None = None
    best_value = math.inf

    def load_resumable() -> tuple[dict[str, Tensor], dict] | None:
        if not (resume and ckpt_path is not None and ckpt_path.is_file()):
            return None
        tensors, meta = load_checkpoint(ckpt_path)
        check_compatible(meta, extra_meta, planned, n, ckpt_path)
        return tensors, meta

    loaded = run_on_main(load_resumable, dist)  # rank 0 reads the file; every rank gets its contents
    if loaded is not None:
        saved, saved_meta = loaded
        for name, r in (saved_meta.get("replanned") or {}).items():  # the shortened schedule, as it was
            i = next((i for i, s in enumerate(stages) if s.name == name), None)
            if i is None or stages[i].steps != int(r["from"]):
                raise CheckpointError("its shortened schedule does not match this method.", path=ckpt_path,
                                      fix="delete it")
            stages[i] = replan.apply(stages[i], int(r["at"]), int(r["to"]))
            replanned[name] = dict(r)
        start_stage, start_step = int(saved_meta["stage_index"]), int(saved_meta["step"])
        if start_stage >= len(stages) or stages[start_stage].name != saved_meta["stage"]:
            raise CheckpointError("its stages do not match this method.", path=ckpt_path, fix="delete it")
        if start_step >= stages[start_stage].steps:
            start_stage, start_step, restore_before_stage = start_stage + 1, 0, True
        prior_elapsed = float(saved_meta["elapsed"])
        history = list(saved_meta.get("history", []))
        steps_done.update(saved_meta.get("steps_done", {}))
        if saved_meta.get("best_step") is not None:
            best_step, best_value = int(saved_meta["best_step"]), float(saved_meta["best_value"])
            best_state = {k[5:]: v for k, v in saved.items() if k.startswith("best.")}
        if dist.is_main:
            log.info("resuming from %s at stage %s step %d", ckpt_path, saved_meta["stage"], saved_meta["step"])
    elif resume and dist.is_main:
        log.warning("resume requested but no checkpoint at %s; training from scratch", ckpt_path)

    def restore() -> None:
        """Load model weights and RNG states from the checkpoint resumed from."""
        assert saved is not None
        method.load_state_dict({k[6:]: v for k, v in saved.items() if k.startswith("model.")})
        suffix = "" if dist.rank == 0 else f".rank{dist.rank}"
        if f"rng.torch{suffix}" in saved:
            torch.set_rng_state(saved[f"rng.torch{suffix}"])
            if f"rng.cuda{suffix}" in saved and device.type == "cuda":
                torch.cuda.set_rng_state(saved[f"rng.cuda{suffix}"], device)
        else:  # written by fewer processes: this rank's torch stream restarts (batches are unaffected)
            log.warning("checkpoint has no torch RNG state for rank %d; reseeding it", dist.rank)
            torch.manual_seed(rank_seed(seed + 1 + int(saved_meta["step"]), dist.rank))
        rng.bit_generator.state = saved_meta["numpy_rng"]

    t0 = time.monotonic()

    def elapsed() -> float:
        return prior_elapsed + time.monotonic() - t0

    def save(stage_index: int, step: int, opt: torch.optim.Optimizer) -> None:
        """Write everything needed to continue at ``step`` of stage ``stage_index``."""
        if ckpt_path is None:
            return
        cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        rng_states = gather_objects((torch.get_rng_state(), cuda_state), dist)  # a collective: all ranks
        if not dist.is_main:
            return
        tensors = {f"model.{k}": v for k, v in method.state_dict().items()}
        opt_tensors, opt_meta = flatten_optimizer_state(opt.state_dict())
        tensors.update(opt_tensors)
        for r, (cpu_state, gpu_state) in enumerate(rng_states):
            suffix = "" if r == 0 else f".rank{r}"
            tensors[f"rng.torch{suffix}"] = cpu_state
            if gpu_state is not None:
                tensors[f"rng.cuda{suffix}"] = gpu_state
        if best_state is not None:
            tensors.update({f"best.{k}": v for k, v in best_state.items()})
        stage = stages[stage_index]
        epoch, position = divmod(step, max(1, n // stage.batch_size))
        meta = {
            **extra_meta,
            "kind": "train_state",
            "stage_index": stage_index,
            "stage": stage.name,
            "step": step,
            "epoch": epoch,
            "position": position,
            "elapsed": elapsed(),
            "seed": seed,
            "n_images": n,
            "planned": planned,
            "replanned": replanned,
            "steps_done": steps_done,
            "numpy_rng": rng.bit_generator.state,
            "optimizer": opt_meta,
            "history": history,
            "best_step": best_step,
            "best_value": None if best_step is None else best_value,
        }
        if dist.enabled:
            meta["world_size"] = dist.world_size
        save_checkpoint(ckpt_path, tensors, meta)

    # --- stages ------------------------------------------------------------------------------------
    if saved is not None and start_stage >= len(stages):
        restore()  # the checkpoint is of a finished run: nothing left to do
    stopped_by = "schedule"
    for si in range(start_stage, len(stages)):
        stage = stages[si]
        resuming_here = saved is not None and si == start_stage
        if resuming_here and restore_before_stage:
            restore()
        method.set_stage(stage.name)
        opt = stage.make_optimizer()
        for group in opt.param_groups:
            group.setdefault("initial_lr", group["lr"])
        if resuming_here and not restore_before_stage:
            restore()
            opt.load_state_dict(unflatten_optimizer_state(saved, saved_meta["optimizer"]))
        is_last = si == len(stages) - 1
        step = start_step if resuming_here and not restore_before_stage else 0
        bar = tqdm(total=stage.steps, initial=step, desc=stage.name, disable=not (progress and dist.is_main),
                   dynamic_ncols=True)
        window: list[float] = []
        last_eval = -1
        evaluates = eval_fn is not None and is_last and dist.is_main
        # the last stage is timed over its first steps (after a short warm-up) and shortened once if it
        # would overrun the budget
        probe_from = step + replan.WARMUP_STEPS
        probe_at = probe_from + replan.probe_steps(stage.steps - probe_from) \
            if is_last and max_seconds > 0 and max_steps <= 0 and stage.name not in replanned else None
        probe_since = (0.0, 0)  # (time, step) at probe_from, set there: the warm-up steps are not timed

        with sync_batchnorm(method, dist), data_parallel(method, opt, dist, device) as step_fn:
            while step < stage.steps:
                total = sum(steps_done.values())
                if max_steps > 0 and total >= max_steps:
                    stopped_by = "max_steps"
                    break
                if max_seconds > 0 and any_rank(total > 0 and elapsed() > max_seconds, dist, device):
                    stopped_by = "time_budget"
                    break

                factor = stage.lr_factor(step)
                for group in opt.param_groups:
                    group["lr"] = group["initial_lr"] * factor
                idx = batch_indices(n, stage.batch_size, seed, si, step)
                batch = method.make_batch(images[idx], rng, images)  # the global batch, on every rank
                batch = shard_batch(batch, stage.batch_size, dist)  # this rank's rows
                batch = {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}

                method.train()
                out = step_fn(batch, step)
                loss = out["loss"]
                value = mean_scalars({"loss": float(loss.detach())}, dist, device)["loss"]
                if not math.isfinite(value):
                    bar.close()
                    raise AnomapError(
                        f"training diverged: loss is {value} at stage {stage.name} step {step}",
                        fix="lower lr or check the images",
                    )
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                steps_done[stage.name] = step
                if step == probe_from:
                    probe_since = (time.monotonic(), step)
                if step == probe_at:
                    probe_at = None
                    new_total, rate = replan.decide(step, stage.steps, probe_since, max_seconds - elapsed(),
                                                    lambda v: mean_scalars(v, dist, device))
                    if new_total is not None:
                        log.info("stage %s at %.2f steps/s: shortened from %d to %d steps to fit the time budget",
                                 stage.name, rate, stage.steps, new_total)
                        replanned[stage.name] = {"at": step, "from": stage.steps, "to": new_total}
                        stage = stages[si] = replan.apply(stage, step, new_total)
                        bar.total = new_total

                window.append(value)
                lr = float(opt.param_groups[0]["lr"])
                bar.set_postfix(loss=f"{sum(window) / len(window):.4g}", lr=f"{lr:.3g}", refresh=False)
                bar.update(1)
                if log_every > 0 and (step % log_every == 0 or step == stage.steps):
                    entry = {**mean_scalars(_scalars(out), dist, device), "loss": sum(window) / len(window)}
                    history.append({**entry, "stage": stage.name, "step": step, "lr": lr, "elapsed": elapsed()})
                    window = []

                if evaluates and ((eval_every > 0 and step % eval_every == 0) or step == stage.steps):
                    last_eval = step
                    best_state, best_step, best_value = _evaluate(method, eval_fn, step, best_state, best_step,
                                                                  best_value)
                if checkpoint_every > 0 and step % checkpoint_every == 0 and step < stage.steps:
                    save(si, step, opt)

        bar.close()
        if evaluates and stopped_by != "schedule" and last_eval != step and step > 0:
            best_state, best_step, best_value = _evaluate(method, eval_fn, step, best_state, best_step, best_value)
        save(si, step, opt)
        if stopped_by != "schedule":
            break

    # --- finish ------------------------------------------------------------------------------------
    if best_state is not None:
        method.load_state_dict(best_state)
    method.eval()
    return TrainResult(
        steps=dict(steps_done),
        planned=planned,
        stopped_by=stopped_by,
        seconds=elapsed(),
        history=history,
        best_step=best_step,
        replanned=replanned,
    )


def _evaluate(
    method: Any,
    eval_fn: Callable[[], float],
    step: int,
    best_state: dict[str, Tensor] | None,
    best_step: int | None,
    best_value: float,
) -> tuple[dict[str, Tensor] | None, int | None, float]:
    """Call ``eval_fn`` in eval mode; keep a CPU copy of the weights when they are the best so far."""
    method.eval()
    with torch.no_grad():
        value = float(eval_fn())
    method.train()
    log.debug("step %d: validation loss %.6g", step, value)
    if math.isfinite(value) and (best_state is None or value < best_value):
        best_state = {k: v.detach().to("cpu", copy=True) for k, v in method.state_dict().items()}
        best_step, best_value = step, value
    return best_state, best_step, best_value
