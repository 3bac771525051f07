"""Tests of anomap.metrics: ROC/PR against scikit-learn, binned ROC, pixel AUROC, AUPRO, curves, thresholds,
and what evaluate needs of a detector."""

from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
import pytest
from scipy import ndimage
from sklearn import metrics as skm

from anomap.metrics.curves import area_rounding_bound, downsample_curve, round_up, trapezoid
from anomap.metrics.evaluate import evaluate
from anomap.metrics.pro import aupro, pro_curve
from anomap.metrics.roc import (
    BinnedROC,
    aupr,
    auroc,
    f1max,
    pixel_auroc,
    precision_recall_curve,
    roc_curve,
)
from anomap.metrics.threshold import operating_point, threshold_at_fpr
from anomap.types import Calibration, EvaluableDetector
from conftest import StandInDetector


def _random_case(rng: np.random.Generator, kind: str, n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.random(n) < 0.3
    labels[:2] = [True, False]  # both classes always present
    if kind == "continuous":
        scores = rng.normal(size=n) + 0.8 * labels
    elif kind == "ties":
        scores = np.round(rng.normal(size=n) + labels, 1)
    else:  # small integers: many ties
        scores = rng.integers(0, 5, size=n) + labels * rng.integers(0, 2, size=n)
    return scores, labels


CASES = [(seed, kind) for seed in range(4) for kind in ("continuous", "ties", "integers")]


@pytest.mark.parametrize(("seed", "kind"), CASES)
def test_roc_and_pr_match_sklearn(seed: int, kind: str) -> None:
    scores, labels = _random_case(np.random.default_rng(seed), kind)
    fpr, tpr, thr = roc_curve(scores, labels)
    sk_fpr, sk_tpr, sk_thr = skm.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_allclose(thr[1:], sk_thr[1:])
    assert fpr[0] == 0.0 and tpr[0] == 0.0 and np.isinf(thr[0])
    assert thr.size == np.unique(scores).size + 1
    assert auroc(scores, labels) == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12)

    prec, rec, pthr = precision_recall_curve(scores, labels)
    sk_prec, sk_rec, sk_pthr = skm.precision_recall_curve(labels, scores)
    np.testing.assert_allclose(prec, sk_prec)
    np.testing.assert_allclose(rec, sk_rec)
    np.testing.assert_allclose(pthr, sk_pthr)
    assert aupr(scores, labels) == pytest.approx(skm.average_precision_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize(("seed", "kind"), CASES)
def test_f1max_is_best_threshold(seed: int, kind: str) -> None:
    scores, labels = _random_case(np.random.default_rng(seed), kind)
    best, thr = f1max(scores, labels)
    brute = max(skm.f1_score(labels, scores >= t) for t in np.unique(scores))
    assert best == pytest.approx(brute, abs=1e-12)
    assert skm.f1_score(labels, scores >= thr) == pytest.approx(best, abs=1e-12)


def test_roc_inputs_any_shape_and_errors() -> None:
    rng = np.random.default_rng(5)
    scores = rng.random((4, 5, 6)).astype(np.float32)
    labels = (rng.random((4, 5, 6)) < 0.2).astype(np.uint8)
    expected = skm.roc_auc_score(labels.ravel(), scores.ravel())
    assert auroc(scores, labels) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="both classes"):
        auroc([0.1, 0.2, 0.3], [0, 0, 0])
    with pytest.raises(ValueError, match="both classes"):
        auroc([0.1, 0.2], [True, True])
    with pytest.raises(ValueError, match="positive"):
        aupr([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match="0/1"):
        auroc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="NaN"):
        auroc([0.1, np.nan], [0, 1])
    assert auroc([0.1, 0.9], [0, 1]) == 1.0
    assert auroc([0.9, 0.1], [0, 1]) == 0.0
    assert auroc([0.5, 0.5], [0, 1]) == 0.5


def test_binned_roc_close_to_exact() -> None:
    rng = np.random.default_rng(0)
    labels = rng.random(200_000) < 0.1
    scores = rng.normal(size=labels.size) + 1.2 * labels
    exact = auroc(scores, labels)
    one = BinnedROC(float(scores.min()), float(scores.max()))
    one.update(scores, labels)
    assert abs(one.auroc() - exact) < 1e-3
    # Streaming in batches gives the same histograms as a single update.
    streamed = BinnedROC(float(scores.min()), float(scores.max()))
    for part in np.array_split(np.arange(labels.size), 7):
        streamed.update(scores[part], labels[part])
    assert streamed.auroc() == one.auroc()
    fpr, tpr = streamed.curve()
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)


def test_binned_roc_clips_and_validates() -> None:
    roc = BinnedROC(0.0, 1.0, bins=10)
    roc.update(np.array([-5.0, 0.05, 0.95, 7.0]), np.array([0, 0, 1, 1]))
    assert roc.neg[0] == 2 and roc.pos[-1] == 2
    assert roc.auroc() == 1.0
    with pytest.raises(ValueError, match="both classes"):
        BinnedROC(0.0, 1.0).auroc()
    with pytest.raises(ValueError):
        BinnedROC(1.0, 0.0)
    flat = BinnedROC(2.0, 2.0)
    flat.update(np.full(4, 2.0), np.array([0, 1, 0, 1]))
    assert flat.auroc() == pytest.approx(0.5)


def _pixel_case(seed: int, n: int = 6, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n - 2):  # the last two images are defect-free
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, size - 6, size=2)
            h, w = rng.integers(1, 7, size=2)
            masks[i, y : y + h, x : x + w] = True
    maps = (rng.normal(size=masks.shape) + 1.5 * masks).astype(np.float32)
    maps = ndimage.gaussian_filter(maps, sigma=(0, 1, 1))
    return maps, masks


def test_pixel_auroc_exact_and_binned(tmp_path) -> None:
    maps, masks = _pixel_case(1)
    expected = skm.roc_auc_score(masks.ravel(), maps.ravel())
    value, curve = pixel_auroc(maps, masks)
    assert value == pytest.approx(expected, abs=1e-9)
    assert 2 <= len(curve["fpr"]) <= 510 and len(curve["fpr"]) == len(curve["tpr"])
    assert curve["fpr"][0] == 0.0 and curve["tpr"][-1] == 1.0
    assert all(isinstance(v, float) for v in curve["fpr"][:5])

    mm = np.lib.format.open_memmap(tmp_path / "maps.npy", mode="w+", dtype=np.float32, shape=maps.shape)
    mm[:] = maps
    mm.flush()
    binned, bcurve = pixel_auroc(
        np.load(tmp_path / "maps.npy", mmap_mode="r"), masks, exact_limit=100, chunk=2
    )
    assert abs(binned - expected) < 1e-3
    assert len(bcurve["fpr"]) <= 510
    assert np.all(np.diff(bcurve["fpr"]) >= 0) and np.all(np.diff(bcurve["tpr"]) >= 0)

    bad = maps.copy()
    bad[3, 4, 5] = np.nan
    for limit in (100, 10**9):
        with pytest.raises(ValueError, match="NaN"):
            pixel_auroc(bad, masks, exact_limit=limit)
    with pytest.raises(ValueError, match="shape"):
        pixel_auroc(maps, masks[:, :-1])


def test_downsample_curve_keeps_the_ends_and_spreads_points_along_the_curve() -> None:
    # A curve that climbs straight up in 9,000 points, then runs right in 1,000: taking every k-th
    # point would put nine in ten on the climb; equal steps along the drawn curve put about half.
    x = np.r_[np.zeros(9000), np.linspace(0.0, 1.0, 1000)]
    y = np.r_[np.linspace(0.0, 1.0, 9000), np.ones(1000)]
    fx, fy = downsample_curve(x, y, 100)
    assert len(fx) == len(fy) <= 101 and all(isinstance(v, float) for v in fx)
    assert (fx[0], fy[0], fx[-1], fy[-1]) == (0.0, 0.0, 1.0, 1.0)
    climb = sum(1 for v in fx if v == 0.0)
    assert 40 <= climb <= 60, climb
    # Axes are scaled by their span (a PRO curve ends at fpr 0.3): still about half on the climb.
    gx, gy = downsample_curve(0.3 * x, y, 100)
    assert len(gx) <= 101 and gx[-1] == 0.3 * x[-1] and 40 <= sum(1 for v in gx if v == 0.0) <= 60
    # Short curves come back whole.
    assert downsample_curve(x[:50], y[:50], 100) == (x[:50].tolist(), y[:50].tolist())


def test_area_rounding_bound_covers_the_floating_point_error_of_an_auroc() -> None:
    # The true area of a ROC curve from integer counts, in exact rational arithmetic, against the
    # float64 trapezoid: within area_rounding_bound, which is tiny but not zero.
    rng = np.random.default_rng(5)
    fps = np.r_[0, np.cumsum(rng.integers(0, 7, 3000))]
    tps = np.r_[0, np.cumsum(rng.integers(0, 5, 3000))]
    n_neg, n_pos = int(fps[-1]), int(tps[-1])
    exact = sum(Fraction(int(f1 - f0), n_neg) * Fraction(int(t1 + t0), n_pos)
                for f0, f1, t0, t1 in zip(fps[:-1], fps[1:], tps[:-1], tps[1:], strict=True)) / 2
    value = trapezoid(tps / n_pos, fps / n_neg)
    bound = area_rounding_bound(fps.size)
    assert abs(Fraction(value) - exact) <= Fraction(bound) and 0.0 < bound < 1e-11


def test_round_up_keeps_a_bound_a_bound() -> None:
    for value in (1.2345e-5, 9.994e-5, 9.996e-5, 0.5, 1.0 / 3.0, 2.0**-40):
        short = round_up(value)
        assert value <= short <= value * 1.01 and len(f"{short:.6e}".split("e")[0].rstrip("0")) <= 5
    assert round_up(1.23e-5) == 1.23e-5 and round_up(0.0) == 0.0  # already short: unchanged


def _brute_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float) -> float:
    """Exact AUPRO with a threshold at every distinct map value (pixel anomalous when map >= t)."""
    normal = np.sort(maps[~masks])
    regions = []
    for img, mask in zip(maps, masks, strict=True):
        lab, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [np.sort(img[lab == r]) for r in range(1, count + 1)]
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        fprs.append((normal.size - np.searchsorted(normal, t, side="left")) / normal.size)
        pros.append(np.mean([(r.size - np.searchsorted(r, t, side="left")) / r.size for r in regions]))
    area = 0.0
    for (f0, p0), (f1, p1) in itertools.pairwise(zip(fprs, pros, strict=True)):
        if f0 >= fpr_limit:
            break
        if f1 > fpr_limit:  # clip the last segment at fpr_limit
            p1 = p0 + (p1 - p0) * (fpr_limit - f0) / (f1 - f0)
            f1 = fpr_limit
        area += (f1 - f0) * (p0 + p1) / 2
    return area / fpr_limit


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05])
def test_aupro_matches_brute_force(seed: int, fpr_limit: float) -> None:
    maps, masks = _pixel_case(seed, n=5, size=24)
    assert sum(ndimage.label(m, structure=np.ones((3, 3)))[1] for m in masks) >= 3
    expected = _brute_aupro(maps.astype(np.float64), masks, fpr_limit)
    got = aupro(maps, masks, fpr_limit=fpr_limit, num_thresholds=1000)
    assert 0.05 < expected < 0.99  # a non-trivial case
    assert got == pytest.approx(expected, abs=1e-2)


def test_pro_curve_shape_and_extremes(tmp_path) -> None:
    maps, masks = _pixel_case(3)
    fprs, pros = pro_curve(maps, masks, fpr_limit=0.3)
    assert fprs[0] == 0.0 and fprs[-1] == pytest.approx(0.3) and fprs.size == pros.size
    assert np.all(np.diff(fprs) >= 0) and np.all(np.diff(pros) >= 0)
    assert np.all((pros >= 0) & (pros <= 1))
    # A memmap gives the same curve.
    np.save(tmp_path / "m.npy", maps)
    fm, pm = pro_curve(np.load(tmp_path / "m.npy", mmap_mode="r"), masks, fpr_limit=0.3)
    np.testing.assert_allclose(fm, fprs)
    np.testing.assert_allclose(pm, pros)

    perfect = masks.astype(np.float32)
    assert aupro(perfect, masks) == pytest.approx(1.0, abs=1e-6)
    assert aupro(1.0 - perfect, masks) == pytest.approx(0.0, abs=1e-6)
    noisy = perfect + 0.01 * np.random.default_rng(0).random(masks.shape)
    assert aupro(noisy, masks) > 0.99


def test_pro_uses_8_connectivity() -> None:
    # One pixel touching a 3-pixel run diagonally: a single 4-pixel region under 8-connectivity.
    masks = np.zeros((1, 6, 6), dtype=bool)
    masks[0, 0, 0] = True
    masks[0, 1, 1:4] = True
    maps = np.zeros((1, 6, 6), dtype=np.float32)
    maps[0, 0, 0] = 1.0
    fprs, pros = pro_curve(maps, masks, fpr_limit=0.3, num_thresholds=10)
    assert pros[fprs == 0].max() == pytest.approx(0.25)  # 4-connectivity would give mean(1, 0) = 0.5


def test_aupro_errors() -> None:
    maps = np.random.default_rng(0).random((2, 8, 8))
    with pytest.raises(ValueError, match="defect"):
        aupro(maps, np.zeros((2, 8, 8), dtype=bool))
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(maps, maps > 0.9, fpr_limit=0.0)
    bad = maps.copy()
    bad[1, 2, 2] = np.inf
    with pytest.raises(ValueError, match="infinite"):
        aupro(bad, maps > 0.9)


def test_threshold_at_fpr_counts() -> None:
    rng = np.random.default_rng(0)
    twenty = rng.random(20)
    thr = threshold_at_fpr(twenty, 0.05)
    assert thr == twenty.max()  # with 20 images the conformal k = ceil(21 * 0.95) = 20: the maximum
    assert int((twenty > thr).sum()) == 0
    hundred = rng.random(100)
    thr = threshold_at_fpr(hundred, 0.05)
    assert thr in hundred
    assert int((hundred > thr).sum()) == 4  # k = ceil(101 * 0.95) = 96: the 96th of 100 sorted scores
    for n in (1, 3, 7, 50, 333):
        scores = rng.normal(size=n).round(1)  # ties included
        for target in (0.0, 0.01, 0.05, 0.1, 0.5, 1.0):
            t = threshold_at_fpr(scores, target)
            assert (scores > t).mean() <= target + 1e-12
            assert t in scores
    assert threshold_at_fpr([3.0, 1.0, 2.0], 0.0) == 3.0


def test_threshold_at_fpr_errors() -> None:
    with pytest.raises(ValueError, match="none"):
        threshold_at_fpr([], 0.05)
    with pytest.raises(ValueError, match="finite"):
        threshold_at_fpr([0.1, np.nan], 0.05)
    with pytest.raises(ValueError, match="finite"):
        threshold_at_fpr([0.1, np.inf], 0.05)
    with pytest.raises(ValueError, match="target_fpr"):
        threshold_at_fpr([0.1, 0.2], 1.5)


def test_operating_point_hand_made() -> None:
    scores = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    labels = [0, 0, 0, 1, 0, 1, 1, 1]
    op = operating_point(scores, labels, 0.45)  # predicted: 0.5 (good), 0.6, 0.7, 0.8 (defective)
    assert op == pytest.approx({"fpr": 0.25, "recall": 0.75, "precision": 0.75, "f1": 0.75})
    op = operating_point(scores, labels, 0.5)  # strictly greater: 0.5 itself is not anomalous
    assert op["fpr"] == 0.0 and op["recall"] == 0.75 and op["precision"] == 1.0
    assert op["f1"] == pytest.approx(2 * 0.75 / 1.75)
    op = operating_point(scores, labels, 1.0)
    assert op == {"fpr": 0.0, "recall": 0.0, "precision": None, "f1": 0.0}
    op = operating_point([0.2, 0.9], [0, 0], 0.5)
    assert op["fpr"] == 0.5 and op["recall"] is None and op["f1"] is None and op["precision"] == 0.0


class _BrightnessDetector(StandInDetector):
    """Only what anomap.types.EvaluableDetector lists: the anomaly map is the image's brightness."""

    method_name = "brightness"
    calibration = Calibration(threshold=0.99, target_fpr=0.05, n_heldout=3)

    def predict_raw(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        maps = images[..., 0].astype(np.float32) / 255.0
        return maps.reshape(len(maps), -1).max(1), maps


def test_evaluate_needs_only_the_evaluable_detector_protocol(tiny_category) -> None:
    det: EvaluableDetector = _BrightnessDetector()
    res = evaluate(det, tiny_category, progress=False)
    assert res.info["method"] == "brightness" and res.info["eval_size"] == 48 and res.info["n_heldout"] == 3
    assert res.metrics["pixel_auroc"] is not None and 0.5 < res.metrics["pixel_auroc"] <= 1.0
    assert res.metrics["test_fpr"] is not None and len(res.rows) == 8
