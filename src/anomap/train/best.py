"""Keeping the weights with the lowest validation loss (``eval_fn`` of :func:`anomap.train.loop.train`)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from anomap.train.trainable import Trainable

log = logging.getLogger(__name__)

PREFIX = "best."  # checkpoint tensor names of the kept weights


class BestWeights:
    """The best weights so far (a CPU copy), the step they were taken at and their validation loss.

    Stored in resumable checkpoints as tensors ``best.<name>`` and the metadata entries ``best_step``
    and ``best_value``; :meth:`from_checkpoint` reads them back.
    """

    def __init__(self) -> None:
        self.state: dict[str, Tensor] | None = None
        self.step: int | None = None
        self.value = math.inf
        self.last_eval = -1  # step of the last evaluation in this run (-1: none yet)

    @classmethod
    def from_checkpoint(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> BestWeights:
        best = cls()
        if meta.get("best_step") is not None:
            best.step, best.value = int(meta["best_step"]), float(meta["best_value"])
            best.state = {k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)}
        return best

    def evaluate(self, method: Trainable, eval_fn: Callable[[], float], step: int) -> None:
        """Call ``eval_fn`` in eval mode without gradients; keep the weights when they are the best so far."""
        self.last_eval = step
        method.eval()
        with torch.no_grad():
            value = float(eval_fn())
        method.train()
        log.debug("step %d: validation loss %.6g", step, value)
        if math.isfinite(value) and (self.state is None or value < self.value):
            self.state = {k: v.detach().to("cpu", copy=True) for k, v in method.state_dict().items()}
            self.step, self.value = step, value

    def tensors(self) -> dict[str, Tensor]:
        """The kept weights as checkpoint tensors (none before the first evaluation)."""
        return {} if self.state is None else {f"{PREFIX}{k}": v for k, v in self.state.items()}

    def meta(self) -> dict[str, int | float | None]:
        return {"best_step": self.step, "best_value": None if self.step is None else self.value}

    def load_into(self, method: Trainable) -> None:
        """Give ``method`` the kept weights, if any."""
        if self.state is not None:
            method.load_state_dict(self.state)
