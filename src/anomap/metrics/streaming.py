"""Pixel AUROC and AUPRO in memory that does not grow with the number of test images.

:func:`anomap.evaluate` uses this module when the test set has more pixels than fit the exact path
(``EXACT_PIXEL_LIMIT`` in :mod:`anomap.metrics.evaluate`). It works in two passes:

1. while the detector runs, :class:`MapSpool` appends each batch of maps and masks to two files on
   disk and keeps a bounded subsample of the map values (:class:`ValueSample`, at most
   ``SAMPLE_CAP`` values) together with the exact global minimum and maximum;
2. bin edges are put at quantiles of that subsample (:func:`quantile_edges`), so every bin holds
   about the same share of all pixels, and :class:`PixelStream` reads the spool back a few images at
   a time, counting normal and defect pixels per bin and summing each defect pixel's PRO weight
   ``1 / |its region|`` per bin.

Memory: O(bins + SAMPLE_CAP + one chunk of images); disk: 5 bytes per pixel, removed afterwards.

Error bounds (computed from the histograms and returned with every value, not assumed):

* pixel AUROC: pairs of a defect and a normal pixel in different bins are ordered exactly as in the
  exact computation; a pair in the same bin counts 1/2 where the exact value counts 0, 1/2 or 1. So
  ``|binned - exact| <= 0.5 * sum_b pos_b * neg_b / (P * N)``. With equal-mass bins this is at most
  about ``0.5 / bins`` (8e-6 for 65,536 bins) unless many pixels share one value.
* AUPRO: the binned curve's points lie on the exact curve (a threshold at a bin edge); between two
  points both FPR and PRO are monotone, so the exact area of a segment lies within its bounding box
  and the trapezoid is off by at most half the box: ``sum_k 0.5 * dFPR_k * dPRO_k / fpr_limit``
  (the whole box for the segment cut at ``fpr_limit``).

Both bounds also include the floating-point error of the sums
(:func:`anomap.metrics.curves.area_rounding_bound`, about 6e-11 at 65,536 bins): where the bins
separate every defect pixel from every normal one the binning error is zero, but the binned and the
exact value are still summed in a different order.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import numpy as np

from anomap.metrics.curves import (
    MAX_CURVE_POINTS,
    area_rounding_bound,
    downsample_curve,
    limit_curve,
    trapezoid,
)
from anomap.metrics.pro import region_weights

__all__ = ["DEFAULT_BINS", "MapSpool", "PixelStream", "ValueSample", "quantile_edges"]

DEFAULT_BINS = 1 << 16
SAMPLE_CAP = 1 << 20


class ValueSample:
    """A deterministic subsample of at most ``cap`` values from a stream, plus the exact min and max.

    Every ``stride``-th value of each flattened image is kept; when the sample outgrows ``cap`` it is
    thinned by two and the stride doubles, so each value of the stream has (about) the same chance
    of being in the sample whatever the stream's length.

    Raises:
        ValueError: (from :meth:`add`) a value is NaN or infinite.
    """

    def __init__(self, cap: int = SAMPLE_CAP):
        self.cap = max(2, int(cap))
        self.stride = 1
        self._parts: list[np.ndarray] = []
        self._size = 0
        self.lo = np.inf
        self.hi = -np.inf
        self.count = 0

    def add(self, values: np.ndarray) -> None:
        """Add any array of values (flattened)."""
        flat = np.asarray(values).ravel()
        if flat.size == 0:
            return
        lo, hi = float(flat.min()), float(flat.max())
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError("anomaly maps contain NaN or infinite values.")
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        start = (-self.count) % self.stride  # keep stream positions that are multiples of the stride
        part = flat[start::self.stride].astype(np.float64)
        self.count += flat.size
        self._parts.append(part)
        self._size += part.size
        while self._size > self.cap:
            merged = np.concatenate(self._parts)[::2]
            self._parts, self._size = [merged], merged.size
            self.stride *= 2

    @property
    def values(self) -> np.ndarray:
        """The sampled values (float64, stream order)."""
        return np.concatenate(self._parts) if self._parts else np.zeros(0, dtype=np.float64)


def quantile_edges(sample: np.ndarray, lo: float, bins: int = DEFAULT_BINS) -> np.ndarray:
    """Lower bin edges at the quantiles of ``sample``, starting at ``lo`` (the global minimum).

    Bin ``b`` holds values in ``[edges[b], edges[b + 1])``; the last bin is open above. Equal
    quantiles (many equal values) are merged, so there may be fewer than ``bins`` bins.
    """
    bins = max(1, int(bins))
    sample = np.asarray(sample, dtype=np.float64)
    if sample.size == 0 or bins == 1:
        return np.array([lo], dtype=np.float64)
    inner = np.quantile(sample, np.arange(1, bins) / bins)
    return np.unique(np.r_[float(lo), inner[inner > lo]])


class PixelStream:
    """Per-bin counts of normal and defect pixels and PRO weights; see the module docstring.

    Args:
        edges: ascending lower bin edges; values below ``edges[0]`` count in bin 0.
    """

    def __init__(self, edges: np.ndarray):
        edges = np.asarray(edges, dtype=np.float64).ravel()
        if edges.size == 0 or not np.all(np.isfinite(edges)) or np.any(np.diff(edges) <= 0):
            raise ValueError("bin edges must be finite, strictly increasing and not empty.")
        self.edges = edges
        bins = edges.size
        self.pos = np.zeros(bins, dtype=np.int64)
        self.neg = np.zeros(bins, dtype=np.int64)
        self.overlap = np.zeros(bins, dtype=np.float64)
        self.n_regions = 0

    @classmethod
    def linear(cls, lo: float, hi: float, bins: int = DEFAULT_BINS) -> PixelStream:
        """Equal-width bins over ``[lo, hi]`` (for when no sample of the values is at hand)."""
        if hi <= lo:
            return cls(np.array([lo], dtype=np.float64))
        return cls(np.unique(lo + (hi - lo) * np.arange(int(bins)) / int(bins)))

    @property
    def bins(self) -> int:
        return int(self.edges.size)

    def bin_index(self, values: np.ndarray) -> np.ndarray:
        """Bin of each value: the number of edges ``<= value``, minus one (at least 0)."""
        idx = np.searchsorted(self.edges, np.asarray(values, dtype=np.float64), side="right") - 1
        np.clip(idx, 0, self.bins - 1, out=idx)
        return idx

    def update(self, maps: np.ndarray, masks: np.ndarray) -> None:
        """Add anomaly maps (B, H, W) or (H, W) with their bool masks of the same shape."""
        maps = np.asarray(maps)
        masks = np.asarray(masks)
        if maps.shape != masks.shape:
            raise ValueError(f"maps {maps.shape} and masks {masks.shape} differ in shape.")
        if maps.ndim == 2:
            maps, masks = maps[None], masks[None]
        for values, mask in zip(maps, masks, strict=True):
            mask = mask.astype(bool, copy=False)
            idx = self.bin_index(values).ravel()
            flat = mask.ravel()
            self.pos += np.bincount(idx[flat], minlength=self.bins)
            self.neg += np.bincount(idx[~flat], minlength=self.bins)
            weights, count = region_weights(mask)
            if count:
                self.n_regions += count
                self.overlap += np.bincount(idx[flat], weights=weights, minlength=self.bins)

    def pixel_auroc(self) -> tuple[float, float, dict[str, list[float]]]:
        """``(auroc, max_error, {"fpr", "tpr"})``; the curve has at most about 500 points.

        Raises:
            ValueError: no defect pixel or no normal pixel has been seen.
        """
        n_pos, n_neg = int(self.pos.sum()), int(self.neg.sum())
        if n_pos == 0 or n_neg == 0:
            raise ValueError(f"ROC needs both classes, got {n_pos} defect and {n_neg} normal pixels.")
        fpr = np.r_[0.0, np.cumsum(self.neg[::-1]) / n_neg]
        tpr = np.r_[0.0, np.cumsum(self.pos[::-1]) / n_pos]
        value = trapezoid(tpr, fpr)
        ties = float(np.dot(self.pos.astype(np.float64), self.neg.astype(np.float64)))
        bound = 0.5 * ties / (float(n_pos) * float(n_neg)) + area_rounding_bound(self.bins + 1)
        fl, tl = downsample_curve(fpr, tpr, MAX_CURVE_POINTS)
        return float(value), bound, {"fpr": fl, "tpr": tl}

    def pro_curve(self, fpr_limit: float = 0.3) -> tuple[np.ndarray, np.ndarray, float]:
        """``(fprs, pros, max_error)``: the PRO curve up to ``fpr_limit`` at the bin edges.

        ``max_error`` bounds ``|AUPRO from this curve - exact AUPRO|`` (both normalised by
        ``fpr_limit``).

        Raises:
            ValueError: no defect region or no normal pixel has been seen, or a bad ``fpr_limit``.
        """
        if not 0.0 < fpr_limit <= 1.0:
            raise ValueError(f"fpr_limit must lie in (0, 1], got {fpr_limit}.")
        n_normal = int(self.neg.sum())
        if self.n_regions == 0:
            raise ValueError("PRO is undefined: no image has any defect pixel in its mask.")
        if n_normal == 0:
            raise ValueError("PRO is undefined: the masks cover every pixel, so there is no normal pixel.")
        fprs = np.maximum.accumulate(np.clip(np.r_[0.0, np.cumsum(self.neg[::-1]) / n_normal], 0.0, 1.0))
        pros = np.maximum.accumulate(
            np.clip(np.r_[0.0, np.cumsum(self.overlap[::-1]) / self.n_regions], 0.0, 1.0)
        )
        df, dp = np.diff(fprs), np.diff(pros)
        inside = fprs[1:] <= fpr_limit
        bound = 0.5 * float(np.sum(df[inside] * dp[inside]))
        cut = np.flatnonzero((fprs[:-1] < fpr_limit) & (fprs[1:] > fpr_limit))
        if cut.size:
            k = int(cut[0])
            bound += (fpr_limit - fprs[k]) * dp[k]
        f, p = limit_curve(fprs, pros, float(fpr_limit))
        # The overlap sums add one weight per defect pixel, then run over the bins.
        return f, p, bound / fpr_limit + area_rounding_bound(int(self.pos.sum()) + self.bins + 2)

    def aupro(self, fpr_limit: float = 0.3) -> tuple[float, float]:
        """``(aupro, max_error)``, AUPRO normalised by ``fpr_limit``."""
        f, p, bound = self.pro_curve(fpr_limit)
        return float(np.clip(trapezoid(p, f) / fpr_limit, 0.0, 1.0)), bound


class MapSpool:
    """Append-only store of float32 maps and bool masks (N, S, S) in two files under ``folder``.

    Only :class:`ValueSample` stays in memory; :meth:`chunks` reads the data back in order.
    """

    def __init__(self, folder: str | Path, size: int, sample_cap: int = SAMPLE_CAP):
        self.folder = Path(folder)
        self.size = int(size)
        self.n = 0
        self.defect_pixels = 0
        self.sample = ValueSample(sample_cap)
        self._maps_path = self.folder / "maps.f32"
        self._masks_path = self.folder / "masks.u8"
        self._maps = open(self._maps_path, "wb")  # noqa: SIM115 - closed in close()
        self._masks = open(self._masks_path, "wb")  # noqa: SIM115

    def add(self, maps: np.ndarray, masks: np.ndarray) -> None:
        """Append maps (B, S, S) and masks (B, S, S)."""
        maps = np.ascontiguousarray(maps, dtype=np.float32)
        masks = np.ascontiguousarray(masks, dtype=bool)
        if maps.shape != masks.shape or maps.shape[1:] != (self.size, self.size):
            raise ValueError(f"spool of {self.size}x{self.size} maps got {maps.shape} / {masks.shape}.")
        self.sample.add(maps)
        self._maps.write(maps.tobytes())
        self._masks.write(masks.view(np.uint8).tobytes())
        self.n += maps.shape[0]
        self.defect_pixels += int(masks.sum())

    def close(self) -> None:
        for f in (self._maps, self._masks):
            if not f.closed:
                f.flush()
                f.close()

    def chunks(self, images: int = 16) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(maps, masks) blocks of up to ``images`` images each, in the order they were added."""
        self.close()
        per = self.size * self.size
        with open(self._maps_path, "rb") as fm, open(self._masks_path, "rb") as fk:
            done = 0
            while done < self.n:
                k = min(images, self.n - done)
                maps = np.fromfile(fm, dtype=np.float32, count=k * per).reshape(k, self.size, self.size)
                masks = np.fromfile(fk, dtype=np.uint8, count=k * per).reshape(k, self.size, self.size)
                yield maps, masks.view(bool)
                done += k

    def stream(self, bins: int = DEFAULT_BINS) -> PixelStream:
        """Second pass: a :class:`PixelStream` with quantile bins, filled from the spool."""
        lo = self.sample.lo if self.n else 0.0
        stream = PixelStream(quantile_edges(self.sample.values, lo, bins))
        for maps, masks in self.chunks():
            stream.update(maps, masks)
        return stream

    def remove(self) -> None:
        """Close and delete the spool files."""
        self.close()
        for p in (self._maps_path, self._masks_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
