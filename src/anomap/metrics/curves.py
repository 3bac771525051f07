"""Helpers shared by the curve metrics: areas, input checks, cutting and thinning curves, error bounds.

Used by :mod:`anomap.metrics.roc`, :mod:`~anomap.metrics.pro`, :mod:`~anomap.metrics.streaming` and
:mod:`~anomap.metrics.evaluate`; nothing here knows about detectors or files.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["MAX_CURVE_POINTS", "area_rounding_bound", "check_pixel_inputs", "downsample_curve", "limit_curve",
           "round_up", "trapezoid"]

MAX_CURVE_POINTS = 500  # points kept of a curve in results and reports (enough for a plot)
_EPS = float(np.finfo(np.float64).eps)  # 2**-52; the unit roundoff u is half of it


def trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    """Trapezoid-rule area under ``y(x)`` (works on numpy 1.x and 2.x); 0.0 for fewer than 2 points."""
    if x.size < 2:
        return 0.0
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2.0)


def area_rounding_bound(n_terms: int) -> float:
    """Bound on the floating-point error of a normalised curve area computed in float64 by this package.

    ``n_terms`` must be at least the number of curve points and at least the number of values added
    up in any running sum that feeds the curve (PRO's sums of region weights).

    Why ``4 * n_terms * eps`` (``eps = 2**-52 = 2u``, ``u`` the unit roundoff). The area is
    ``0.5 * sum_k (x_k - x_{k-1}) * (y_k + y_{k-1})`` over ``n`` points, ``x`` non-decreasing over a
    span of 1 (or ``fpr_limit``, divided out at the end: one more rounding) and ``y`` in [0, 1]:

    * each ``x_k`` is an integer count over a total (one rounding: ``<= u``, relative to the span);
      each ``y_k`` is such a quotient or a sum of ``m`` rounded weights over their total, which is off
      by ``<= (m + 2) u`` (Higham's first-order bound ``(m - 1) u sum|w|`` holds for any summation
      order, so for numpy's pairwise sums and ``cumsum`` alike). Clipping and ``maximum.accumulate``
      are 1-Lipschitz and add nothing; the interpolated point at an FPR limit adds a few ``u``.
    * before halving: the rounded differences ``dx_k`` are off by ``<= 3u`` each, times
      ``y_k + y_{k-1} <= 2``: ``6nu``; the ``y`` errors ``2 (m + 3) u`` times ``sum dx = 1``; the
      products ``2u``; the final sum of ``n`` terms with magnitudes adding up to ``<= 2``:
      ``2 (n - 1) u``. Halving is exact.

    With ``N = max(n, m)`` the error is at most ``(4n + m + 5) u <= 5Nu + 5u``, below ``8Nu = 4N eps``
    for ``N >= 2``; the rest covers the second-order terms. It is tiny (1.5e-8 for 2**24 pixels, 6e-11
    for 65,536 bins) but not zero: two correct computations that add in a different order (the exact
    and the binned pixel AUROC, or the same code on another CPU) may differ by about this much.
    """
    return 4.0 * max(int(n_terms), 2) * _EPS


def round_up(value: float, digits: int = 3) -> float:
    """``value`` shortened to ``digits`` significant digits, rounding up, so that a bound stays a bound."""
    if not value > 0.0 or not math.isfinite(value):
        return float(value)
    text = f"{value:.{digits - 1}e}"
    short = float(text)
    if short < value:
        mantissa, exponent = text.split("e")
        short = float(f"{float(mantissa) + 10.0 ** (1 - digits):.{digits - 1}f}e{exponent}")
    return short


def check_pixel_inputs(maps: Any, masks: Any) -> tuple[np.ndarray, np.ndarray]:
    """``maps`` and ``masks`` as arrays of the same (N, H, W) shape (a ``np.memmap`` stays one).

    Raises:
        ValueError: ``maps`` is not 3-D, or the shapes differ.
    """
    maps_arr = maps if isinstance(maps, np.ndarray) else np.asarray(maps)
    masks_arr = masks if isinstance(masks, np.ndarray) else np.asarray(masks)
    if maps_arr.ndim != 3:
        raise ValueError(f"maps must have shape (N, H, W), got {maps_arr.shape}.")
    if maps_arr.shape != masks_arr.shape:
        raise ValueError(f"maps {maps_arr.shape} and masks {masks_arr.shape} differ in shape.")
    return maps_arr, masks_arr


def limit_curve(fprs: np.ndarray, pros: np.ndarray, fpr_limit: float) -> tuple[np.ndarray, np.ndarray]:
    """Keeps points with fpr <= fpr_limit and adds the point at fpr_limit by linear interpolation.

    ``fprs`` must be non-decreasing, start at 0 and end at a value >= ``fpr_limit``.
    """
    keep = int(np.searchsorted(fprs, fpr_limit, side="right"))
    out_f, out_p = fprs[:keep], pros[:keep]
    if out_f[-1] < fpr_limit and keep < fprs.size:
        f0, f1 = fprs[keep - 1], fprs[keep]
        p0, p1 = pros[keep - 1], pros[keep]
        p_lim = p0 + (p1 - p0) * (fpr_limit - f0) / (f1 - f0)
        out_f = np.r_[out_f, fpr_limit]
        out_p = np.r_[out_p, p_lim]
    return out_f, out_p


def _unit(v: np.ndarray) -> np.ndarray:
    """``v`` mapped onto [0, 1] by its first and last value (zeros when they are equal)."""
    span = float(v[-1] - v[0])
    return (v - v[0]) / span if span > 0 else np.zeros(v.shape, dtype=np.float64)


def downsample_curve(x: np.ndarray, y: np.ndarray,
                     max_points: int = MAX_CURVE_POINTS) -> tuple[list[float], list[float]]:
    """At most ``max_points + 1`` points of a monotone curve, evenly spaced along it; endpoints kept.

    ``x`` and ``y`` must both be non-decreasing (ROC and PRO curves are). Each is scaled to [0, 1] by
    its span (as a plot's axes do), and points are taken at equal steps of the scaled ``x + y``, the
    curve's length as drawn. Taking every k-th point instead follows the density of the scores: a ROC
    curve's points crowd where most scores lie, and its steep start may get only a handful. For a
    curve from (0, 0) to (1, 1) the scaling is the identity (positions are exactly ``x + y``).

    Returns:
        ``(x, y)`` as lists of Python floats; the curve unchanged when it has at most ``max_points``.
    """
    if x.size <= max_points:
        return x.tolist(), y.tolist()
    pos = _unit(x) + _unit(y)  # non-decreasing from 0 to at most 2
    targets = np.linspace(pos[0], pos[-1], max_points)
    keep = np.unique(np.r_[0, np.searchsorted(pos, targets, side="left").clip(0, x.size - 1), x.size - 1])
    return x[keep].tolist(), y[keep].tolist()
