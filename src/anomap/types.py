"""Small shared types: results, splits and dataset samples, the tensor-like images methods calibrate on,
and the protocols at the main seams."""

from __future__ import annotations

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


@dataclass
class Calibration:
    """Operating point and statistics derived from held-out normal images only."""

    threshold: float | None = None  # image-score threshold at ``target_fpr`` on held-out normals
    target_fpr: float = 0.05
    map_scale: float | None = None  # held-out normal 99.9th pixel percentile: heat-map colour top
    map_low: float | None = None  # held-out normal median pixel value: heat-map colour bottom
    n_heldout: int = 0
    heldout_scores: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "target_fpr": self.target_fpr,
            "map_scale": self.map_scale,
            "map_low": self.map_low,
            "n_heldout": self.n_heldout,
            "heldout_scores": list(self.heldout_scores),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        return cls(
            threshold=d.get("threshold"),
            target_fpr=float(d.get("target_fpr", 0.05)),
            map_scale=d.get("map_scale"),
            map_low=d.get("map_low"),
            n_heldout=int(d.get("n_heldout", 0)),
            heldout_scores=list(d.get("heldout_scores", [])),
        )


@dataclass
class EvalResult:
    """What ``anomap.evaluate`` returns.

    Attributes:
        metrics: image_auroc, pixel_auroc, aupro, image_f1max, image_aupr, and at the calibrated
            threshold test_fpr / test_recall (None when uncalibrated). Floats in [0, 1].
        rows: one dict per test image: path, defect_type, label (0/1), score, is_anomalous.
        curves: "image_roc" {"fpr", "tpr"}, "pixel_roc" {"fpr", "tpr"}, "pro" {"fpr", "pro"}: lists of floats.
        per_defect: image AUROC of each defect type against the good test images.
        info: method, image_size, eval_size, dataset, counts, threshold, timings.
    """

    metrics: dict[str, float | None]
    rows: list[dict[str, Any]]
    curves: dict[str, dict[str, list[float]]]
    per_defect: dict[str, float]
    info: dict[str, Any]


# --- The evaluation seam: what anomap.evaluate uses of a detector ------------------------------------
# (anomap.metrics types against this and never imports anomap.detector; anomap.Detector satisfies it)


class EvalSizes(Protocol):
    """The two sizes :func:`anomap.evaluate` reads of a detector's config."""

    @property
    def image_size(self) -> int:
        """Working resolution (square) the model sees."""
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
        """Threshold, target FPR and held-out count (recorded; the threshold gives the verdicts)."""
        ...

    def prepare(self, image: Path) -> tuple[np.ndarray, tuple[int, int]]:
        """One image file -> uint8 (S, S, C) at the working size, and its original (H, W)."""
        ...

    def predict_raw(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw scores (N,) and anomaly maps (N, S, S) for uint8 images (N, S, S, C) at the working size."""
        ...


# --- end of the evaluation seam ------------------------------------------------------------------------
