"""anomap.metrics.bootstrap: per-image summaries and the three metrics on weighted resamples of them."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from anomap.errors import DataError
from anomap.metrics.bootstrap import (
    ImageSummaries,
    SummaryBuilder,
    dataset_rng,
    interval,
    stratified_weights,
    summary_edges,
)
from anomap.metrics.evaluate import PRO_LIMIT, evaluate
from anomap.metrics.pro import aupro_exact, region_weights
from anomap.metrics.roc import auroc, pixel_auroc
from anomap.metrics.streaming import PixelStream
from anomap.types import Sample
from conftest import StandInDetector, defect_masks, make_category


def _maps(rng: np.random.Generator, n: int, size: int, shift: float = 1.0, ties: bool = False):
    """Smooth heavy-tailed noise maps; the first half of the images have 1-3 brighter rectangles."""
    masks = defect_masks(rng, n, size)
    maps = np.exp(3 * ndimage.gaussian_filter(rng.normal(size=masks.shape) + shift * masks, sigma=(0, 2, 2)))
    if ties:
        maps = np.round(maps, 1)
    labels = (np.arange(n) < n // 2).astype(int)
    scores = maps.reshape(n, -1).max(1).astype(np.float64)
    if ties:
        scores = np.round(scores, 0)
    return maps.astype(np.float32), masks, labels, scores


def _samples(labels: np.ndarray) -> list[Sample]:
    return [Sample(Path(f"/d/test/{'spot' if y else 'good'}/{i:03d}.png"), int(y), "spot" if y else "good")
            for i, y in enumerate(labels)]


def _build(tmp_path: Path, maps, masks, labels, scores, bins: int = 1024, batch: int = 7) -> ImageSummaries:
    samples = _samples(labels)
    b = SummaryBuilder(tmp_path, maps.shape[1], bins=bins)
    for i in range(0, len(labels), batch):
        b.add(samples[i:i + batch], scores[i:i + batch], maps[i:i + batch], masks[i:i + batch])
    out = b.finish({"dataset": "toy"})
    assert not any(tmp_path.iterdir())  # the spool is gone
    return out


@pytest.mark.parametrize(("seed", "ties", "bins"), [(0, False, 1024), (1, True, 1024), (2, False, 64), (3, True, 16)])
def test_all_ones_equal_the_exact_metrics_within_the_bound(tmp_path, seed, ties, bins) -> None:
    maps, masks, labels, scores = _maps(np.random.default_rng(seed), 40, 32, ties=ties)
    s = _build(tmp_path, maps, masks, labels, scores, bins=bins)
    m = {k: float(v[0]) for k, v in s.metrics().items()}
    assert m["image_auroc"] == pytest.approx(auroc(scores, labels), abs=1e-12)  # not binned
    exact_pix, _ = pixel_auroc(maps, masks, exact_limit=maps.size)
    exact_pro = aupro_exact(maps, masks)
    rounding = 4 * (maps.size + 2) * np.finfo(np.float64).eps  # the exact values' own floating-point bound
    assert abs(m["pixel_auroc"] - exact_pix) <= m["pixel_auroc_max_error"] + rounding
    assert abs(m["aupro"] - exact_pro) <= m["aupro_max_error"] + rounding
    assert 0 < m["pixel_auroc_max_error"] < 0.6 and 0 < m["aupro_max_error"] < 1.0
    if bins == 1024 and not ties:  # the bound is small, and the real error smaller still
        assert m["pixel_auroc_max_error"] < 1e-3 and m["aupro_max_error"] < 2e-3
    # the binned values and bounds are streaming's at the same edges (a PixelStream over all maps)
    stream = PixelStream(s.edges)
    stream.update(maps, masks)
    pix, pix_err, _ = stream.pixel_auroc()
    pro, pro_err = stream.aupro(0.3)
    assert m["pixel_auroc"] == pytest.approx(pix, abs=1e-12) and m["aupro"] == pytest.approx(pro, abs=1e-12)
    assert m["pixel_auroc_max_error"] == pytest.approx(pix_err, rel=1e-9)
    assert m["aupro_max_error"] == pytest.approx(pro_err, rel=1e-9)


def test_weights_are_image_multiplicities(tmp_path) -> None:
    """A row of weights gives the metrics of the test set with each image repeated that often."""
    rng = np.random.default_rng(5)
    maps, masks, labels, scores = _maps(rng, 24, 24, ties=True)
    s = _build(tmp_path, maps, masks, labels, scores, bins=256)
    w = stratified_weights(labels, 3, rng)
    got = s.metrics(w)
    for k, row in enumerate(w):
        rep = np.repeat(np.arange(len(labels)), row)
        assert got["image_auroc"][k] == pytest.approx(auroc(scores[rep], labels[rep]), abs=1e-12)
        stream = PixelStream(s.edges)
        stream.update(maps[rep], masks[rep])
        assert got["pixel_auroc"][k] == pytest.approx(stream.pixel_auroc()[0], abs=1e-12)
        assert got["aupro"][k] == pytest.approx(stream.aupro(0.3)[0], abs=1e-12)
        assert got["aupro_max_error"][k] == pytest.approx(stream.aupro(0.3)[1], rel=1e-9)
        exact = aupro_exact(maps[rep], masks[rep])
        assert abs(got["aupro"][k] - exact) <= got["aupro_max_error"][k] + 1e-9


def test_regions_are_pros_regions_and_every_pixel_is_counted_once(tmp_path) -> None:
    maps, masks, labels, scores = _maps(np.random.default_rng(7), 12, 32)
    masks[0] = False
    masks[0, 0:3, 0:3] = True
    masks[0, 3, 3] = True  # a diagonal neighbour: the same 8-connected region
    s = _build(tmp_path, maps, masks, labels, scores)
    sizes = np.add.reduceat(s.region_counts, s.region_ptr[:-1])
    assert sizes[s.region_image == 0].tolist() == [10]
    for i, mask in enumerate(masks):
        lab, count = ndimage.label(mask, structure=np.ones((3, 3)))
        assert sorted(sizes[s.region_image == i].tolist()) == sorted(np.bincount(lab.ravel())[1:].tolist())
        assert region_weights(mask)[1] == count
        assert s.normal_hist[i].sum() == (~mask).sum()
    assert s.normal_hist.shape == (12, s.edges.size) and s.region_bins.max() < s.edges.size


def test_save_and_load_round_trip(tmp_path) -> None:
    (tmp_path / "spool").mkdir()
    maps, masks, labels, scores = _maps(np.random.default_rng(8), 10, 24)
    s = _build(tmp_path / "spool", maps, masks, labels, scores)
    path = s.save(tmp_path / "summaries.npz")
    back = ImageSummaries.load(path)
    assert back.meta["dataset"] == "toy" and back.meta["format"] == 1 and back.names[0] == "spot/000.png"
    w = stratified_weights(labels, 20, dataset_rng("toy"))
    for k, v in s.metrics(w).items():
        np.testing.assert_array_equal(v, back.metrics(w)[k])
    with pytest.raises(DataError, match="has no per-image summaries") as e:
        ImageSummaries.load(tmp_path / "missing.npz")
    assert "\n" not in str(e.value) and "Fix:" in str(e.value)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="is not a summaries file"):
        ImageSummaries.load(tmp_path / "bad.npz")


def test_stratified_weights_keep_the_class_sizes_and_are_seeded() -> None:
    labels = np.array([0] * 7 + [1] * 5)
    w = stratified_weights(labels, 500, dataset_rng("a"))
    assert w.shape == (500, 12)
    assert (w[:, labels == 0].sum(1) == 7).all() and (w[:, labels == 1].sum(1) == 5).all()
    assert w.mean(0) == pytest.approx(np.ones(12), abs=0.15)  # each image drawn about once on average
    np.testing.assert_array_equal(w, stratified_weights(labels, 500, dataset_rng("a")))
    assert not np.array_equal(w, stratified_weights(labels, 500, dataset_rng("b")))
    assert not np.array_equal(w, stratified_weights(labels, 500, dataset_rng("a", seed=1)))
    assert interval(np.arange(1001.0)) == pytest.approx((25.0, 975.0))
    assert interval(np.array([np.nan, 1.0, np.nan])) == (1.0, 1.0) and interval(np.array([np.nan])) == (None, None)


def test_the_fpr_limit_is_the_evaluations() -> None:
    from anomap.metrics.bootstrap import FPR_LIMIT

    assert FPR_LIMIT == PRO_LIMIT


def test_edges_split_normal_top_and_defect_values() -> None:
    rng = np.random.default_rng(0)
    normal, defect = rng.normal(size=100_000), rng.normal(3, 1, size=20_000)
    e = summary_edges(normal, defect, float(normal.min()), bins=1024)
    assert e.size <= 1024 and e[0] == normal.min() and np.all(np.diff(e) > 0)
    top = np.quantile(normal, 0.7)
    assert (e >= top).sum() > 0.5 * e.size  # the AUPRO zone and the defects get most of the edges
    assert summary_edges(normal, np.zeros(0), float(normal.min()), bins=64).size == 64
    assert summary_edges(np.full(10, 2.0), np.zeros(0), 2.0).tolist() == [2.0]


class _NoisyDetector(StandInDetector):
    """Brightness plus smooth noise seeded by the image: non-trivial, tie-free maps (EvaluableDetector)."""

    method_name = "noisy"

    def predict_raw(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        maps = []
        for im in images:
            rng = np.random.default_rng(int(im.sum()))
            maps.append(im[..., 0] / 255.0 + ndimage.gaussian_filter(rng.normal(0, 0.6, im.shape[:2]), 2))
        m = np.stack(maps).astype(np.float32)
        return m.reshape(len(m), -1).max(1), m[:, ::2, ::2]  # half-size maps: evaluate resizes them


@pytest.mark.parametrize("mode", ["exact", "streaming"])
def test_evaluate_observer_gives_summaries_that_match_its_metrics(tmp_path, mode) -> None:
    data = make_category(tmp_path / "cat", n_train=1, n_good=9, n_defect=9, seed=3)
    builder = SummaryBuilder(tmp_path, 48)
    res = evaluate(_NoisyDetector(), data, progress=False, pixel_mode=mode, observe=builder.add)
    s = builder.finish()
    assert s.names.tolist() == [f"{Path(r['path']).parent.name}/{Path(r['path']).name}" for r in res.rows]
    assert s.scores.tolist() == [r["score"] for r in res.rows] and s.labels.tolist() == [r["label"] for r in res.rows]
    m = {k: float(v[0]) for k, v in s.metrics().items()}
    assert m["image_auroc"] == pytest.approx(res.metrics["image_auroc"], abs=1e-12)
    for key in ("pixel_auroc", "aupro"):
        assert 0.5 < res.metrics[key] < 1.0  # non-trivial
        assert abs(m[key] - res.metrics[key]) <= m[f"{key}_max_error"] + res.info[f"{key}_max_error"]


def test_a_thousand_resamples_of_300_images_take_seconds(tmp_path) -> None:
    maps, masks, labels, scores = _maps(np.random.default_rng(9), 300, 32)
    s = _build(tmp_path, maps, masks, labels, scores, batch=32)
    assert 900 < s.edges.size <= 1024
    w = stratified_weights(labels, 1000, dataset_rng("t"))
    t0 = time.perf_counter()
    out = s.metrics(w)
    seconds = time.perf_counter() - t0
    assert all(v.shape == (1000,) and np.isfinite(v).all() for v in out.values())
    assert seconds < 20  # about 0.5 s on 2 busy cores; generous for slower CI machines
