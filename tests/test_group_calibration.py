"""calibration_groups: the threshold also reads the fit images, each scored by a memory rebuilt without its
group of look-alikes (gtrans_memory's default), so that normal images unlike the held-out ones (a new
position, another product) stay under the threshold as often as it promises."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import anomap
from anomap.data.tensors import TensorBatches
from anomap.errors import ConfigError
from anomap.methods.gtrans.cross_fit import kmeans_groups
from anomap.metrics.threshold import calibrated_threshold
from anomap.report.threshold import threshold_html
from anomap.train.checkpoint import load_checkpoint, save_checkpoint
from anomap.types import Calibration
from conftest import make_category

SMALL = {"image_size": 64, "smoothing_sigma": 1.0, "device": "cpu", "num_threads": 1, "min_heldout": 3}

pytestmark = pytest.mark.usefixtures("one_thread")


def _looks(rng: np.random.Generator, period: int, angle: int, size: int = 48) -> np.ndarray:
    """A grey striped image: ``period`` px stripes at ``angle`` degrees, a little noise (one "position")."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    t = np.cos(np.deg2rad(angle)) * xx + np.sin(np.deg2rad(angle)) * yy + rng.uniform(0, period)
    img = 128 + 60 * np.sin(2 * np.pi * t / period) + rng.normal(0, 6, (size, size))
    return np.repeat(np.clip(img, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def _positions(root, looks, per_look=6, seed=0):
    """train/good: ``per_look`` images of each (period, angle) look; test/good and test/spot left empty."""
    rng = np.random.default_rng(seed)
    (root / "train/good").mkdir(parents=True)
    for j, (period, angle) in enumerate(looks):
        for i in range(per_look):
            Image.fromarray(_looks(rng, period, angle)).save(root / "train/good" / f"{j:02d}{i:02d}.png")
    return root


def test_kmeans_groups_finds_separated_groups_deterministically():
    rng = np.random.default_rng(1)
    centres = np.array([[0, 0, 0], [10, 0, 0], [0, 10, 0], [0, 0, 10]], float)
    truth = np.repeat(np.arange(4), 7)
    points = centres[truth] + rng.normal(0, 0.5, (28, 3))
    labels = kmeans_groups(points, 4, seed=0)
    assert len({(t, lab) for t, lab in zip(truth, labels, strict=True)}) == 4  # one label per true group
    assert (kmeans_groups(points, 4, seed=0) == labels).all()
    assert kmeans_groups(points[:3], 8, seed=0).max() <= 2  # at most one group per point


def test_group_scores_are_each_groups_scores_under_a_memory_without_it(tmp_path):
    data = _positions(tmp_path / "d", [(6, 0), (6, 90), (14, 45)], per_look=6)
    det = anomap.create("gtrans_memory", calibration_groups=3, **SMALL).fit(data, progress=False)
    model, cal = det.model, det.calibration
    assert len(cal.group_scores) == det.info["n_fit"] and cal.n_scores == det.info["n_fit"] + cal.n_heldout
    bank = model.memory.bank.clone()
    fit_paths = sorted(set((data / "train/good").glob("*.png")) - set(det.heldout_paths(data)))
    fit = np.stack([det.prepare(p)[0] for p in fit_paths])
    again = model.group_scores(TensorBatches(fit, "cpu"), 3)
    assert torch.equal(model.memory.bank, bank)  # the model's own memory is untouched
    np.testing.assert_allclose(again, cal.group_scores, rtol=1e-5)
    # each look is one group (stripes of another period or angle): scored without its look-alikes, its
    # images sit far above their scores under the full memory, and above the held-out normals'
    full = det.predict_raw(fit)[0]
    assert (np.asarray(cal.group_scores) > full).all()
    assert np.median(cal.group_scores) > max(cal.heldout_scores)
    promise = calibrated_threshold([*cal.heldout_scores, *cal.group_scores], 0.05, warn=False)
    assert cal.threshold == promise.threshold and cal.fpr_upper95 == promise.fpr_upper95


def test_a_new_look_is_flagged_less_at_the_group_threshold(tmp_path):
    """A fourth look, unlike any fit image: the held-out threshold flags it; the group threshold keeps its
    promise far better (the defects, bright squares, stay above both)."""
    data = _positions(tmp_path / "d", [(6, 0), (6, 60), (6, 120), (10, 30), (10, 90), (10, 150)], per_look=5)
    rng = np.random.default_rng(7)
    new = [_looks(rng, 8, a) for a in range(10, 180, 20)]
    spots = [im.copy() for im in new[:4]]
    for im in spots:
        im[20:30, 20:30] = 255
    flagged = {}
    for groups in (0, 6):
        det = anomap.create("gtrans_memory", calibration_groups=groups, **SMALL).fit(data, progress=False)
        flagged[groups] = tuple(det.predict(np.stack(x)).is_anomalous.mean() for x in (new, spots))
    assert flagged[0][0] > 0.5 and flagged[6][0] < flagged[0][0] / 2
    assert flagged[6][1] == 1.0


def test_the_group_scores_survive_save_load_and_add_normals_and_rescore_recomputes_them(tmp_path):
    data = make_category(tmp_path / "d", n_train=16)
    det = anomap.create("gtrans_memory", calibration_groups=4, **SMALL).fit(data, out=tmp_path / "m.safetensors",
                                                                              progress=False)
    cal = det.calibration
    back = anomap.load(tmp_path / "m.safetensors")
    assert back.calibration.group_scores == cal.group_scores and back.calibration.threshold == cal.threshold
    assert back.config.calibration_groups == 4
    img = np.asarray(Image.open(sorted((data / "test/good").glob("*.png"))[0]).convert("RGB"))
    back.add_normals([img], data=data)
    assert back.calibration.group_scores == cal.group_scores  # kept: docs/methods.md, "Adding normal images"
    off = anomap.load(tmp_path / "m.safetensors").rescore({"calibration_groups": 0}, data)
    assert off.calibration.group_scores == [] and off.calibration.n_scores == cal.n_heldout
    assert off.calibration.threshold == pytest.approx(  # re-predicted held-out scores: last bits may differ
        calibrated_threshold(cal.heldout_scores, 0.05, warn=False).threshold, rel=1e-6)
    on = off.rescore({"calibration_groups": 4}, data)
    np.testing.assert_allclose(on.calibration.group_scores, cal.group_scores, rtol=1e-5)


def test_a_model_saved_before_the_key_loads_without_groups(tmp_path):
    data = make_category(tmp_path / "d", n_train=10)
    det = anomap.create("gtrans_memory", calibration_groups=0, **SMALL).fit(data, out=tmp_path / "m.safetensors",
                                                                              progress=False)
    tensors, meta = load_checkpoint(tmp_path / "m.safetensors")
    del meta["config"]["calibration_groups"]
    del meta["calibration"]["group_scores"]
    save_checkpoint(tmp_path / "old.safetensors", tensors, meta)
    old = anomap.load(tmp_path / "old.safetensors")
    assert old.config.calibration_groups == 0 and old.calibration.group_scores == []
    assert old.calibration.threshold == det.calibration.threshold
    assert Calibration.from_dict({"threshold": 1.0, "n_heldout": 1, "heldout_scores": [1.0]}).group_scores == []


@pytest.mark.parametrize(("method", "extra", "needle"), [
    ("gtrans_memory", {"calibration_groups": -1}, "calibration_groups=-1 is out of range"),
    ("gtrans_memory", {"calibration_groups": 65}, "calibration_groups=65 is out of range"),
    ("gtrans_memory", {"calibration_groups": 1}, "calibration_groups=1 leaves no other group"),
    ("gtrans_memory", {"memory": "fused", "aspect": "square", "calibration_groups": 8}, "student is trained"),
    ("gtrans", {"calibration_groups": 8}, "student is trained"),
    ("isstad", {"calibration_groups": 8}, "calibration_groups=8 is not available"),
    ("ssl_ae", {"calibration_groups": 2}, "calibration_groups=2 is not available"),
])
def test_calibration_groups_rejects_what_cannot_work_in_one_line(method, extra, needle):
    with pytest.raises(ConfigError) as e:
        anomap.create(method, **extra)
    assert needle in str(e.value) and "\n" not in str(e.value)
    fix = "e.g. calibration_groups=8" if "out of range" in needle else "use calibration_groups=0"
    assert fix in str(e.value)


def test_the_too_few_warning_counts_group_scores_and_asks_for_training_images():
    with pytest.warns(anomap.metrics.threshold.CalibrationWarning) as w:
        calibrated_threshold(np.arange(12.0), 0.05, n_group=9)
    msg = str(w[0].message)
    assert msg.startswith("only 12 normal scores (3 held out, 9 by group) for target_fpr=0.05")
    assert "Train on at least 19 normal images" in msg and "min_heldout" not in msg
    with pytest.warns(anomap.metrics.threshold.CalibrationWarning) as w:
        calibrated_threshold(np.arange(3.0), 0.05)
    assert "Hold out at least 19 normal images" in str(w[0].message) and "min_heldout=19" in str(w[0].message)


def test_the_report_names_the_group_scores_and_what_to_add():
    info = {"threshold": 1.5, "target_fpr": 0.05, "n_heldout": 2, "promised_fpr": 1 / 13, "fpr_upper95": 0.22}
    with_groups = threshold_html({**info, "n_group_scores": 10}, {}, [])
    assert "2 held-out normal images and 10 fit images (each scored by the model fitted without its" in with_groups
    assert "Too few normal images for the target:</span> train on at least 19" in with_groups
    plain = threshold_html(info, {}, [])
    assert "fit images" not in plain and "Too few held-out normals for the target:</span> hold out at least 19" in plain
