"""Ranking metrics: ROC / precision-recall curves, AUROC, average precision, F1-max.

Exact functions follow scikit-learn's conventions (higher score = more anomalous, a sample is predicted
positive when ``score >= threshold``, one curve point per distinct score). :class:`BinnedROC` and
:func:`pixel_auroc` give a bounded-memory ROC for very large pixel sets.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from anomap.metrics.curves import (
    MAX_CURVE_POINTS,
    area_rounding_bound,
    check_pixel_inputs,
    downsample_curve,
    trapezoid,
)

__all__ = ["BinnedROC", "aupr", "auroc", "f1max", "pixel_auroc", "precision_recall_curve", "roc_curve"]


def _as_labels(labels: Any) -> np.ndarray:
    """Flattens ``labels`` to a bool array, rejecting values other than 0/1."""
    arr = np.asarray(labels).ravel()
    if arr.dtype == np.bool_:
        return arr
    if arr.size and np.any((arr != 0) & (arr != 1)):
        raise ValueError("labels must be 0/1 or bool; found other values.")
    return arr.astype(bool)


def _as_scores(scores: Any) -> np.ndarray:
    """Flattens ``scores`` to a float array (keeping float32 input as is), rejecting NaN."""
    arr = np.asarray(scores).ravel()
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    if np.isnan(arr).any():
        raise ValueError("scores contain NaN; every score must be a number.")
    return arr


def _binary_clf_counts(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative true / false positive counts at each distinct score, thresholds descending.

    Returns:
        ``(fps, tps, thresholds)``: at ``thresholds[i]``, ``tps[i]`` positives and ``fps[i]`` negatives
        have a score ``>= thresholds[i]``.
    """
    s = _as_scores(scores)
    y = _as_labels(labels)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in size: {s.size} vs {y.size}.")
    if s.size == 0:
        raise ValueError("scores and labels are empty.")
    order = np.argsort(s, kind="mergesort")[::-1]
    s = s[order]
    y = y[order]
    # Last index of each run of equal scores (scores are sorted descending).
    distinct = np.flatnonzero(np.diff(s))
    ends = np.r_[distinct, s.size - 1]
    tps = np.cumsum(y, dtype=np.int64)[ends]
    fps = (ends + 1) - tps
    return fps, tps, s[ends]


def roc_curve(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact ROC curve, one point per distinct score, starting at (0, 0).

    Args:
        scores: Float scores of any shape (flattened); higher means more anomalous.
        labels: 0/1 or bool labels of the same size (1 = anomalous).

    Returns:
        ``(fpr, tpr, thresholds)``; ``thresholds`` is descending and starts with ``inf`` for the (0, 0)
        point, like ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``.

    Raises:
        ValueError: If the inputs are empty, differ in size, contain NaN, or only one class is present.
    """
    fps, tps, thr = _binary_clf_counts(scores, labels)
    n_pos, n_neg = tps[-1], fps[-1]
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"ROC needs both classes, got {n_pos} positive and {n_neg} negative samples.")
    fpr = np.r_[0.0, fps / n_neg]
    tpr = np.r_[0.0, tps / n_pos]
    return fpr, tpr, np.r_[np.inf, thr]


def auroc(scores: Any, labels: Any) -> float:
    """Exact area under the ROC curve (trapezoid rule, ties count one half).

    Args:
        scores: Float scores of any shape; higher means more anomalous.
        labels: 0/1 or bool labels of the same size.

    Returns:
        AUROC in [0, 1].

    Raises:
        ValueError: If only one class is present (AUROC is undefined) or the inputs are invalid.
    """
    fpr, tpr, _ = roc_curve(scores, labels)
    return float(trapezoid(tpr, fpr))


def precision_recall_curve(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision-recall curve with scikit-learn's layout.

    Args:
        scores: Float scores of any shape; higher means more anomalous.
        labels: 0/1 or bool labels of the same size.

    Returns:
        ``(precision, recall, thresholds)`` with ``thresholds`` ascending (one per distinct score) and
        ``precision`` / ``recall`` one longer, ending with the point (recall 0, precision 1).

    Raises:
        ValueError: If there is no positive sample (recall undefined) or the inputs are invalid.
    """
    fps, tps, thr = _binary_clf_counts(scores, labels)
    if tps[-1] == 0:
        raise ValueError("precision-recall needs at least one positive (anomalous) sample.")
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], thr[::-1]


def aupr(scores: Any, labels: Any) -> float:
    """Average precision: sum over thresholds of (recall increase) x precision.

    Equal to ``sklearn.metrics.average_precision_score``.

    Args:
        scores: Float scores of any shape; higher means more anomalous.
        labels: 0/1 or bool labels of the same size.

    Returns:
        Average precision in [0, 1].

    Raises:
        ValueError: If there is no positive sample or the inputs are invalid.
    """
    precision, recall, _ = precision_recall_curve(scores, labels)
    return float(-np.sum(np.diff(recall) * precision[:-1]))


def f1max(scores: Any, labels: Any) -> tuple[float, float]:
    """Best F1 score over all thresholds (predict anomalous when ``score >= threshold``).

    Args:
        scores: Float scores of any shape; higher means more anomalous.
        labels: 0/1 or bool labels of the same size.

    Returns:
        ``(best_f1, threshold)``; on ties the highest such threshold is returned.

    Raises:
        ValueError: If there is no positive sample or the inputs are invalid.
    """
    fps, tps, thr = _binary_clf_counts(scores, labels)
    n_pos = tps[-1]
    if n_pos == 0:
        raise ValueError("F1 needs at least one positive (anomalous) sample.")
    # F1 = 2 TP / (2 TP + FP + FN) = 2 TP / (TP + FP + P); the denominator is >= P > 0.
    f1 = 2.0 * tps / (tps + fps + n_pos)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thr[best])


class BinnedROC:
    """Bounded-memory streaming ROC over a fixed score range.

    Scores are clipped into ``[lo, hi]`` and counted in ``bins`` equal-width bins, separately for
    positives and negatives; scores that share a bin are treated as ties. Memory is O(bins) whatever
    the number of samples, and the AUROC error is bounded by the fraction of positive/negative pairs
    falling into the same bin (about 1e-3 or less with 4096 bins for continuous scores).

    Args:
        lo: Lower end of the score range.
        hi: Upper end of the score range (``hi >= lo``).
        bins: Number of bins.

    Raises:
        ValueError: If the range is not finite, ``hi < lo`` or ``bins < 1``.
    """

    def __init__(self, lo: float, hi: float, bins: int = 4096):
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError(f"BinnedROC range must be finite, got [{lo}, {hi}].")
        if hi < lo:
            raise ValueError(f"BinnedROC needs hi >= lo, got [{lo}, {hi}].")
        if bins < 1:
            raise ValueError(f"BinnedROC needs at least one bin, got {bins}.")
        self.lo = float(lo)
        self.hi = float(hi)
        self.bins = int(bins)
        self._scale = self.bins / (self.hi - self.lo) if self.hi > self.lo else 0.0
        self.pos = np.zeros(self.bins, dtype=np.int64)
        self.neg = np.zeros(self.bins, dtype=np.int64)

    def update(self, scores: Any, labels: Any) -> None:
        """Adds a batch of scores and 0/1 labels (any shape, flattened) to the histograms.

        Raises:
            ValueError: If the sizes differ or the scores contain NaN.
        """
        s = np.asarray(scores).ravel()
        y = _as_labels(labels)
        if s.shape != y.shape:
            raise ValueError(f"scores and labels differ in size: {s.size} vs {y.size}.")
        if s.size == 0:
            return
        if np.isnan(s).any():
            raise ValueError("scores contain NaN; every score must be a number.")
        idx = (s.astype(np.float64) - self.lo) * self._scale
        np.clip(idx, 0, self.bins - 1, out=idx)
        idx = idx.astype(np.int64)
        self.pos += np.bincount(idx[y], minlength=self.bins)
        self.neg += np.bincount(idx[~y], minlength=self.bins)

    def curve(self) -> tuple[np.ndarray, np.ndarray]:
        """ROC curve from the highest bin down, starting at (0, 0) and ending at (1, 1).

        Returns:
            ``(fpr, tpr)`` arrays of length ``bins + 1``.

        Raises:
            ValueError: If only one class has been seen so far.
        """
        n_pos, n_neg = int(self.pos.sum()), int(self.neg.sum())
        if n_pos == 0 or n_neg == 0:
            raise ValueError(f"ROC needs both classes, got {n_pos} positive and {n_neg} negative samples.")
        tps = np.cumsum(self.pos[::-1])
        fps = np.cumsum(self.neg[::-1])
        return np.r_[0.0, fps / n_neg], np.r_[0.0, tps / n_pos]

    def max_error(self) -> float:
        """Bound on ``|self.auroc() - exact AUROC|``: half the share of positive/negative pairs that
        share a bin (such a pair counts 1/2 here, and 0, 1/2 or 1 in the exact value), plus the
        floating-point error of the area (:func:`anomap.metrics.curves.area_rounding_bound`).

        Raises:
            ValueError: If only one class has been seen so far.
        """
        n_pos, n_neg = int(self.pos.sum()), int(self.neg.sum())
        if n_pos == 0 or n_neg == 0:
            raise ValueError(f"ROC needs both classes, got {n_pos} positive and {n_neg} negative samples.")
        ties = float(np.dot(self.pos.astype(np.float64), self.neg.astype(np.float64)))
        return 0.5 * ties / (float(n_pos) * float(n_neg)) + area_rounding_bound(self.bins + 1)

    def auroc(self) -> float:
        """Area under :meth:`curve` (trapezoid rule).

        Raises:
            ValueError: If only one class has been seen so far.
        """
        fpr, tpr = self.curve()
        return float(trapezoid(tpr, fpr))


def pixel_auroc(
    maps: Any, masks: Any, exact_limit: int = 20_000_000, chunk: int = 64
) -> tuple[float, dict[str, list[float]]]:
    """Pixel-level AUROC of anomaly maps against ground-truth masks.

    Up to ``exact_limit`` pixels the exact AUROC is computed; above, a :class:`BinnedROC` over the
    global [min, max] of the maps is filled ``chunk`` images at a time, so ``maps`` may be a large
    ``np.memmap`` (only one chunk is ever held in float64).

    Args:
        maps: Float anomaly maps, shape (N, H, W); higher means more anomalous.
        masks: Bool ground-truth masks, shape (N, H, W).
        exact_limit: Largest pixel count for which the exact computation is used.
        chunk: Images per chunk in the binned mode.

    Returns:
        ``(auroc, {"fpr": [...], "tpr": [...]})`` with the curve downsampled to at most about 500 points.

    Raises:
        ValueError: If shapes differ, maps contain non-finite values or only one class is present.
    """
    maps_arr, masks_arr = check_pixel_inputs(maps, masks)
    n = maps_arr.shape[0]
    chunk = max(1, int(chunk))
    if maps_arr.size <= exact_limit:
        scores = np.asarray(maps_arr).ravel()
        if not np.isfinite(scores).all():
            raise ValueError("anomaly maps contain NaN or infinite values.")
        fpr, tpr, _ = roc_curve(scores, masks_arr)
        value = float(trapezoid(tpr, fpr))
    else:
        lo, hi = np.inf, -np.inf
        for start in range(0, n, chunk):
            block = np.asarray(maps_arr[start : start + chunk])
            bmin, bmax = float(block.min()), float(block.max())
            if not (np.isfinite(bmin) and np.isfinite(bmax)):
                raise ValueError("anomaly maps contain NaN or infinite values.")
            lo, hi = min(lo, bmin), max(hi, bmax)
        binned = BinnedROC(lo, hi)
        for start in range(0, n, chunk):
            binned.update(maps_arr[start : start + chunk], masks_arr[start : start + chunk])
        fpr, tpr = binned.curve()
        value = float(trapezoid(tpr, fpr))
    fpr_list, tpr_list = downsample_curve(fpr, tpr, MAX_CURVE_POINTS)
    return value, {"fpr": fpr_list, "tpr": tpr_list}
