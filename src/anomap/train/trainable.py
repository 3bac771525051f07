"""What the training loop needs of a method: the :class:`Trainable` protocol.

``anomap.methods.base.Method`` satisfies it; ``anomap.train`` depends on this protocol only, never on
``anomap.methods`` (which sits above it). Besides the hooks below, :func:`anomap.train.loop.train`
uses the ``torch.nn.Module`` side of the object (``train``/``eval``, ``state_dict``/``load_state_dict``,
``parameters``, ``modules``): with several processes it wraps the object in DDP, which needs a module.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import numpy as np
from torch import Tensor, nn

from anomap.train.schedule import Stage


class TrainConfig(Protocol):
    """The config values the loop reads."""

    @property
    def max_steps(self) -> int:
        """Stop after this many steps over all stages together (0: the schedule decides)."""
        ...


class Trainable(Protocol):
    """A model the loop trains: its stages, how to make a batch, and one training step."""

    @property
    def config(self) -> TrainConfig: ...

    def stages(self, n_fit: int) -> list[Stage]:
        """The training schedule for ``n_fit`` fit images."""
        ...

    def set_stage(self, name: str) -> None:
        """Called before a stage starts (freeze/unfreeze parts here)."""
        ...

    def make_batch(self, images: np.ndarray, rng: np.random.Generator, pool: np.ndarray) -> dict[str, Tensor]:
        """uint8 images (B, H, W, C) -> the tensors ``training_step`` needs; ``pool`` is all fit images."""
        ...

    def training_step(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        """At least {"loss": scalar tensor}; other scalar entries are logged."""
        ...

    # the torch.nn.Module side the loop uses
    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any: ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...

    def modules(self) -> Iterator[nn.Module]: ...
