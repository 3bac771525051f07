"""The Method contract every anomaly detection method implements.

A Method is a pure ``torch.nn.Module`` plus the training/scoring logic of one published method.
Data loading, splits, the training loop, checkpoints and calibration live elsewhere and are shared.

Flow (driven by ``anomap.detector.Detector`` and ``anomap.train.loop``):

1. ``method = MethodClass(config, channels)`` builds the networks.
2. ``method.prepare_fit(fit_images)`` may compute statistics of the fit images (default: nothing).
3. For each ``stage`` in ``method.stages(n_fit)``: ``method.set_stage(stage.name)``; the loop draws
   uint8 image batches, calls ``method.make_batch(images, rng, pool)`` (corruption happens here) and
   ``method.training_step(batch, step)`` and steps the stage's optimiser.
4. ``method.calibrate(heldout)`` may store statistics of held-out normal images (default: nothing);
   ``heldout`` is an :class:`anomap.types.TensorLike` of float images, read slice by slice.
5. ``method.predict(images)`` returns raw scores (B,) and maps (B, h, w) at the working size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from anomap.config import MethodConfig
from anomap.types import TensorLike


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


def epochs_to_steps(epochs: int, n_images: int, batch_size: int) -> int:
    """Steps for ``epochs`` passes over ``n_images`` (at least one step)."""
    return max(1, math.ceil(epochs * n_images / batch_size))


class Method(nn.Module):
    """Base class; see the module docstring for the flow."""

    name: ClassVar[str] = "base"
    Config: ClassVar[type[MethodConfig]] = MethodConfig

    def __init__(self, config: MethodConfig, channels: int):
        super().__init__()
        self.config = config
        self.channels = channels
        self.stage = ""

    # --- training -------------------------------------------------------------------------------
    def stages(self, n_fit: int) -> list[Stage]:
        raise NotImplementedError

    def schedule_steps(self, epochs: int, n_fit: int, batch_size: int, min_steps: int = 0) -> int:
        """Steps of a one-stage schedule: ``epochs`` over ``n_fit`` images, at least ``min_steps``,
        at most ``config.max_steps`` when that is set (tiny runs)."""
        steps = max(epochs_to_steps(epochs, n_fit, batch_size), min_steps)
        return min(steps, self.config.max_steps) if self.config.max_steps > 0 else steps

    def budget_steps(self, steps: int, batch_size: int, images_per_s: float) -> int:
        """Cap a schedule so that it ends within ``config.max_train_seconds`` at the estimated throughput.

        Planning the schedule from the budget (rather than stopping it) lets the learning rate decay
        fully; on a machine slower than the estimate the loop shortens the last stage (:mod:`anomap.train.replan`).
        """
        budget = self.config.max_train_seconds
        if budget <= 0:
            return steps
        return max(1, min(steps, int(0.95 * budget * images_per_s / batch_size)))

    def set_stage(self, name: str) -> None:
        """Called by the loop before a stage starts (freeze/unfreeze parts here)."""
        self.stage = name

    def prepare_fit(self, fit_images: np.ndarray) -> None:
        """Optional statistics of the fit images, uint8 (N, H, W, C) at the working size."""

    def make_batch(self, images: np.ndarray, rng: np.random.Generator, pool: np.ndarray) -> dict[str, Tensor]:
        """Turn uint8 images (B, H, W, C) into the tensors ``training_step`` needs.

        ``pool`` is all fit images (N, H, W, C), e.g. as fill material for corruption.
        """
        raise NotImplementedError

    def training_step(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        """Return at least {"loss": scalar tensor}; other entries are logged."""
        raise NotImplementedError

    # --- scoring --------------------------------------------------------------------------------
    def calibrate(self, heldout: TensorLike) -> None:
        """Optional statistics from held-out normal images, float (N, C, H, W) in [0, 1], kept in buffers.

        ``heldout`` is read slice by slice (``heldout[i:j]`` is a float tensor on the model's device),
        so a large held-out set is never converted to floats all at once.
        """

    def predict(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Raw image scores (B,) and anomaly maps (B, h, w) for float images (B, C, H, W) in [0, 1]."""
        raise NotImplementedError
