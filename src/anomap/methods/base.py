"""The Method contract every anomaly detection method implements.

A Method is a ``torch.nn.Module`` plus the training and scoring logic of one published method. Data
loading, splits, the training loop, checkpoints, calibration of the threshold and persistence live
elsewhere and are shared. A Method satisfies :class:`anomap.train.trainable.Trainable`, the part of
this contract the training loop uses.

The hooks, in the order ``anomap.detector.Detector`` and :func:`anomap.train.loop.train` call them:

1. ``MethodClass(config, channels)`` builds the networks (``channels``: 1 or 3, of the images).
2. ``prepare_fit(fit_images)``: optional statistics of the fit images, uint8 (N, H, W, C) at the working
   size (a numpy array or a disk-backed :class:`anomap.data.store.ImageStore`). Default: nothing.
3. ``stages(n_fit)`` -> list of :class:`anomap.train.schedule.Stage`. For each stage the loop calls
   ``set_stage(name)``, builds the stage's optimiser and runs its steps: it draws uint8 images
   (B, H, W, C), calls ``make_batch(images, rng, pool)`` -> dict of tensors (corruption happens here;
   ``rng`` is the run's numpy Generator) and ``training_step(batch, step)`` -> ``{"loss": scalar, ...}``,
   and steps the optimiser. Required.
4. ``calibrate(heldout)``: optional statistics of held-out normal images. ``heldout`` is a
   :class:`anomap.types.TensorLike` of float images (N, C, H, W) in [0, 1]: ``len``, ``.shape`` and
   slices ``heldout[i:j]`` that are float tensors on the model's device. Returns nothing; what it
   learns goes into buffers, so it is saved with the weights. Default: nothing.
5. ``predict(images)``: float images (B, C, H, W) in [0, 1] -> (raw scores (B,), anomaly maps (B, h, w))
   at the working size; higher is more anomalous. Required. The detector resizes the maps to the
   input images and compares the scores with the threshold it calibrated on held-out scores.
6. ``add_normals(images)``: optional; learn that more images are normal without retraining (a method
   with a memory of normal features adds theirs). ``images``: float (B, C, H, W) in [0, 1] at the working
   size. Returns nothing; what changes lives in buffers. ``Detector.add_normals`` calls it, then
   recalibrates (``calibrate`` and the threshold) on the held-out normals. Default: a one-line
   ConfigError saying the method cannot (so the detector never claims an update that did not happen).
7. ``group_scores(fit_images, groups, progress)``: optional (``calibration_groups`` > 0); the image score of every
   fit image (float (N, C, H, W) in [0, 1], a :class:`anomap.types.TensorLike`) from the model fitted
   without its group, as a float64 array (N,); the model is left as it was. ``Detector.calibrate`` adds
   them to the held-out scores the threshold is read from. Default: a one-line ConfigError.

Schedules come from :mod:`anomap.train.schedule`; :meth:`Method.schedule_steps` and
:meth:`Method.budget_steps` apply it with the method's own ``max_steps`` and ``max_train_seconds``.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from torch import Tensor, nn

from anomap.config import MethodConfig
from anomap.errors import ConfigError
from anomap.train import schedule
from anomap.train.schedule import Stage
from anomap.types import TensorLike


class Method(nn.Module):
    """Base class; see the module docstring for the hooks and what they take and return."""

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
        """Steps of a one-stage schedule (:func:`anomap.train.schedule.schedule_steps`): ``epochs`` over
        ``n_fit`` images, at least ``min_steps``, at most ``config.max_steps`` when that is set."""
        return schedule.schedule_steps(epochs, n_fit, batch_size, min_steps, self.config.max_steps)

    def budget_steps(self, steps: int, batch_size: int, images_per_s: float) -> int:
        """Cap a schedule so that it ends within ``config.max_train_seconds`` at the estimated throughput
        (:func:`anomap.train.schedule.budget_steps`); on a machine slower than the estimate the loop
        shortens the last stage."""
        return schedule.budget_steps(steps, batch_size, images_per_s, self.config.max_train_seconds)

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
        """Return at least {"loss": scalar tensor}; other scalar entries are logged."""
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

    def group_scores(self, fit_images: TensorLike, groups: int, progress: bool = False) -> np.ndarray:
        """Optional: every fit image's score from the model fitted without its group (module docstring, 7)."""
        raise ConfigError(f"{self.name} cannot be refitted without a group of its fit images.",
                          fix="use calibration_groups=0")

    def add_normals(self, images: Tensor) -> None:
        """Optional: learn that ``images`` (float (B, C, H, W) in [0, 1], working size) are normal, without
        retraining; state goes into buffers. This default refuses with a one-line ConfigError."""
        raise ConfigError(f"{self.name} cannot learn new normal images without retraining.",
                          fix="add them to train/good and retrain, or use gtrans with memory=fused")
