"""gtrans's memory: the teacher (the AGN) also remembers normal patches, PatchCore-style.

Patch features: the teacher's feature maps at ``memory_scales`` (the same maps gtrans computes for the
student's targets, so no extra teacher pass), each averaged over ``memory_pool`` x ``memory_pool``
neighbourhoods (PatchCore's local aggregation), the coarser ones upsampled bilinearly to the finest
chosen grid, concatenated: one row of ``sum(channels)`` values per cell of that grid (stride 8 at the
default ``[0, 1]``: 28 x 28 rows per 224-px image, 40 + 112 = 152 values for Lite0).

Standardisation: each channel is standardised with the fit images' per-channel mean and std that
gtrans already computes (``feat_mean{k}`` / ``feat_std{k}``) of the teacher's own features, so every
channel weighs alike in the Euclidean kNN distance, which becomes a diagonal Mahalanobis distance under
the fit images' spread (between PatchCore's raw L2 and PaDiM's full covariance). The mean does not
change any L2 distance; the std reweights channels by up to about 2.5x (Lite0 on 8 mpdd_metal_plate
images: channel std 3.6 to 8.9 at stride 8). Raw features were not measured against it. Pooling and
bilinear upsampling are convex combinations per channel, so standardising the rows at the end gives the
same rows as standardising the maps first; ``prepare_fit`` uses that to collect rows before the
statistics are known. (With ``memory_pool_pad=zeros`` a border cell's average also counts zeros outside
the map, so its raw features shrink toward zero, by 6/9 on an edge and 4/9 in a corner at pool 3; rows
are standardised after pooling at fit and at inference alike.)

The bank is a greedy coreset (:func:`anomap.nn.memory.greedy_coreset`) of the fit images' rows:
``memory_ratio`` of them, at most ``memory_max``; at most ``CANDIDATES_PER_ROW`` x that many rows
(drawn at random with the seed) are candidates, which bounds the coreset's cost for large fit sets.
The memory map is each cell's distance to its nearest bank row, divided by its mean over held-out
normals (``mean_dist``, set by gtrans's ``calibrate``) and, with ``memory_norm=location``, by that cell's
own held-out mean relative to it (``mean_loc``).

The fine memory (``memory_fine_weight`` > 0): a second bank of the finest scale's part of the same rows
alone (a coreset of at most ``memory_fine_max`` of them), searched for every query as well and normalised
alike. gtrans adds its excess over the held-out mean to the anomaly map, while the image score keeps this
memory's own distances: the finest scale alone localises small defects better, the scales together
detect better (docs/experiments/2026-12-fine-memory.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from anomap.nn.filters import location_ratio
from anomap.nn.memory import PatchMemory, greedy_coreset_radius

WHITEN_RIDGE = 0.01  # added to the covariance's diagonal before it is inverted (standardised features: variance ~1)
CANDIDATES_PER_ROW = 10  # coreset candidates per bank row: all fit rows up to 10 x memory_max (163,840 rows)
PROJ_DIM = 128  # PatchCore's random projection for the coreset's distances
RADIUS_SLACK = 1e-3  # add() stops within this fraction of the radius: rounding must not add a fit row again


class GTransMemory(PatchMemory):
    """The bank plus what gtrans needs around it; see the module docstring.

    Args:
        index: positions in gtrans's feature list (its ``scales``) of the memory's scales, finest first.
        channels: their channel counts.
        pool: ``memory_pool``.
        grid: (height, width) of the finest memory scale's map at the working shape (``mean_loc``'s shape).
        pool_pad: ``memory_pool_pad``: "zeros" counts the zero padding in the border cells' averages
            (PatchCore's ``AvgPool2d``; the border cells' raw features shrink toward zero), "none" averages
            only the cells inside the map.
        metric, balance: ``memory_metric``, ``memory_balance``.
        fine: add the fine memory (``fine``; ``memory_fine_weight`` > 0).
    """

    mean_dist: Tensor  # registered buffers
    mean_loc: Tensor
    radius: Tensor
    whiten: Tensor
    balance: Tensor | None

    def __init__(self, index: list[int], channels: list[int], pool: int, grid: tuple[int, int], pool_pad: str = "none",
                 metric: str = "diagonal", balance: str = "channels", fine: bool = False):
        super().__init__(sum(channels))
        # memory_fine_weight > 0: the finest scale's block of the rows in a bank of its own (no fine of its own)
        self.fine = GTransMemory(index[:1], channels[:1], pool, grid, pool_pad, metric) if fine else None
        self.index, self.pool, self.pad_zeros = index, pool, pool_pad == "zeros"
        self.whitened = metric == "mahalanobis"
        # memory_balance=scales: each scale's standardised block times sqrt(sum(C) / (len(C) * C_k)); else None
        weights = [torch.full((c,), math.sqrt(sum(channels) / (len(channels) * c))) for c in channels]
        self.register_buffer("balance", torch.cat(weights) if balance == "scales" else None, persistent=False)
        self.register_buffer("mean_dist", torch.ones(()))
        # memory_norm=location: each cell's held-out mean distance over mean_dist (grid, shrunk toward 1)
        self.register_buffer("mean_loc", torch.ones(grid))
        # the coreset's covering radius: squared projected distance of the farthest fit row from the bank
        self.register_buffer("radius", torch.zeros(()))
        # memory_metric=mahalanobis: standardised rows times this (D, D), (cov + WHITEN_RIDGE I)^-1/2 of the fit rows
        self.register_buffer("whiten", torch.eye(sum(channels)))

    def rows(self, feats: list[Tensor]) -> tuple[Tensor, tuple[int, int, int]]:
        """Patch features (B*h*w, D) of gtrans's teacher features ``feats``, not standardised, and (B, h, w)."""
        maps: list[Tensor] = []
        for k in self.index:
            f = feats[k]
            if self.pool > 1:
                f = F.avg_pool2d(f, self.pool, 1, self.pool // 2, count_include_pad=self.pad_zeros)
            if maps and f.shape[-2:] != maps[0].shape[-2:]:
                f = F.interpolate(f, size=maps[0].shape[-2:], mode="bilinear", align_corners=False)
            maps.append(f)
        x = torch.cat(maps, dim=1)
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]), (x.shape[0], x.shape[2], x.shape[3])

    def standardise(self, rows: Tensor, means: list[Tensor], stds: list[Tensor]) -> Tensor:
        """``rows`` (N, D) standardised per channel with gtrans's per-scale ``feat_mean`` / ``feat_std``, then
        times ``whiten`` (the identity unless ``memory_metric=mahalanobis``)."""
        mean = torch.cat([means[k].flatten() for k in self.index])
        std = torch.cat([stds[k].flatten() for k in self.index])
        rows = (rows - mean) / std
        if self.balance is not None:
            rows = rows * self.balance
        return rows @ self.whiten if self.whitened else rows

    def fit_whitening(self, rows: Tensor) -> Tensor:
        """Set ``whiten`` to ``(C + WHITEN_RIDGE I)^-1/2`` of the standardised fit rows' covariance ``C`` (a
        Mahalanobis distance under their spread, PaDiM's ridge); returns ``rows`` whitened."""
        x = rows.double()
        x = x - x.mean(0)
        cov = x.T @ x / max(len(x) - 1, 1)
        vals, vecs = torch.linalg.eigh(cov + WHITEN_RIDGE * torch.eye(len(cov), dtype=cov.dtype, device=cov.device))
        self.whiten.copy_((vecs * vals.clamp_min(WHITEN_RIDGE).rsqrt()) @ vecs.T)
        return rows @ self.whiten

    def distance_maps(self, feats: list[Tensor], means: list[Tensor], stds: list[Tensor]) -> list[Tensor]:
        """Each cell's distance to its nearest bank row (B, h, w), not normalised, then the fine memory's
        when there is one (from the same rows)."""
        rows, (_, h, w) = self.rows(feats)
        out = [self(self.standardise(rows, means, stds)).reshape(-1, h, w)]  # -1: the batch stays dynamic in ONNX
        if self.fine is not None:
            out.append(self.fine(self.fine.standardise(self.fine_block(rows), means, stds)).reshape(-1, h, w))
        return out

    def fine_block(self, rows: Tensor) -> Tensor:
        """The finest scale's columns of ``rows`` (N, D): the rows the fine memory would take from the same features."""
        assert self.fine is not None
        return rows[:, :self.fine.bank.shape[1]]

    def calibrate(self, dists: Tensor, prior: float) -> None:
        """``mean_dist`` and ``mean_loc`` from the held-out normals' distance maps ``dists`` (B, h, w); each cell's
        mean is shrunk toward ``mean_dist`` as if ``prior`` more images had given exactly that there."""
        d = dists.double()
        m = d.mean().clamp_min(1e-12)
        self.mean_dist.fill_(float(m))
        if d.shape[-2:] == self.mean_loc.shape:
            self.mean_loc.copy_(location_ratio(d, m, prior).to(self.mean_loc))

    def calibrate_all(self, dists: list[Tensor], prior: float) -> None:
        """:meth:`calibrate` this memory and the fine one from ``distance_maps``' held-out maps (concatenated)."""
        self.calibrate(dists[0], prior)
        if self.fine is not None:
            self.fine.calibrate(dists[1], prior)

    def _normalised(self, d: Tensor, norm: str) -> Tensor:
        """A distance map of this bank over ``mean_dist``, and for ``norm="location"`` over ``mean_loc`` as well."""
        d = d / self.mean_dist
        return d / self.mean_loc if norm == "location" and d.shape[-2:] == self.mean_loc.shape else d

    def normalised_maps(self, feats: list[Tensor], means: list[Tensor], stds: list[Tensor], norm: str,
                        image_norm: str) -> tuple[Tensor, Tensor, Tensor | None]:
        """(the anomaly map's, the image score's, the fine memory's) normalised distances (B, h, w), from one
        search per bank: this bank's over ``mean_dist`` and, for "location", over ``mean_loc`` as well, by
        ``norm`` and by ``image_norm`` ("same": ``norm``; then the very same tensor); the fine memory's by
        ``norm`` (None without one)."""
        dists = self.distance_maps(feats, means, stds)
        main = self._normalised(dists[0], norm)
        for_image = main if image_norm in ("same", norm) else self._normalised(dists[0], image_norm)
        fine = self.fine._normalised(dists[1], norm) if self.fine is not None else None
        return main, for_image, fine

    def fit(self, rows: Tensor, means: list[Tensor], stds: list[Tensor], ratio: float, max_rows: int,
            fine_max: int, seed: int) -> None:
        """The bank(s) from the fit images' rows (N, D) as :meth:`rows` gives them: standardised (and
        whitened, ``memory_metric=mahalanobis``), then :meth:`build`; the fine memory's from their finest
        block, at most ``fine_max`` rows."""
        std_rows = self.standardise(rows, means, stds)
        if self.whitened:
            std_rows = self.fit_whitening(std_rows)
        self.build(std_rows, ratio, max_rows, seed)
        if self.fine is not None:
            self.fine.fit(self.fine_block(rows), means, stds, ratio, fine_max, 0, seed)

    def build(self, rows: Tensor, ratio: float, max_rows: int, seed: int) -> None:
        """The bank = a greedy coreset of ``ceil(ratio * N)`` (at most ``max_rows``) of ``rows`` (N, D)."""
        n_pick = min(max_rows, max(1, math.ceil(ratio * len(rows))))
        idx, radius = greedy_coreset_radius(rows, n_pick, PROJ_DIM, seed,
                                            max_candidates=CANDIDATES_PER_ROW * n_pick)
        self.set_bank(rows[idx])
        self.radius.fill_(radius)

    def add_rows(self, rows: Tensor, means: list[Tensor], stds: list[Tensor], max_rows: int, fine_max: int,
                 seed: int) -> None:
        """:meth:`add` new normal images' rows (N, D) as :meth:`rows` gives them, standardised like the fit
        rows, to this bank, and their finest block to the fine memory's (at most ``fine_max`` rows)."""
        self.add(self.standardise(rows, means, stds), max_rows, seed)
        if self.fine is not None:
            self.fine.add_rows(self.fine_block(rows), means, stds, fine_max, 0, seed)

    def add(self, rows: Tensor, max_rows: int, seed: int) -> None:
        """Add rows (N, D) of new normal images, covering them as tightly as the bank covers the fit rows.

        While there is room, the greedy k-center picks continue from the bank among ``rows`` until
        every new row lies within the bank's covering ``radius`` (in the coreset's projection): the
        bank's rows are all kept, so no distance to it grows. When ``max_rows`` would be exceeded, the
        bank becomes a coreset of ``max_rows`` of its rows and the new ones together (its radius then
        grows: every distance may change).
        """
        room, radius = max_rows - len(self), float(self.radius) * (1 + RADIUS_SLACK)
        if room > 0:
            idx, left = greedy_coreset_radius(rows, min(room, len(rows)), PROJ_DIM, seed, start=self.bank,
                                              stop_at=radius)
            if left <= radius or len(idx) == len(rows):
                self.set_bank(torch.cat([self.bank, rows[idx].to(self.bank)]))
                return
        both = torch.cat([self.bank, rows.to(self.bank)])
        idx, radius = greedy_coreset_radius(both, max_rows, PROJ_DIM, seed)
        self.set_bank(both[idx])
        self.radius.fill_(max(radius, float(self.radius)))
