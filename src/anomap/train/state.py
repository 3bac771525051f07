"""The state of a training run that a checkpoint carries across a restart, and how it is saved and restored.

A resumable checkpoint (``kind: "train_state"``) holds, as tensors: the model (``model.*``), the
optimiser state (``optim.*``), every rank's torch RNG state (``rng.torch``, ``rng.torch.rank<r>`` and the
``rng.cuda*`` equivalents on a GPU) and the best weights so far (``best.*``); and as metadata: the
caller's ``extra_meta`` (method, config), where the run is (``stage_index``, ``stage``, ``step``,
``epoch``, ``position``), the time spent (``elapsed``), ``seed``, ``n_images``, the plan (``planned``,
``replanned``), ``steps_done``, the numpy Generator's state (``numpy_rng``), the optimiser structure,
``history``, ``best_step``/``best_value`` and, with several processes, ``world_size``.

Batch indices are a pure function of (seed, stage, step), so with these a resumed run continues
exactly where the interrupted one was (on CPU, bit for bit).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from anomap.errors import CheckpointError
from anomap.train.best import BestWeights
from anomap.train.checkpoint import (
    flatten_optimizer_state,
    load_checkpoint,
    save_checkpoint,
    unflatten_optimizer_state,
)
from anomap.train.distributed import DistContext, gather_objects, rank_seed, run_on_main
from anomap.train.resume import check_compatible
from anomap.train.schedule import Stage, apply_replans, shorten
from anomap.train.trainable import Trainable

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What :func:`anomap.train.loop.train` did.

    Attributes:
        steps: steps done per stage (counting steps done before a resume).
        planned: steps the schedule planned per stage.
        stopped_by: "schedule", "time_budget" or "max_steps".
        seconds: training time, summed across resumes.
        history: one dict (stage, step, loss, lr, elapsed, other logged scalars) every ``log_every`` steps.
        best_step: step of the last stage whose weights were kept (``eval_fn`` only), else None.
        replanned: per shortened stage ``{"at": step, "from": planned, "to": new total}`` (see
            :mod:`anomap.train.schedule`); empty when every schedule fitted the time budget.
    """

    steps: dict[str, int]
    planned: dict[str, int]
    stopped_by: str
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    best_step: int | None = None
    replanned: dict[str, dict[str, Any]] = field(default_factory=dict)


class RunState:
    """A run's plan, position, RNG streams, history, best weights and clock; saves and restores itself.

    Creating one seeds torch (per rank) and the numpy Generator the method draws from. :meth:`resume`
    then takes over a checkpoint's state; :attr:`stage_index` and :attr:`step` say where the run
    continues. Weights, RNG states and the optimiser are loaded into the live objects by
    :meth:`restore` at the moment the loop would have them: after the stage's ``set_stage`` and
    optimiser when the checkpoint was written inside a stage (:attr:`mid_stage`), before the next
    stage's ``set_stage`` when it was written at a stage end (:attr:`at_stage_end`).
    """

    def __init__(self, stages: list[Stage], n: int, seed: int, device: torch.device, dist: DistContext,
                 path: Path | None = None, extra_meta: dict[str, Any] | None = None):
        self.stages = stages
        self.planned = {s.name: int(s.steps) for s in stages}
        self.n, self.seed, self.device, self.dist = n, seed, device, dist
        self.path = None if path is None else Path(path)
        self.extra_meta = dict(extra_meta or {})
        torch.manual_seed(rank_seed(seed, dist.rank))  # same as one process on rank 0
        self.rng = np.random.default_rng(seed)
        self.history: list[dict[str, Any]] = []
        self.steps_done = {name: 0 for name in self.planned}
        self.replanned: dict[str, dict[str, Any]] = {}
        self.best = BestWeights()
        self.stage_index, self.step = 0, 0  # where the run continues
        self._saved: dict[str, Tensor] | None = None
        self._saved_meta: dict[str, Any] = {}
        self._after_stage_end = False  # the checkpoint was written at the end of the stage before
        self._prior_elapsed = 0.0
        self._t0 = time.monotonic()

    @property
    def mid_stage(self) -> bool:
        """Resumed inside stage :attr:`stage_index`: restore after its ``set_stage`` and optimiser."""
        return self._saved is not None and not self._after_stage_end

    @property
    def at_stage_end(self) -> bool:
        """Resumed at a stage end (or a finished run): restore before the next stage starts."""
        return self._saved is not None and self._after_stage_end

    def elapsed(self) -> float:
        """Training seconds, summed across resumes."""
        return self._prior_elapsed + time.monotonic() - self._t0

    # --- resume --------------------------------------------------------------------------------------

    def resume(self) -> None:
        """Take over the state of the checkpoint at :attr:`path` when it exists (else log and start fresh).

        Rank 0 reads the file; every rank gets its contents.

        Raises:
            CheckpointError: the file is unreadable or belongs to another run, method or plan.
        """
        loaded = run_on_main(self._read, self.dist)
        if loaded is None:
            if self.dist.is_main:
                log.warning("resume requested but no checkpoint at %s; training from scratch", self.path)
            return
        self._saved, meta = loaded
        self._saved_meta = meta
        stages = apply_replans(self.stages, meta.get("replanned") or {})  # the shortened schedule, as it was
        if stages is None:
            raise CheckpointError("its shortened schedule does not match this method.", path=self.path,
                                  fix="delete it")
        self.stages[:] = stages
        self.replanned = {name: dict(r) for name, r in (meta.get("replanned") or {}).items()}
        self.stage_index, self.step = int(meta["stage_index"]), int(meta["step"])
        if self.stage_index >= len(stages) or stages[self.stage_index].name != meta["stage"]:
            raise CheckpointError("its stages do not match this method.", path=self.path, fix="delete it")
        if self.step >= stages[self.stage_index].steps:
            self.stage_index, self.step, self._after_stage_end = self.stage_index + 1, 0, True
        self._prior_elapsed = float(meta["elapsed"])
        self.history = list(meta.get("history", []))
        self.steps_done.update(meta.get("steps_done", {}))
        self.best = BestWeights.from_checkpoint(self._saved, meta)
        if self.dist.is_main:
            log.info("resuming from %s at stage %s step %d", self.path, meta["stage"], meta["step"])
        self._t0 = time.monotonic()

    def _read(self) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
        if self.path is None or not self.path.is_file():
            return None
        tensors, meta = load_checkpoint(self.path)
        check_compatible(meta, self.extra_meta, self.planned, self.n, self.path)
        return tensors, meta

    def restore(self, method: Trainable, optimizer: torch.optim.Optimizer | None = None) -> int:
        """Load the checkpoint's weights, RNG states and (given one) optimiser state; the step to continue at."""
        saved, meta, rank = self._saved, self._saved_meta, self.dist.rank
        assert saved is not None, "restore() without a checkpoint"
        method.load_state_dict({k[6:]: v for k, v in saved.items() if k.startswith("model.")})
        suffix = "" if rank == 0 else f".rank{rank}"
        if f"rng.torch{suffix}" in saved:
            torch.set_rng_state(saved[f"rng.torch{suffix}"])
            if f"rng.cuda{suffix}" in saved and self.device.type == "cuda":
                torch.cuda.set_rng_state(saved[f"rng.cuda{suffix}"], self.device)
        else:  # written by fewer processes: this rank's torch stream restarts (batches are unaffected)
            log.warning("checkpoint has no torch RNG state for rank %d; reseeding it", rank)
            torch.manual_seed(rank_seed(self.seed + 1 + int(meta["step"]), rank))
        self.rng.bit_generator.state = meta["numpy_rng"]
        if optimizer is not None:
            optimizer.load_state_dict(unflatten_optimizer_state(saved, meta["optimizer"]))
        return self.step

    # --- during the run ------------------------------------------------------------------------------

    def replan(self, stage_index: int, at: int, new_total: int) -> Stage:
        """Shorten a stage at step ``at`` to ``new_total`` steps (re-planning) and remember it; the new stage."""
        stage = self.stages[stage_index]
        self.replanned[stage.name] = {"at": at, "from": stage.steps, "to": new_total}
        self.stages[stage_index] = shorten(stage, at, new_total)
        return self.stages[stage_index]

    def save(self, method: Trainable, stage_index: int, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Write everything needed to continue at ``step`` of stage ``stage_index``.

        A collective: every rank calls it (the RNG states are gathered); rank 0 writes the file."""
        if self.path is None:
            return
        cuda_state = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        rng_states = gather_objects((torch.get_rng_state(), cuda_state), self.dist)
        if not self.dist.is_main:
            return
        tensors = {f"model.{k}": v for k, v in method.state_dict().items()}
        opt_tensors, opt_meta = flatten_optimizer_state(optimizer.state_dict())
        tensors.update(opt_tensors)
        for r, (cpu_state, gpu_state) in enumerate(rng_states):
            suffix = "" if r == 0 else f".rank{r}"
            tensors[f"rng.torch{suffix}"] = cpu_state
            if gpu_state is not None:
                tensors[f"rng.cuda{suffix}"] = gpu_state
        tensors.update(self.best.tensors())
        save_checkpoint(self.path, tensors, self._meta(stage_index, step, opt_meta))

    def _meta(self, stage_index: int, step: int, opt_meta: dict[str, Any]) -> dict[str, Any]:
        stage = self.stages[stage_index]
        epoch, position = divmod(step, max(1, self.n // stage.batch_size))
        meta = {
            **self.extra_meta,
            "kind": "train_state",
            "stage_index": stage_index,
            "stage": stage.name,
            "step": step,
            "epoch": epoch,
            "position": position,
            "elapsed": self.elapsed(),
            "seed": self.seed,
            "n_images": self.n,
            "planned": self.planned,
            "replanned": self.replanned,
            "steps_done": self.steps_done,
            "numpy_rng": self.rng.bit_generator.state,
            "optimizer": opt_meta,
            "history": self.history,
            **self.best.meta(),
        }
        if self.dist.enabled:
            meta["world_size"] = self.dist.world_size
        return meta

    def result(self, stopped_by: str) -> TrainResult:
        return TrainResult(steps=dict(self.steps_done), planned=self.planned, stopped_by=stopped_by,
                           seconds=self.elapsed(), history=self.history, best_step=self.best.step,
                           replanned=self.replanned)
