"""The validation loss ``select_on=val_loss`` keeps the best weights by (see :class:`anomap.train.best.BestWeights`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch

from anomap.train.trainable import Trainable


class _Model(Trainable, Protocol):
    training: bool  # torch.nn.Module's flag


def val_loss_fn(model: _Model, held: Any, pool: np.ndarray, seed: int,
                device: torch.device) -> Callable[[], float]:
    """Validation loss on held-out normals (uint8 (N, S, S, C), an array or an ImageStore) with fixed
    synthetic corruption (never test data): one batch made once by ``make_batch`` (Generator seeded
    ``seed + 1``; ``pool``: the fit images), scored by ``training_step`` in eval mode without gradients."""
    batch = model.make_batch(np.asarray(held), np.random.default_rng(seed + 1), pool)
    batch = {k: v.to(device) for k, v in batch.items()}

    def fn() -> float:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            loss = float(model.training_step(batch, 0)["loss"])
        model.train(was_training)
        return loss

    return fn
