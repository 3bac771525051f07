"""Faster inference with ``torch.compile``: a method's ``predict`` compiled once for one batch shape.

``Detector.compile(batch_size)`` (and ``--compile`` on ``anomap predict`` / ``anomap serve``) swaps the
eager ``Method.predict`` for :class:`CompiledPredict`. TorchInductor compiles the whole scoring pass
(teacher, student or decoder, distances, upsampling, blur, image score) into fused CPU kernels with the
weights frozen as constants (conv + BatchNorm folded, weights pre-packed). It is still PyTorch: same
weights, same calibration, maps equal to eager ones up to float rounding (tests check 1e-4).

Costs and rules:

- The first call compiles: tens of seconds on 2 cores (about 25-80 s for the three methods; a second
  process reuses TorchInductor's on-disk cache and starts faster). Worth it for a service or a large
  folder, not for scoring one image once.
- One batch shape: every call is cut into chunks of ``batch_size`` images and the last chunk is padded
  (with copies of its last image, whose outputs are dropped), so the graph compiles once. Use
  ``batch_size=1`` for a latency-bound service, 16 for bulk scoring.
- The weights are frozen into the graph: anything that changes the model (fit, load, rescore) must drop
  it (``Detector`` does). Inference only, under ``torch.no_grad``.
- If compiling fails (no C++ compiler, an unsupported device), a warning says so once and scoring
  falls back to eager PyTorch; results are the same, only slower.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from anomap.methods.base import Method


class CompiledPredict:
    """``Method.predict`` compiled by TorchInductor for batches of exactly ``batch_size`` images.

    Args:
        model: a trained method in eval mode (its weights become constants of the compiled graph).
        batch_size: the one batch shape the graph is compiled for (>= 1).
        compiler: the compile function (``torch.compile``); replaceable in tests.
    """

    def __init__(self, model: Method, batch_size: int, compiler: Callable[..., Callable] | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.batch_size = int(batch_size)
        self.failed: str | None = None
        self._compiler = compiler or torch.compile
        self._fn: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None
        self._lock = threading.Lock()  # compiling happens once, even when a service calls from several threads
        self._warm = False

    def _compiled(self) -> Callable[[Tensor], tuple[Tensor, Tensor]] | None:
        if self.failed is None and self._fn is None:
            self._fn = self._compiler(self.model.predict, dynamic=False, options={"freezing": True})
        return self._fn if self.failed is None else None

    def _run_chunk(self, x: Tensor) -> tuple[Tensor, Tensor]:
        n = x.shape[0]
        if n < self.batch_size:
            x = torch.cat([x, x[-1:].expand(self.batch_size - n, *x.shape[1:])])
        fn = self._compiled()
        if fn is not None and not self._warm:
            with self._lock:
                if not self._warm and self.failed is None:
                    try:
                        out = fn(x)
                        self._warm = True
                        return out[0][:n], out[1][:n]
                    except Exception as e:  # noqa: BLE001 - any compiler failure: fall back to eager
                        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                        self.failed = f"{type(e).__name__}: {first}"
                        warnings.warn(f"torch.compile could not compile {type(self.model).__name__}.predict "
                                      f"({self.failed}); scoring with eager PyTorch instead (same results, slower).",
                                      RuntimeWarning, stacklevel=3)
            fn = self._compiled()
        s, m = (fn or self.model.predict)(x)
        return s[:n], m[:n]

    @torch.no_grad()
    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Scores (B,) and maps (B, S, S) for images (B, C, S, S) in [0, 1], like ``Method.predict``."""
        if x.shape[0] == 0:
            return self.model.predict(x)
        scores, maps = [], []
        for i in range(0, x.shape[0], self.batch_size):
            s, m = self._run_chunk(x[i:i + self.batch_size])
            scores.append(s)
            maps.append(m)
        return torch.cat(scores), torch.cat(maps)
