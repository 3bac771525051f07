"""Image-score thresholds calibrated on held-out normal images, and the operating point they give.

Convention: an image is predicted anomalous when ``score > threshold`` (strictly greater).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["operating_point", "threshold_at_fpr"]


def threshold_at_fpr(normal_scores: Any, target_fpr: float) -> float:
    """Threshold whose false-positive rate on the given normal scores is at most ``target_fpr``.

    The threshold is the empirical ``1 - target_fpr`` quantile of the scores with numpy's ``"higher"``
    method, so it is always one of the scores and, with few images, the maximum. Since only scores
    strictly above the threshold count as anomalous, the fraction of ``normal_scores`` above it is
    ``<= target_fpr``.

    Args:
        normal_scores: Image scores of held-out normal images (any shape, flattened).
        target_fpr: Allowed false-positive rate, in [0, 1].

    Returns:
        The threshold.

    Raises:
        ValueError: If there are no scores, a score is not finite, or ``target_fpr`` is outside [0, 1].

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
    scores = np.asarray(normal_scores, dtype=np.float64).ravel()
    if scores.size == 0:
        raise ValueError("threshold_at_fpr needs at least one held-out normal score, got none.")
    if not np.isfinite(scores).all():
        raise ValueError("threshold_at_fpr got NaN or infinite normal scores; every score must be finite.")
    if not 0.0 <= target_fpr <= 1.0:
        raise ValueError(f"target_fpr must lie in [0, 1], got {target_fpr}.")
    return float(np.quantile(scores, 1.0 - float(target_fpr), method="higher"))


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
