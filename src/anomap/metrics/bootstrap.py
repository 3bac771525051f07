"""Per-image summaries of an evaluation, and image AUROC, pixel AUROC and AUPRO on resamples of them.

A method default is chosen on the dev suite by the mean over datasets with a paired bootstrap
interval over test images (docs/protocol.md, "Choosing a method default"). Resampling test images
needs the metrics of many multisets of images, without the maps. :class:`ImageSummaries` keeps, for
each test image, what those three metrics are sums of:

* its score, label and defect type (image AUROC is exact: no binning);
* a histogram of its normal pixels' map values, and for each connected defect region (8-connected,
  as :mod:`anomap.metrics.pro` defines regions) a histogram of the region's map values, all over the
  same bin edges (sparse: only the bins a region touches are stored).

With integer weights per image (a resample: how often each image was drawn), the weighted sums of
these histograms are the histograms of the resampled test set, and :meth:`ImageSummaries.metrics`
computes the binned pixel AUROC and AUPRO of :mod:`anomap.metrics.streaming` from them, for many
resamples at once (matrix products over images, then cumulative sums over bins).

Bin edges (:func:`summary_edges`, ``SUMMARY_BINS`` of them) are quantiles of a sample of the map
values, split between three uses: a quarter over the normal pixels' whole range, a quarter over their
top ``fpr_limit`` (the part AUPRO integrates) and half over the defect pixels. Both binning error
bounds are sums over bins of (share of defect mass) x (share of normal pixels) in the same bin (see
:mod:`anomap.metrics.streaming`), so edges that split both distributions keep them small. The bounds
are computed from the histograms of each resample, never assumed, and include the floating-point term
of :func:`anomap.metrics.curves.area_rounding_bound`; with all weights 1 the binned values equal
:func:`anomap.evaluate`'s within the sum of the two results' bounds.

:class:`SummaryBuilder` collects the summaries while :func:`anomap.evaluate` runs (its ``observe``
hook): maps go to a :class:`~anomap.metrics.streaming.MapSpool` on disk, and are binned once the
sample of values fixes the edges, so memory does not grow with the number of images.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from anomap.errors import DataError
from anomap.metrics.curves import area_rounding_bound
from anomap.metrics.streaming import SAMPLE_CAP, MapSpool, PixelStream, ValueSample
from anomap.types import Sample

__all__ = ["FPR_LIMIT", "METRICS", "RESAMPLES", "SUMMARY_BINS", "ImageSummaries", "SummaryBuilder", "dataset_rng",
           "interval", "stratified_weights", "summary_edges"]

SUMMARY_BINS = 1024
RESAMPLES = 1000
FPR_LIMIT = 0.3  # the evaluation's PRO_LIMIT
METRICS = ("image_auroc", "pixel_auroc", "aupro")
FORMAT = 1
_STRUCTURE = np.ones((3, 3), dtype=bool)  # 8-connected regions, as anomap.metrics.pro.region_weights
_CHUNK = 256  # resamples per block in ImageSummaries.metrics (memory: a few (chunk, bins) arrays)


def summary_edges(normal: np.ndarray, defect: np.ndarray, lo: float, bins: int = SUMMARY_BINS,
                  fpr_limit: float = FPR_LIMIT) -> np.ndarray:
    """Lower bin edges from samples of normal and defect pixel values, starting at ``lo`` (the minimum).

    A quarter of the edges at quantiles of all normal values, a quarter at quantiles of the normal
    values above their ``1 - fpr_limit`` quantile, half at quantiles of the defect values (all to the
    normal values when there are no defect values). Equal edges are merged: at most ``bins`` bins.
    """
    bins = max(2, int(bins))
    normal = np.asarray(normal, np.float64)
    defect = np.asarray(defect, np.float64)
    parts = [np.array([lo], np.float64)]
    k_def = (bins // 2 if normal.size else bins - 1) if defect.size else 0
    k_top = (bins - 1 - k_def) // 2 if normal.size else 0
    k_all = bins - 1 - k_def - k_top if normal.size else 0
    for values, count, start in ((normal, k_all, 0.0), (normal, k_top, 1.0 - fpr_limit), (defect, k_def, 0.0)):
        if count > 0:
            levels = start + (1.0 - start) * np.arange(1, count + 1) / (count + 1)
            parts.append(np.quantile(values, levels))
    edges = np.unique(np.concatenate(parts))
    return edges[edges >= lo]


def _rows_auc(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """AUROC (ties count one half) of each row's classes counted in ascending groups; NaN without both."""
    below = np.cumsum(neg, axis=1) - neg
    total = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, np.sum(pos * (below + 0.5 * neg), axis=1) / total, np.nan)


def _pro_area(neg: np.ndarray, ovl: np.ndarray, nreg: np.ndarray, npos: np.ndarray,
              limit: float) -> tuple[np.ndarray, np.ndarray]:
    """AUPRO (normalised by ``limit``) of each row's binned counts, with the streaming error bound."""
    bins = neg.shape[1]
    n_neg = neg.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        f = np.cumsum(neg[:, ::-1], axis=1) / n_neg
        p = np.cumsum(ovl[:, ::-1], axis=1) / nreg[:, None]
    zero = np.zeros((neg.shape[0], 1))
    f = np.maximum.accumulate(np.clip(np.hstack([zero, f]), 0.0, 1.0), axis=1)
    p = np.maximum.accumulate(np.clip(np.hstack([zero, p]), 0.0, 1.0), axis=1)
    f0, f1, p0, p1 = f[:, :-1], f[:, 1:], p[:, :-1], p[:, 1:]
    fc = np.minimum(f1, limit)  # each segment cut at the limit, as limit_curve does
    with np.errstate(invalid="ignore", divide="ignore"):
        pc = p0 + (p1 - p0) * np.where(f1 > f0, (fc - f0) / (f1 - f0), 0.0)
    area = np.sum(np.where(fc > f0, (fc - f0) * (p0 + pc) / 2.0, 0.0), axis=1)
    # Streaming's bound: half of each segment's box inside the limit, the whole box of the cut one.
    box = np.where(f1 <= limit, 0.5 * (f1 - f0) * (p1 - p0), 0.0)
    box += np.where((f0 < limit) & (f1 > limit), (limit - f0) * (p1 - p0), 0.0)
    # Floating point as streaming's: one weight per defect pixel in the sums, then the bins.
    rounding = np.array([area_rounding_bound(int(k)) for k in npos + bins + 2])
    ok = (nreg > 0) & (n_neg[:, 0] > 0)
    value = np.where(ok, np.clip(area / limit, 0.0, 1.0), np.nan)
    return value, np.where(ok, box.sum(axis=1) / limit + rounding, np.nan)


@dataclass
class ImageSummaries:
    """Per-image summaries of one evaluation (see the module docstring); arrays indexed by test image.

    ``normal_hist`` is (n, bins); region ``r`` belongs to image ``region_image[r]`` and has
    ``region_counts[region_ptr[r]:region_ptr[r + 1]]`` pixels in bins ``region_bins[...]``.
    ``meta`` holds dataset, method, eval_size, fpr_limit and the exact metrics of the evaluation.
    """

    names: np.ndarray
    labels: np.ndarray
    defect_types: np.ndarray
    scores: np.ndarray
    edges: np.ndarray
    normal_hist: np.ndarray
    region_image: np.ndarray
    region_ptr: np.ndarray
    region_bins: np.ndarray
    region_counts: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n, bins = len(self.names), self.edges.size
        sizes = np.add.reduceat(self.region_counts, self.region_ptr[:-1]) if self.region_image.size else np.zeros(0)
        entry_region = np.repeat(np.arange(self.region_image.size), np.diff(self.region_ptr))
        key = self.region_image[entry_region].astype(np.int64) * bins + self.region_bins
        counts = self.region_counts.astype(np.float64)
        pos = np.bincount(key, weights=counts, minlength=n * bins).reshape(n, bins)
        weights = counts / sizes[entry_region] if counts.size else counts
        ovl = np.bincount(key, weights=weights, minlength=n * bins).reshape(n, bins)
        nreg = np.bincount(self.region_image, minlength=n).astype(np.float64)
        # one matrix for one product per block of resamples: defect, normal, overlap histograms, regions
        self._stack = np.hstack([pos, self.normal_hist.astype(np.float64), ovl, nreg[:, None]])
        order = np.argsort(self.scores, kind="stable")
        self._order = order
        self._groups = np.r_[0, np.flatnonzero(np.diff(self.scores[order])) + 1]

    @property
    def n(self) -> int:
        return len(self.names)

    @property
    def fpr_limit(self) -> float:
        return float(self.meta.get("fpr_limit", FPR_LIMIT))

    def metrics(self, weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Image AUROC, binned pixel AUROC and AUPRO, and the two binning bounds, for each row of weights.

        Args:
            weights: (K, n) non-negative image multiplicities (a resample per row); None: all 1.

        Returns:
            ``{"image_auroc", "pixel_auroc", "aupro", "pixel_auroc_max_error", "aupro_max_error"}``,
            each (K,); NaN where a resample lacks a class (or defect regions, or normal pixels).
        """
        w = np.ones((1, self.n)) if weights is None else np.asarray(weights, np.float64)
        if w.ndim != 2 or w.shape[1] != self.n:
            raise ValueError(f"weights must be (K, {self.n}), got {w.shape}.")
        out: dict[str, list[np.ndarray]] = {k: [] for k in (*METRICS, "pixel_auroc_max_error", "aupro_max_error")}
        y = self.labels[self._order].astype(bool)
        for start in range(0, w.shape[0], _CHUNK):
            block = w[start:start + _CHUNK]
            ws = block[:, self._order]
            out["image_auroc"].append(_rows_auc(np.add.reduceat(ws * y, self._groups, axis=1),
                                                np.add.reduceat(ws * ~y, self._groups, axis=1)))
            bins = self.edges.size
            summed = block @ self._stack
            pos, neg, ovl, nreg = summed[:, :bins], summed[:, bins:2 * bins], summed[:, 2 * bins:-1], summed[:, -1]
            out["pixel_auroc"].append(_rows_auc(pos, neg))
            total = pos.sum(axis=1) * neg.sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                ties = np.where(total > 0, 0.5 * np.sum(pos * neg, axis=1) / total, np.nan)
            out["pixel_auroc_max_error"].append(ties + area_rounding_bound(self.edges.size + 1))
            value, bound = _pro_area(neg, ovl, nreg, pos.sum(axis=1), self.fpr_limit)
            out["aupro"].append(value)
            out["aupro_max_error"].append(bound)
        return {k: np.concatenate(v) for k, v in out.items()}

    def point(self, metric: str) -> float | None:
        """The full test set's value: the exact one recorded from the evaluation, else the binned one."""
        exact = self.meta.get("exact", {}).get(metric)
        if exact is not None:
            return float(exact)
        value = float(self.metrics()[metric][0])
        return None if np.isnan(value) else value

    def save(self, path: str | Path) -> Path:
        """Write a compressed ``.npz`` (no pickles)."""
        arrays = {k: getattr(self, k) for k in ("names", "labels", "defect_types", "scores", "edges", "normal_hist",
                                                 "region_image", "region_ptr", "region_bins", "region_counts")}
        meta = {**self.meta, "format": FORMAT}
        np.savez_compressed(path, meta=np.array(json.dumps(meta, default=float)), **arrays)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> ImageSummaries:
        """Read a file written by :meth:`save`.

        Raises:
            DataError: the file is missing or is not a summaries file.
        """
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                arrays = {k: z[k] for k in z.files if k != "meta"}
            return cls(meta=meta, **arrays)
        except FileNotFoundError:
            raise DataError("has no per-image summaries.", path=path,
                            fix="re-run `anomap bench` with this version (it writes summaries.npz)") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"is not a summaries file ({e}).", path=path, fix="re-run `anomap bench`") from None


class _SplitSpool(MapSpool):
    """A :class:`MapSpool` that samples normal and defect pixel values apart (for the edges).

    A few hundred values per bin place 1024 quantile edges well: the samples hold at most 2**18 normal
    and 2**16 defect values (2.5 MB); the spool's own sample of all values is only kept for its exact
    minimum.
    """

    def __init__(self, folder: str | Path, size: int, sample_cap: int = SAMPLE_CAP // 4):
        super().__init__(folder, size, sample_cap=1024)
        self.normal = ValueSample(sample_cap)
        self.defect = ValueSample(sample_cap // 4)

    def add(self, maps: np.ndarray, masks: np.ndarray) -> None:
        super().add(maps, masks)
        masks = np.asarray(masks, bool)
        self.normal.add(np.asarray(maps)[~masks])
        self.defect.add(np.asarray(maps)[masks])


def _image_hists(idx: np.ndarray, mask: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's normal histogram and its regions' sparse histograms (rows of region, bin, count)."""
    normal = np.bincount(idx[~mask], minlength=bins)
    lab, count = ndimage.label(mask, structure=_STRUCTURE)
    if not count:
        return normal, np.zeros(0, np.int64), np.zeros((0, 2), np.int64)
    dense = np.bincount((lab[mask] - 1) * bins + idx[mask], minlength=count * bins).reshape(count, bins)
    rows, cols = np.nonzero(dense)
    return normal, np.bincount(rows, minlength=count), np.stack([cols, dense[rows, cols]], axis=1)


class SummaryBuilder:
    """Collects :class:`ImageSummaries` batch by batch (pass :meth:`add` as ``evaluate``'s ``observe``).

    Args:
        folder: where the temporary spool goes (5 bytes per pixel, deleted by :meth:`finish`).
        size: the evaluation size (maps and masks are (B, size, size)).
        bins: at most this many bins.
    """

    def __init__(self, folder: str | Path, size: int, bins: int = SUMMARY_BINS, fpr_limit: float = FPR_LIMIT):
        self.spool = _SplitSpool(folder, size)
        self.bins = int(bins)
        self.fpr_limit = float(fpr_limit)
        self.samples: list[Sample] = []
        self.scores: list[float] = []

    def add(self, samples: Sequence[Sample], scores: np.ndarray, maps: np.ndarray, masks: np.ndarray) -> None:
        """One batch: its samples, raw scores (B,), maps and bool masks (B, size, size) at the evaluation size."""
        self.samples.extend(samples)
        self.scores.extend(float(s) for s in np.asarray(scores).ravel())
        self.spool.add(maps, masks)

    def finish(self, meta: dict[str, Any] | None = None) -> ImageSummaries:
        """Bin the spooled maps at the edges the samples give, remove the spool, return the summaries."""
        sp = self.spool
        try:
            lo = sp.sample.lo if sp.n else 0.0
            stream = PixelStream(summary_edges(sp.normal.values, sp.defect.values, lo, self.bins, self.fpr_limit))
            bins = stream.bins
            normal = np.zeros((sp.n, bins), np.int64)
            region_image, region_len, entries = [], [], []
            i = 0
            for maps, masks in sp.chunks():
                for values, mask in zip(maps, masks, strict=True):
                    normal[i], lengths, ent = _image_hists(stream.bin_index(values), mask, bins)
                    region_image.append(np.full(lengths.size, i, np.int64))
                    region_len.append(lengths)
                    entries.append(ent)
                    i += 1
        finally:
            sp.remove()
        ent_all = np.concatenate(entries) if entries else np.zeros((0, 2), np.int64)
        lengths_all = np.concatenate(region_len) if region_len else np.zeros(0, np.int64)
        return ImageSummaries(
            names=np.array([f"{s.path.parent.name}/{s.path.name}" for s in self.samples], dtype=str),
            labels=np.array([s.label for s in self.samples], np.int8),
            defect_types=np.array([s.defect_type for s in self.samples], dtype=str),
            scores=np.array(self.scores, np.float64), edges=stream.edges, normal_hist=normal.astype(np.int32),
            region_image=(np.concatenate(region_image) if region_image else np.zeros(0, np.int64)).astype(np.int32),
            region_ptr=np.r_[0, np.cumsum(lengths_all)].astype(np.int64),
            region_bins=ent_all[:, 0].astype(np.uint16 if bins <= 1 << 16 else np.int32),
            region_counts=ent_all[:, 1].astype(np.int32),
            meta={"fpr_limit": self.fpr_limit, "eval_size": sp.size, **(meta or {})},
        )


def dataset_rng(name: str, seed: int = 0) -> np.random.Generator:
    """The resampling generator of one dataset: the same draws for the same name and seed, whatever the
    order or number of datasets (so two benches of the same dataset are resampled alike)."""
    return np.random.default_rng([int(seed), zlib.crc32(name.encode())])


def stratified_weights(labels: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(resamples, n) draw counts: each row draws the good and the defective images, each with replacement,
    as many times as there are of each (so every resample keeps the test set's class sizes)."""
    labels = np.asarray(labels)
    out = np.zeros((int(resamples), labels.size), np.int32)
    for cls in (0, 1):
        idx = np.flatnonzero(labels == cls)
        m = idx.size
        if m == 0:
            continue
        draws = rng.integers(0, m, size=(int(resamples), m)) + m * np.arange(int(resamples))[:, None]
        out[:, idx] = np.bincount(draws.ravel(), minlength=int(resamples) * m).reshape(int(resamples), m)
    return out


def interval(values: np.ndarray, level: float = 0.95) -> tuple[float | None, float | None]:
    """Percentile interval of the finite values (None, None when there are none)."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return None, None
    lo, hi = np.quantile(v, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(lo), float(hi)
