"""Per-region overlap (PRO) curve and its normalised area (AUPRO), as in MVTec AD (Bergmann et al.).

Ground-truth regions are the 8-connected components of each mask. At a threshold ``t`` a pixel is
predicted anomalous when ``map >= t``; the PRO is the mean over all regions (of all images) of the
fraction of the region predicted anomalous, and the FPR is the fraction of all normal pixels predicted
anomalous. The computation streams over images with ``num_thresholds`` fixed thresholds spread evenly
over the global [min, max] of the maps, so memory stays O(num_thresholds + one image).
:func:`pro_curve_exact` puts a threshold at every distinct map value instead (exact; memory O(pixels)).
For test sets too large for memory see :mod:`anomap.metrics.streaming`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from anomap.metrics.curves import check_pixel_inputs, limit_curve, trapezoid

__all__ = ["aupro", "aupro_exact", "pro_curve", "pro_curve_exact", "region_weights"]

_STRUCTURE = np.ones((3, 3), dtype=bool)


def _check_inputs(
    maps: Any, masks: Any, fpr_limit: float, num_thresholds: int
) -> tuple[np.ndarray, np.ndarray]:
    maps_arr, masks_arr = check_pixel_inputs(maps, masks)
    if maps_arr.shape[0] == 0:
        raise ValueError("PRO needs at least one image.")
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must lie in (0, 1], got {fpr_limit}.")
    if num_thresholds < 2:
        raise ValueError(f"num_thresholds must be at least 2, got {num_thresholds}.")
    return maps_arr, masks_arr


def _global_range(maps: np.ndarray) -> tuple[float, float]:
    """Global min and max of the maps, one image at a time; rejects non-finite values."""
    lo, hi = np.inf, -np.inf
    for i in range(maps.shape[0]):
        img = np.asarray(maps[i])
        bmin, bmax = float(img.min()), float(img.max())
        if not (np.isfinite(bmin) and np.isfinite(bmax)):
            raise ValueError(f"anomaly map {i} contains NaN or infinite values.")
        lo, hi = min(lo, bmin), max(hi, bmax)
    return lo, hi


def region_weights(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Weight ``1 / |region|`` of each defect pixel of one (H, W) mask, in ``mask``'s C order.

    Regions are 8-connected components. Returns ``(weights, n_regions)``; summing the weights of the
    pixels above a threshold gives the sum over regions of each region's covered fraction.
    """
    if not mask.any():
        return np.zeros(0, dtype=np.float64), 0
    labels, count = ndimage.label(mask, structure=_STRUCTURE)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    return 1.0 / sizes[labels[mask]], int(count)


def _pro_counts(
    maps: np.ndarray, masks: np.ndarray, thresholds: np.ndarray
) -> tuple[np.ndarray, int, np.ndarray, int]:
    """Per-threshold sums of region overlaps and normal-pixel counts above each threshold.

    Returns:
        ``(overlap_sum, n_regions, normal_above, n_normal)`` where ``overlap_sum[k]`` is the sum over
        regions of the fraction of the region with ``map >= thresholds[k]`` and ``normal_above[k]`` the
        number of normal pixels with ``map >= thresholds[k]``.
    """
    n_thr = thresholds.size
    overlap_hist = np.zeros(n_thr, dtype=np.float64)
    normal_hist = np.zeros(n_thr, dtype=np.int64)
    n_regions = 0
    n_normal = 0
    for i in range(maps.shape[0]):
        values = np.asarray(maps[i], dtype=np.float64)
        mask = np.asarray(masks[i]).astype(bool)
        # Index of the largest threshold <= value: the pixel is above thresholds[0..idx].
        idx = np.searchsorted(thresholds, values, side="right") - 1
        np.clip(idx, 0, n_thr - 1, out=idx)
        normal = ~mask
        n_normal += int(normal.sum())
        normal_hist += np.bincount(idx[normal], minlength=n_thr)
        weights, count = region_weights(mask)
        if count == 0:
            continue
        n_regions += count
        # Each defect pixel contributes 1 / |its region| to the overlap sum of the thresholds below it.
        overlap_hist += np.bincount(idx[mask], weights=weights, minlength=n_thr)
    # Reverse cumulative sums: count of values with idx >= k, i.e. map >= thresholds[k].
    overlap_sum = np.cumsum(overlap_hist[::-1])[::-1]
    normal_above = np.cumsum(normal_hist[::-1])[::-1]
    return overlap_sum, n_regions, normal_above, n_normal


def pro_curve(
    maps: Any, masks: Any, fpr_limit: float = 0.3, num_thresholds: int = 1000
) -> tuple[np.ndarray, np.ndarray]:
    """PRO against FPR, up to ``fpr_limit``.

    A pixel counts as predicted anomalous at threshold ``t`` when ``map >= t``. The thresholds are
    ``num_thresholds`` values spaced evenly over the global [min, max] of the maps, plus the point
    (0, 0) of a threshold above the maximum; the lowest threshold gives (1, 1).

    Args:
        maps: Float anomaly maps, shape (N, H, W); may be an ``np.memmap`` (read one image at a time).
        masks: Bool ground-truth masks, shape (N, H, W).
        fpr_limit: Largest FPR kept, in (0, 1].
        num_thresholds: Number of thresholds (at least 2).

    Returns:
        ``(fprs, pros)``: ``fprs`` ascending from 0 to exactly ``fpr_limit``, with matching PRO values.

    Raises:
        ValueError: If shapes or arguments are invalid, the maps are not finite, no image has a defect
            pixel, or there is no normal pixel.
    """
    maps_arr, masks_arr = _check_inputs(maps, masks, fpr_limit, num_thresholds)
    lo, hi = _global_range(maps_arr)
    thresholds = np.linspace(lo, hi, int(num_thresholds))
    overlap_sum, n_regions, normal_above, n_normal = _pro_counts(maps_arr, masks_arr, thresholds)
    if n_regions == 0:
        raise ValueError("PRO is undefined: no image has any defect pixel in its mask.")
    if n_normal == 0:
        raise ValueError("PRO is undefined: the masks cover every pixel, so there is no normal pixel.")
    # Thresholds descending -> FPR ascending; prepend the (0, 0) point of a threshold above the maximum.
    fprs = np.r_[0.0, normal_above[::-1] / n_normal]
    pros = np.r_[0.0, overlap_sum[::-1] / n_regions]
    # Guard against rounding: both are mathematically monotone.
    fprs = np.maximum.accumulate(np.clip(fprs, 0.0, 1.0))
    pros = np.maximum.accumulate(np.clip(pros, 0.0, 1.0))
    return limit_curve(fprs, pros, float(fpr_limit))


def aupro(maps: Any, masks: Any, fpr_limit: float = 0.3, num_thresholds: int = 1000) -> float:
    """Area under the PRO curve up to ``fpr_limit``, divided by ``fpr_limit``.

    Args:
        maps: Float anomaly maps, shape (N, H, W); may be an ``np.memmap``.
        masks: Bool ground-truth masks, shape (N, H, W).
        fpr_limit: Upper FPR integration limit, in (0, 1].
        num_thresholds: Number of thresholds (see :func:`pro_curve`).

    Returns:
        Normalised AUPRO in [0, 1] (1 for a perfect map).

    Raises:
        ValueError: If no image has any defect pixel, or the inputs are invalid (see :func:`pro_curve`).
    """
    fprs, pros = pro_curve(maps, masks, fpr_limit=fpr_limit, num_thresholds=num_thresholds)
    return float(np.clip(trapezoid(pros, fprs) / fpr_limit, 0.0, 1.0))


def pro_curve_exact(maps: Any, masks: Any, fpr_limit: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Exact PRO curve: one point per distinct map value (pixel anomalous when ``map >= value``).

    Only pixels at or above the threshold where the FPR first reaches ``fpr_limit`` can move the
    curve below the limit, so just those are sorted (about ``fpr_limit`` of the normal pixels plus the
    defect pixels). Memory is O(pixels): use it for test sets that fit in memory.

    Args:
        maps: Float anomaly maps, shape (N, H, W).
        masks: Bool ground-truth masks, shape (N, H, W).
        fpr_limit: Largest FPR kept, in (0, 1].

    Returns:
        ``(fprs, pros)`` as :func:`pro_curve` returns them.

    Raises:
        ValueError: as :func:`pro_curve`.
    """
    maps_arr, masks_arr = _check_inputs(maps, masks, fpr_limit, 2)
    _global_range(maps_arr)  # rejects non-finite values with the image's index
    normal_vals: list[np.ndarray] = []
    defect_vals: list[np.ndarray] = []
    defect_w: list[np.ndarray] = []
    n_regions = 0
    for i in range(maps_arr.shape[0]):
        values = np.asarray(maps_arr[i])
        mask = np.asarray(masks_arr[i]).astype(bool)
        normal_vals.append(values[~mask])
        weights, count = region_weights(mask)
        if count:
            n_regions += count
            defect_vals.append(values[mask])
            defect_w.append(weights)
    if n_regions == 0:
        raise ValueError("PRO is undefined: no image has any defect pixel in its mask.")
    normal = np.concatenate(normal_vals)
    del normal_vals
    if normal.size == 0:
        raise ValueError("PRO is undefined: the masks cover every pixel, so there is no normal pixel.")
    # t_lim: the m-th largest normal value, where m normal pixels first reach fpr_limit. Every
    # threshold below t_lim has FPR >= fpr_limit, so only values >= t_lim matter.
    n_normal = normal.size
    m = max(1, min(n_normal, int(np.ceil(fpr_limit * n_normal))))
    t_lim = np.partition(normal, n_normal - m)[n_normal - m]
    normal = normal[normal >= t_lim]
    dv = np.concatenate(defect_vals)
    dw = np.concatenate(defect_w)
    keep = dv >= t_lim
    values = np.concatenate([normal, dv[keep]])
    is_normal = np.r_[np.ones(normal.size, dtype=np.float64), np.zeros(int(keep.sum()), dtype=np.float64)]
    weight = np.r_[np.zeros(normal.size, dtype=np.float64), dw[keep]]
    order = np.argsort(values, kind="stable")[::-1]
    values = values[order]
    ends = np.r_[np.flatnonzero(np.diff(values)), values.size - 1]  # last index of each run of ties
    fprs = np.r_[0.0, np.cumsum(is_normal[order])[ends] / n_normal]
    pros = np.r_[0.0, np.cumsum(weight[order])[ends] / n_regions]
    fprs = np.maximum.accumulate(np.clip(fprs, 0.0, 1.0))
    pros = np.maximum.accumulate(np.clip(pros, 0.0, 1.0))
    return limit_curve(fprs, pros, float(fpr_limit))


def aupro_exact(maps: Any, masks: Any, fpr_limit: float = 0.3) -> float:
    """Area under :func:`pro_curve_exact` up to ``fpr_limit``, divided by ``fpr_limit``."""
    fprs, pros = pro_curve_exact(maps, masks, fpr_limit=fpr_limit)
    return float(np.clip(trapezoid(pros, fprs) / fpr_limit, 0.0, 1.0))
