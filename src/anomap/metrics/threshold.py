"""Image-score thresholds calibrated on held-out normal images, what they promise, and the operating point.

Convention: an image is predicted anomalous when ``score > threshold`` (strictly greater).

The threshold is the k-th smallest of n held-out normal scores with the conformal
``k = ceil((n + 1)(1 - target_fpr))``: a new normal image, exchangeable with the held-out ones, then
scores above it with probability ``(n + 1 - k) / (n + 1) <= target_fpr`` (marginal over the held-out
draw). With ``n < 1 / target_fpr - 1`` no order statistic promises the target; the threshold is then the
maximum, which promises ``1 / (n + 1)``, and a :class:`CalibrationWarning` says how many held-out
normals the target needs. docs/protocol.md explains it for a quality engineer.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from anomap.types import fpr_upper_bound, promised_fpr_of

__all__ = ["CalibrationWarning", "ThresholdPromise", "calibrated_threshold", "conformal_k", "fpr_upper_bound",
           "heldout_needed", "operating_point", "promised_fpr_of", "threshold_at_fpr"]

_TOL = 1e-9  # relative: target_fpr = 0.05 means 1/20 although 0.05 * 20 is not exactly 1 in floating point


class CalibrationWarning(UserWarning):
    """Too few held-out normal images for the target false-alarm rate (the CLI prints it on one line)."""


@dataclass(frozen=True)
class ThresholdPromise:
    """A calibrated threshold and what it promises (see the module docstring)."""

    threshold: float
    order_k: int  # the threshold is the order_k-th smallest of the n held-out scores (1-based)
    n: int
    target_fpr: float
    promised_fpr: float  # (n + 1 - order_k) / (n + 1)
    fpr_upper95: float  # 95 % quantile of Beta(n + 1 - order_k, order_k)

    @property
    def meets_target(self) -> bool:
        return self.promised_fpr <= self.target_fpr * (1 + _TOL)


def _check_target(target_fpr: float) -> float:
    if not 0.0 <= target_fpr <= 1.0:
        raise ValueError(f"target_fpr must lie in [0, 1], got {target_fpr}.")
    return float(target_fpr)


def conformal_k(n: int, target_fpr: float) -> int:
    """The smallest order statistic k whose promise ``(n + 1 - k) / (n + 1)`` is ``<= target_fpr``:
    ``ceil((n + 1)(1 - target_fpr))``, clipped to [1, n] (n, the maximum, when none is small enough).

    >>> conformal_k(19, 0.05), conformal_k(10, 0.05), conformal_k(100, 0.05), conformal_k(30, 0.05)
    (19, 10, 96, 30)
    """
    if n < 1:
        raise ValueError(f"conformal_k needs at least one held-out score, got n={n}.")
    alpha = _check_target(target_fpr)
    slots = math.floor(alpha * (n + 1) * (1 + _TOL))  # n + 1 - k: held-out scores allowed above
    return n + 1 - min(max(slots, 1), n)


def heldout_needed(target_fpr: float, factor: float = 2.0, level: float = 0.95) -> tuple[int, int]:
    """How many held-out normal images a target false-alarm rate needs.

    Returns:
        ``(n_promise, n_bound)``: the fewest held-out normals for which the conformal promise meets
        ``target_fpr`` (``ceil(1 / target_fpr) - 1``), and the fewest from which on (for every larger
        count too) the ``level`` upper bound ``fpr_upper_bound`` is at most ``factor * target_fpr``. The
        bound is a saw-tooth in n (it jumps up whenever k steps back by one), so the second is found from
        the teeth's peaks, not from the first n that happens to meet it.

    >>> heldout_needed(0.05)
    (19, 61)
    """
    alpha = _check_target(target_fpr)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"heldout_needed needs 0 < target_fpr < 1, got {target_fpr}.")
    n_promise = max(1, math.ceil(1.0 / alpha * (1 - _TOL)) - 1)
    goal = factor * alpha
    # Tooth m: the n with m held-out scores allowed above the threshold; it starts at peak(m), where the
    # bound is highest, and falls until the next tooth. The peaks fall with m toward alpha.
    def peak(m: int) -> int:
        return max(n_promise, math.ceil(m / alpha * (1 - _TOL)) - 1)

    def bound(n: int) -> float:
        return fpr_upper_bound(n, conformal_k(n, alpha), level)

    m = 1
    while bound(peak(m)) > goal:
        m += 1
        if m > 100_000:
            raise ValueError(f"no held-out count gives a {level:.0%} bound of {goal:g} for target_fpr={target_fpr}.")
    lo, hi = peak(m - 1) if m > 1 else n_promise, peak(m)  # the tooth before: its first n that meets the goal
    if hi == lo or bound(hi - 1) > goal:
        return n_promise, hi
    while hi - lo > 1:  # bound(lo) > goal >= bound(hi) inside one tooth, where the bound falls with n
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if bound(mid) > goal else (lo, mid)
    return n_promise, hi


def calibrated_threshold(normal_scores: Any, target_fpr: float, warn: bool = True,
                         n_group: int = 0) -> ThresholdPromise:
    """The conformal threshold of held-out normal scores for ``target_fpr``, and what it promises.

    Args:
        normal_scores: image scores of held-out normal images (any shape, flattened).
        target_fpr: allowed false-alarm rate, in [0, 1].
        warn: issue a :class:`CalibrationWarning` when there are too few scores for the target.
        n_group: how many of the scores are group scores (``calibration_groups``), for the warning.

    Raises:
        ValueError: no scores, a score that is not finite, or ``target_fpr`` outside [0, 1].

    >>> p = calibrated_threshold([i / 100 for i in range(100)], 0.05)
    >>> p.threshold, p.order_k, round(p.promised_fpr, 4), round(p.fpr_upper95, 4)
    (0.95, 96, 0.0495, 0.0892)
    """
    scores = np.asarray(normal_scores, dtype=np.float64).ravel()
    if scores.size == 0:
        raise ValueError("a threshold needs at least one held-out normal score, got none.")
    if not np.isfinite(scores).all():
        raise ValueError("held-out normal scores include NaN or infinity; every score must be finite.")
    alpha = _check_target(target_fpr)
    n = int(scores.size)
    k = conformal_k(n, alpha)
    promise = ThresholdPromise(threshold=float(np.partition(scores, k - 1)[k - 1]), order_k=k, n=n,
                               target_fpr=alpha, promised_fpr=promised_fpr_of(n, k), fpr_upper95=fpr_upper_bound(n, k))
    if warn and not promise.meets_target and 0.0 < alpha < 1.0:
        warnings.warn(_too_few_message(promise, n_group), CalibrationWarning, stacklevel=2)
    return promise


def _too_few_message(p: ThresholdPromise, n_group: int = 0) -> str:
    """The one-line warning for a threshold that cannot promise its target (``n_group`` of its ``p.n`` scores
    are group scores: then every training image gives one, and more of them is the fix)."""
    n_promise, n_bound = heldout_needed(p.target_fpr)
    held_only = not n_group
    what = "held-out normal images" if held_only else f"normal scores ({p.n - n_group} held out, {n_group} by group)"
    return (f"only {p.n} {what} for target_fpr={p.target_fpr:g}: the threshold is their "
            f"maximum and promises a false-alarm rate of at most {p.promised_fpr:.3g} (1/{p.n + 1}), not "
            f"{p.target_fpr:g}; the 95% bound on this line's rate is {p.fpr_upper95:.3g}. "
            f"{'Hold out' if held_only else 'Train on'} at least {n_promise} normal images for the promise and "
            f"{n_bound} for a 95% bound of at most {2 * p.target_fpr:g} (more normal images"
            f"{f', or --set min_heldout={n_promise}' if held_only else ''}).")


def threshold_at_fpr(normal_scores: Any, target_fpr: float) -> float:
    """The conformal threshold of :func:`calibrated_threshold` alone, without a warning.

    It is always one of the scores (with few scores, the maximum), and the fraction of
    ``normal_scores`` strictly above it is ``<= target_fpr``.

    Examples:
        With 20 held-out images and a 5 % target the threshold is the largest score, so no held-out
        image is flagged; with 100 distinct scores, 4 of them lie above the threshold.

        >>> threshold_at_fpr([0.2, 0.9, 0.4], 0.05)
        0.9
        >>> scores = [i / 100 for i in range(100)]
        >>> t = threshold_at_fpr(scores, 0.05)
        >>> t, sum(s > t for s in scores)
        (0.95, 4)
    """
    return calibrated_threshold(normal_scores, target_fpr, warn=False).threshold


def operating_point(scores: Any, labels: Any, threshold: float) -> dict[str, float | None]:
    """Rates obtained by predicting ``score > threshold`` as anomalous.

    Args:
        scores: Image scores (any shape, flattened).
        labels: 0/1 or bool labels of the same size (1 = defective).
        threshold: Decision threshold.

    Returns:
        A dict with ``"fpr"`` (good images above the threshold / good images; None without good images),
        ``"recall"`` (defective images above / defective images; None without defective images),
        ``"precision"`` (defective above / all above; None when nothing is predicted anomalous) and
        ``"f1"`` (harmonic mean of precision and recall; 0.0 when nothing is predicted anomalous but
        defects exist, None when there is no defective image).

    Raises:
        ValueError: If sizes differ, labels are not 0/1, or a score is NaN.

    Examples:
        >>> op = operating_point([0.1, 0.5, 0.6, 0.8], [0, 0, 1, 1], threshold=0.55)
        >>> op["fpr"], op["recall"], op["precision"], op["f1"]
        (0.0, 1.0, 1.0, 1.0)
        >>> operating_point([0.1, 0.2], [0, 1], threshold=0.5)["precision"] is None
        True
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y_raw = np.asarray(labels).ravel()
    if s.shape != y_raw.shape:
        raise ValueError(f"scores and labels differ in size: {s.size} vs {y_raw.size}.")
    if y_raw.dtype != np.bool_ and y_raw.size and np.any((y_raw != 0) & (y_raw != 1)):
        raise ValueError("labels must be 0/1 or bool; found other values.")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN; every score must be a number.")
    y = y_raw.astype(bool)
    pred = s > threshold
    n_good = int((~y).sum())
    n_bad = int(y.sum())
    tp = int((pred & y).sum())
    fp = int((pred & ~y).sum())
    n_pred = tp + fp

    fpr = fp / n_good if n_good else None
    recall = tp / n_bad if n_bad else None
    precision = tp / n_pred if n_pred else None
    f1: float | None
    if recall is None:
        f1 = None
    elif precision is None or precision + recall == 0.0:
        f1 = 0.0
    else:
        f1 = 2.0 * precision * recall / (precision + recall)
    return {"fpr": fpr, "recall": recall, "precision": precision, "f1": f1}
