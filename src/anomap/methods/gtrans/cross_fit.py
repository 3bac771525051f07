"""Group scores for the threshold (``calibration_groups``): each fit image scored by a memory without its group.

The held-out normals are a random share of ``train/good``: each has near twins among the fit images
(the same spindle position a few hours later, the same paper grade), so the memory knows it well and
its score is low. A line's new normal images are often less alike: another position, another batch.
The fit images are split into ``calibration_groups`` groups by k-means on how they look (each image's
mean of every standardised teacher channel the memory reads); each group is scored by a memory rebuilt, the same way,
from the other groups' patches only (the map normalisation stays the full model's). A group unlike
the others then scores as a new condition would, and the threshold (a conformal order statistic of
these scores and the held-out ones, :mod:`anomap.metrics.threshold`) promises its false-alarm rate for
such images too. docs/protocol.md says what this buys and costs; nothing here reads a label.
"""

from __future__ import annotations

import copy
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from anomap.types import TensorLike


class MemoryModel(Protocol):
    """What :func:`group_scores` reads of a gtrans (kept structural: method.py imports this module)."""

    config: Any
    memory: Any

    def _feat_stats(self) -> tuple[list[Tensor], list[Tensor]]: ...
    def _teacher(self, x: Tensor) -> list[Tensor]: ...
    def predict(self, x: Tensor) -> tuple[Tensor, Tensor]: ...

KMEANS_ITERS = 50
KMEANS_RESTARTS = 5


def kmeans_groups(points: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Group labels (N,) in [0, k) of ``points`` (N, D): k-means (k-means++ starts, ``KMEANS_RESTARTS``
    seeded restarts, the lowest inertia kept) on the points standardised per column. ``k`` is clipped
    to N. Deterministic for a seed.

    >>> kmeans_groups(np.array([[0.0], [0.1], [5.0], [5.1]]), 2, 0).tolist() in ([0, 0, 1, 1], [1, 1, 0, 0])
    True
    """
    x = np.asarray(points, np.float64)
    x = (x - x.mean(0)) / (x.std(0) + 1e-9)
    n, k = len(x), max(1, min(int(k), len(x)))
    rng = np.random.default_rng(seed)
    best: tuple[float, np.ndarray] | None = None
    for _ in range(KMEANS_RESTARTS):
        centres = [x[rng.integers(n)]]
        for _ in range(k - 1):  # k-means++: the next start far from the chosen ones
            d2 = np.min([((x - c) ** 2).sum(1) for c in centres], axis=0)
            centres.append(x[rng.choice(n, p=d2 / d2.sum())] if d2.sum() > 0 else x[rng.integers(n)])
        c = np.stack(centres)
        for _ in range(KMEANS_ITERS):
            labels = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
            new = np.stack([x[labels == j].mean(0) if (labels == j).any() else c[j] for j in range(k)])
            if np.allclose(new, c):
                break
            c = new
        labels = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
        inertia = float(((x - c[labels]) ** 2).sum())
        if best is None or inertia < best[0]:
            best = (inertia, labels)
    assert best is not None
    return best[1]


@torch.no_grad()
def group_scores(model: MemoryModel, fit_images: TensorLike, groups: int, batch: int,
                 progress: bool = False) -> np.ndarray:
    """Every fit image's score (N,) from ``model`` (a gtrans with ``memory=only``) with its memory rebuilt
    from the other groups' images (module docstring). The model's own memory is left untouched."""
    cfg, memory = model.config, model.memory
    assert memory is not None
    rows: list[Tensor] = []  # per image: its patch rows, not standardised
    looks: list[np.ndarray] = []
    means, stds = model._feat_stats()
    for i in range(0, len(fit_images), batch):
        feats = model._teacher(fit_images[i:i + batch])
        r, (b, h, w) = memory.rows(feats)
        rows.extend(r.reshape(b, h * w, -1))
        looks.append(torch.cat([((feats[k] - means[k]) / stds[k]).mean(dim=(2, 3)) for k in memory.index],
                               dim=1).double().cpu().numpy())
    n = len(rows)
    if n < 2 or groups < 2:
        return np.zeros(0)
    labels = kmeans_groups(np.concatenate(looks), groups, cfg.seed)
    scores = np.zeros(n)
    try:
        for g in tqdm(np.unique(labels), desc="group scores", unit="group", disable=not progress, leave=False):
            inside = np.flatnonzero(labels == g)
            others = [rows[j] for j in range(n) if labels[j] != g]
            if not others:  # one group holds every image: nothing to leave it out of
                return np.zeros(0)
            fold = copy.deepcopy(memory)
            fold.fit(torch.cat(others), means, stds, cfg.memory_ratio, cfg.memory_max, cfg.memory_fine_max, cfg.seed)
            model.memory = fold
            for i in range(0, len(inside), batch):
                idx = inside[i:i + batch]
                x = torch.cat([fit_images[j:j + 1] for j in idx])
                scores[idx] = model.predict(x)[0].double().cpu().numpy()
    finally:
        model.memory = memory
    return scores
