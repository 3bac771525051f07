"""Streaming (binned, bounded-memory) pixel AUROC and AUPRO against the exact computation."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from scipy import ndimage
from sklearn import metrics as skm

import anomap
from anomap.metrics import evaluate as evaluate_mod
from anomap.metrics.curves import area_rounding_bound
from anomap.metrics.pro import aupro_exact, pro_curve_exact
from anomap.metrics.roc import BinnedROC, pixel_auroc
from anomap.metrics.streaming import MapSpool, PixelStream, ValueSample, quantile_edges
from conftest import defect_masks
from test_metrics import _brute_aupro


def _maps(rng: np.random.Generator, n: int, size: int, heavy: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Smooth noise maps with brighter rectangular defects in half the images (heavy-tailed values)."""
    masks = defect_masks(rng, n, size)
    maps = ndimage.gaussian_filter(rng.normal(size=masks.shape) + 1.0 * masks, sigma=(0, 2, 2))
    return (np.exp(3 * maps) if heavy else maps).astype(np.float32), masks


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05])
def test_exact_aupro_matches_brute_force(seed: int, fpr_limit: float) -> None:
    maps, masks = _maps(np.random.default_rng(seed), 6, 20, heavy=False)
    maps = np.round(maps, 2)  # plenty of ties
    assert aupro_exact(maps, masks, fpr_limit) == pytest.approx(_brute_aupro(maps, masks, fpr_limit), abs=1e-12)
    fprs, pros = pro_curve_exact(maps, masks, fpr_limit)
    assert fprs[0] == 0.0 and fprs[-1] == pytest.approx(fpr_limit)
    assert np.all(np.diff(fprs) >= 0) and np.all(np.diff(pros) >= 0)


def test_known_answers_and_a_tight_bound() -> None:
    # 100 normals at k and 100 defects at k + 50 (k < 100): AUROC = (sum_k min(k+50, 100) + 50/2) / 1e4.
    neg = np.arange(100, dtype=np.float64)
    pos = np.arange(100, dtype=np.float64) + 50
    scores = np.r_[neg, pos]
    labels = np.r_[np.zeros(100, bool), np.ones(100, bool)]
    assert skm.roc_auc_score(labels, scores) == pytest.approx(0.875)
    # Bins with an edge at every value: binned = exact, and the bound is the exact tie mass 0.5 * 50 / 1e4.
    stream = PixelStream(np.unique(scores))
    stream.update(scores.reshape(1, 20, 10), labels.reshape(1, 20, 10))
    value, bound, curve = stream.pixel_auroc()
    assert value == pytest.approx(0.875, abs=1e-12)
    assert bound == pytest.approx(0.0025)
    assert curve["fpr"][0] == 0.0 and curve["tpr"][-1] == 1.0
    # One bin for everything: binned AUROC 0.5, exact 1.0 for separated data; the bound is reached exactly.
    sep = np.r_[np.zeros(50), np.ones(50)].reshape(1, 10, 10)
    one = PixelStream(np.array([0.0]))
    one.update(sep, sep > 0.5)
    value, bound, _ = one.pixel_auroc()
    # (value is exactly 0.5: every operation on the two-point curve is exact in floating point.)
    assert value == 0.5 and bound == pytest.approx(0.5, abs=1e-12) and abs(value - 1.0) <= bound
    # BinnedROC reports the same kind of bound.
    roc = BinnedROC(0.0, 150.0, bins=3)
    roc.update(scores, labels)
    assert abs(roc.auroc() - 0.875) <= roc.max_error()


def test_pro_known_answers() -> None:
    rng = np.random.default_rng(3)
    _, masks = _maps(rng, 4, 32)
    perfect = masks.astype(np.float32)
    for maps, expected in ((perfect, 1.0), (1.0 - perfect, 0.0)):
        stream = PixelStream.linear(0.0, 1.0)
        stream.update(maps, masks)
        value, bound = stream.aupro()
        assert value == pytest.approx(expected, abs=1e-9) and bound <= 1e-9
        assert aupro_exact(maps, masks) == pytest.approx(expected, abs=1e-9)
    # Normal and defect values interleaved uniformly: PRO(t) = FPR(t), so AUPRO@0.3 = 0.15 (+ O(1/N)).
    n = 4096
    mask = np.zeros((1, 2, n), bool)
    mask[0, 1] = True  # one region: the whole second row
    maps = np.stack([np.arange(n) / n, (np.arange(n) + 0.5) / n])[None].astype(np.float64)
    assert aupro_exact(maps, mask) == pytest.approx(0.15, abs=2 / n)
    stream = PixelStream(quantile_edges(maps.ravel(), 0.0, 1024))
    stream.update(maps, mask)
    value, bound = stream.aupro()
    assert abs(value - aupro_exact(maps, mask)) <= bound + area_rounding_bound(maps.size + 2)


def test_streaming_matches_exact_on_a_large_generated_set(tmp_path) -> None:
    """300 heavy-tailed maps at 128x128 (4.9 M pixels): streaming within 1e-3 of exact, and within its bound."""
    rng = np.random.default_rng(7)
    maps, masks = _maps(rng, 300, 128)
    exact_auroc, _ = pixel_auroc(maps, masks, exact_limit=maps.size)
    exact_pro = aupro_exact(maps, masks)
    with MapSpool(tmp_path, 128) as spool:
        for i in range(0, len(maps), 16):
            spool.add(maps[i:i + 16], masks[i:i + 16])
        stream = spool.stream()
    auroc_s, auroc_bound, _ = stream.pixel_auroc()
    pro_s, pro_bound = stream.aupro()
    exact_rounding = area_rounding_bound(maps.size + 2)  # the exact values' own floating-point error
    assert abs(auroc_s - exact_auroc) <= auroc_bound + exact_rounding
    assert abs(pro_s - exact_pro) <= pro_bound + exact_rounding
    assert auroc_bound <= 1e-3 and pro_bound <= 1e-3
    assert abs(auroc_s - exact_auroc) <= 1e-3 and abs(pro_s - exact_pro) <= 1e-3
    assert not list(tmp_path.iterdir())  # the spool files are removed
    # Equal-width bins over [min, max] are worse on heavy-tailed maps but still bounded honestly.
    linear = PixelStream.linear(float(maps.min()), float(maps.max()))
    linear.update(maps, masks)
    value, bound, _ = linear.pixel_auroc()
    assert abs(value - exact_auroc) <= bound + exact_rounding


def test_value_sample_is_bounded_and_covers_the_stream() -> None:
    sample = ValueSample(cap=1000)
    data = np.arange(100_000, dtype=np.float32)
    for part in np.array_split(data, 37):
        sample.add(part)
    assert sample.values.size <= 1000 and sample.count == data.size
    assert (sample.lo, sample.hi) == (0.0, 99_999.0)
    np.testing.assert_array_equal(sample.values, data[::sample.stride])  # evenly spread, whatever the chunks
    with pytest.raises(ValueError, match="NaN"):
        sample.add(np.array([1.0, np.nan]))


def _peak_streaming_bytes(tmp_path, n: int) -> int:
    rng = np.random.default_rng(0)
    tracemalloc.start()
    with MapSpool(tmp_path, 64, sample_cap=20_000) as spool:
        for _ in range(0, n, 10):
            maps, masks = _maps(rng, 10, 64)
            spool.add(maps, masks)
            del maps, masks
        spool.stream(bins=4096).aupro()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_streaming_memory_does_not_grow_with_the_number_of_images(tmp_path) -> None:
    small, large = _peak_streaming_bytes(tmp_path, 40), _peak_streaming_bytes(tmp_path, 320)
    all_maps = 320 * 64 * 64 * 5  # what holding the 320 maps and masks would take
    assert large < 1.3 * small + 200_000, (small, large)
    assert large < all_maps / 3


def test_evaluate_records_the_mode_and_streaming_agrees(tiny_category, tiny_cfg, one_thread, monkeypatch) -> None:
    det = anomap.create("ssl_ae", **tiny_cfg).fit(tiny_category, progress=False)
    exact = anomap.evaluate(det, tiny_category, eval_size=64, progress=False)
    # The exact mode is exact up to floating point, and says so: a bound that is tiny but not zero.
    assert exact.info["pixel_metrics_mode"] == "exact"
    assert 0.0 < exact.info["pixel_auroc_max_error"] < 1e-9 and 0.0 < exact.info["aupro_max_error"] < 1e-9
    streamed = anomap.evaluate(det, tiny_category, eval_size=64, progress=False, pixel_mode="streaming")
    info = streamed.info
    assert info["pixel_metrics_mode"] == "streaming" and info["pixel_metrics_bins"] > 1000
    # Each value lies within its bound of the true one, so the two lie within the sum of the bounds
    # (they differ by ~1e-16 even where the bins separate the classes: the sums run in another order).
    for key in ("pixel_auroc", "aupro"):
        both = info[f"{key}_max_error"] + exact.info[f"{key}_max_error"]
        assert abs(streamed.metrics[key] - exact.metrics[key]) <= both, key
    # Same scores (same process, one thread: bit-identical maps) through the same image-level code.
    assert streamed.metrics["image_auroc"] == exact.metrics["image_auroc"]
    # "auto" streams once the test set has more pixels than the exact limit.
    monkeypatch.setattr(evaluate_mod, "EXACT_PIXEL_LIMIT", 8 * 64 * 64 - 1)
    auto = anomap.evaluate(det, tiny_category, eval_size=64, progress=False)
    assert auto.info["pixel_metrics_mode"] == "streaming"
    assert auto.metrics == streamed.metrics  # the same streaming code on the same maps: bit-identical
    with pytest.raises(ValueError, match="pixel_mode"):
        anomap.evaluate(det, tiny_category, progress=False, pixel_mode="fast")
