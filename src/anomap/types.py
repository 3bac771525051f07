"""Small shared types: results, splits and dataset samples, the tensor-like images methods calibrate on,
and the protocols at the main seams."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor


class TensorLike(Protocol):
    """Float images (N, C, H, W) in [0, 1] that are read slice by slice, like a tensor.

    ``len(x)`` is N, ``x.shape`` is (N, C, H, W) and ``x[i:j]`` is a float tensor of those images. A
    ``Tensor`` is one; so is :class:`anomap.data.tensors.TensorBatches`, which converts uint8 images
    batch by batch instead of holding all of them as floats.
    """

    def __len__(self) -> int: ...

    @property
    def shape(self) -> tuple[int, ...]: ...

    def __getitem__(self, key: slice) -> Tensor: ...


@dataclass
class AnomalyResult:
    """What a detector says about one image or a batch.

    For a single image: ``score`` is a float, ``anomaly_map`` is (H, W) at the input resolution and
    ``is_anomalous`` a bool. For a batch: arrays of shape (B,), (B, H, W) and (B,).
    Scores and maps are the method's raw values (higher = more anomalous); ``is_anomalous`` compares the
    raw score with the threshold calibrated on held-out normal images (all False when uncalibrated).
    """

    score: np.ndarray | float
    anomaly_map: np.ndarray
    is_anomalous: np.ndarray | bool
    threshold: float | None = None


@dataclass
class Sample:
    """One image of a dataset: where it is, its label and (for defects) its mask path."""

    path: Path
    label: int  # 0 good, 1 defective
    defect_type: str  # "good" for normal images
    mask_path: Path | None = None


@dataclass
class Split:
    """Seeded split of ``train/good`` into images to fit on and held-out normal images."""

    fit: list[Path]
    heldout: list[Path]
    seed: int = 0


def promised_fpr_of(n: int, k: int) -> float:
    """The conformal promise of the ``k``-th smallest of ``n`` held-out normal scores as threshold.

    A new normal image, exchangeable with the held-out ones, scores above it with probability at most
    ``(n + 1 - k) / (n + 1)`` (exactly that for continuous scores), over the draw of the held-out set.
    """
    return (n + 1 - k) / (n + 1)


def fpr_upper_bound(n: int, k: int, level: float = 0.95) -> float:
    """Upper ``level`` bound on the false-alarm rate of the line that uses the ``k``-th smallest of ``n``
    held-out normal scores as threshold: the ``level`` quantile of Beta(n + 1 - k, k), the distribution
    of ``P(score > threshold)`` over held-out draws for continuous scores (one-sided Clopper-Pearson for
    ``n - k`` of ``n`` held-out scores above the threshold)."""
    from scipy.stats import beta  # only here: importing scipy.stats takes a while

    return float(beta.ppf(level, n + 1 - k, k))


def _order_k_of(threshold: float | None, n: int, scores: list[float], target_fpr: float) -> int | None:
    """Which order statistic a stored threshold is (for calibrations saved before ``order_k`` was)."""
    if threshold is None or n < 1:
        return None
    if len(scores) == n:  # ties count as at or below: the highest index among equal scores
        k = sum(1 for s in scores if s <= threshold)
        return k if k >= 1 else None
    return min(n, math.ceil((1.0 - target_fpr) * (n - 1)) + 1)  # the rule before: numpy's "higher" quantile


@dataclass
class Calibration:
    """Operating point and statistics derived from normal images only.

    ``threshold`` is the ``order_k``-th smallest of the ``n_heldout`` held-out scores (and the
    ``group_scores``, when there are some: ``n_scores`` in all); ``promised_fpr``
    is its conformal promise (:func:`promised_fpr_of`) and ``fpr_upper95`` the 95 % upper bound on the
    false-alarm rate of a line that uses it (:func:`fpr_upper_bound`). The three are None without a
    threshold; dicts saved before they existed get them computed on load.
    """

    threshold: float | None = None  # image-score threshold at ``target_fpr`` on held-out normals
    target_fpr: float = 0.05
    map_scale: float | None = None  # held-out normal 99.9th pixel percentile: heat-map colour top
    map_low: float | None = None  # held-out normal median pixel value: heat-map colour bottom
    n_heldout: int = 0
    heldout_scores: list[float] = field(default_factory=list)
    order_k: int | None = None  # the threshold is the order_k-th smallest held-out score (1-based)
    promised_fpr: float | None = None  # P(new normal > threshold) <= this, over held-out draws
    fpr_upper95: float | None = None  # with 95 % confidence, this line's false-alarm rate is at most this
    # calibration_groups > 0: the fit images' scores from the model fitted without their group; the
    # threshold is then the order_k-th smallest of these and the held-out scores together
    group_scores: list[float] = field(default_factory=list)

    @property
    def n_scores(self) -> int:
        """How many normal scores the threshold is an order statistic of (held-out and group scores)."""
        return self.n_heldout + len(self.group_scores)

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "target_fpr": self.target_fpr,
            "map_scale": self.map_scale,
            "map_low": self.map_low,
            "n_heldout": self.n_heldout,
            "heldout_scores": list(self.heldout_scores),
            "order_k": self.order_k,
            "promised_fpr": self.promised_fpr,
            "fpr_upper95": self.fpr_upper95,
            "group_scores": list(self.group_scores),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        cal = cls(
            threshold=d.get("threshold"),
            target_fpr=float(d.get("target_fpr", 0.05)),
            map_scale=d.get("map_scale"),
            map_low=d.get("map_low"),
            n_heldout=int(d.get("n_heldout", 0)),
            heldout_scores=list(d.get("heldout_scores", [])),
            group_scores=list(d.get("group_scores", [])),
        )
        if "order_k" in d:  # written with the promise: read as stored
            cal.order_k = None if d["order_k"] is None else int(d["order_k"])
            cal.promised_fpr, cal.fpr_upper95 = d.get("promised_fpr"), d.get("fpr_upper95")
            return cal
        k = _order_k_of(cal.threshold, cal.n_heldout, cal.heldout_scores, cal.target_fpr)
        if k is not None:  # saved before the promise was stored: what its threshold promises
            n = cal.n_heldout
            cal.order_k, cal.promised_fpr, cal.fpr_upper95 = k, promised_fpr_of(n, k), fpr_upper_bound(n, k)
        return cal


@dataclass
class EvalResult:
    """What ``anomap.evaluate`` returns.

    Attributes:
        metrics: image_auroc, pixel_auroc, aupro, image_f1max, image_aupr, and at the calibrated
            threshold test_fpr / test_recall (None when uncalibrated). Floats in [0, 1].
        rows: one dict per test image: path, defect_type, label (0/1), score, is_anomalous.
        curves: "image_roc" {"fpr", "tpr"}, "pixel_roc" {"fpr", "tpr"}, "pro" {"fpr", "pro"}: lists of floats.
        per_defect: image AUROC of each defect type against the good test images.
        info: method, image_size, eval_size, dataset, counts, threshold, timings; target_fpr, n_heldout,
            promised_fpr and fpr_upper95: what the threshold promises, beside test_fpr (docs/protocol.md).
    """

    metrics: dict[str, float | None]
    rows: list[dict[str, Any]]
    curves: dict[str, dict[str, list[float]]]
    per_defect: dict[str, float]
    info: dict[str, Any]


# --- The evaluation seam: what anomap.evaluate uses of a detector ------------------------------------
# (anomap.metrics types against this and never imports anomap.detector; anomap.Detector satisfies it)


class EvalSizes(Protocol):
    """The sizes :func:`anomap.evaluate` reads of a detector's config."""

    @property
    def image_size(self) -> int:
        """Working resolution (the square's side) the model was configured with."""
        ...

    @property
    def work_hw(self) -> tuple[int, int]:
        """(height, width) the model sees (image_size square unless ``aspect=fit`` chose another)."""
        ...

    @property
    def eval_size(self) -> int:
        """Default resolution of the pixel metrics."""
        ...


class EvaluableDetector(Protocol):
    """A trained detector as :func:`anomap.evaluate` uses it, and nothing more."""

    @property
    def method_name(self) -> str:
        """Registered name of the method (recorded in ``EvalResult.info``)."""
        ...

    @property
    def config(self) -> EvalSizes:
        """The configuration; only its sizes are read."""
        ...

    @property
    def calibration(self) -> Calibration:
        """Threshold, target FPR, held-out count and promise (recorded; the threshold gives the verdicts)."""
        ...

    def prepare(self, image: Path) -> tuple[np.ndarray, tuple[int, int]]:
        """One image file -> uint8 (S, S, C) at the working size, and its original (H, W)."""
        ...

    def predict_raw(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw scores (N,) and anomaly maps (N, S, S) for uint8 images (N, S, S, C) at the working size."""
        ...


# --- end of the evaluation seam ------------------------------------------------------------------------
