"""benchmarks/synthetic_check.py: the label-free check that decides scoring defaults."""

import sys
from pathlib import Path

import numpy as np
import pytest

import anomap
from test_gtrans import TINY

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import synthetic_check  # a benchmark script, not part of the package

pytestmark = pytest.mark.usefixtures("one_thread")


class _CalibratedShift:
    """Scores every image by its first pixel plus the mean first pixel of the images it was calibrated on."""

    def __init__(self):
        self.offset = 0.0

    def calibrate(self, imgs):
        self.offset = float(imgs[:, 0, 0, 0].mean())

    def predict_raw(self, imgs):
        s = imgs[:, 0, 0, 0].astype(np.float32) + self.offset
        return s, np.repeat(s[:, None, None], imgs.shape[1], 1).repeat(imgs.shape[2], 2)


def test_cross_scores_each_half_with_the_other_halfs_calibration():
    normals = np.zeros((5, 4, 4, 1), np.uint8)
    normals[:, 0, 0, 0] = [10, 20, 30, 40, 50]
    bad = normals + 1
    s0, m0, s1, m1 = synthetic_check._score(_CalibratedShift(), normals, bad, cross=True)
    even, odd = np.mean([10, 30, 50]), np.mean([20, 40])  # positions 0, 2, 4 and 1, 3
    np.testing.assert_allclose(s0, [10 + odd, 20 + even, 30 + odd, 40 + even, 50 + odd])
    np.testing.assert_allclose(s1, s0 + 1)
    np.testing.assert_allclose(m1[:, 2, 1], s1)
    assert m0.shape == (5, 4, 4) and np.all(m0[:, 3, 3] == s0)
    plain = synthetic_check._score(_CalibratedShift(), normals, bad, cross=False)
    np.testing.assert_allclose(plain[0], normals[:, 0, 0, 0])  # never calibrated: offset 0
    two = np.concatenate([bad, normals + 2])  # two blocks of copies: bad[k * 5 + i] is copy k of image i
    s0b, _, s1b, m1b = synthetic_check._score(_CalibratedShift(), normals, two, cross=True)
    np.testing.assert_allclose(s0b, s0)
    np.testing.assert_allclose(s1b, np.r_[s0 + 1, s0 + 2])  # each copy scored with its image's other half
    assert m1b.shape == (10, 4, 4)


def test_cross_check_rows_for_a_trained_model(tiny_category, tmp_path):
    det = anomap.create("gtrans", **TINY, max_steps=3, min_heldout=4, checkpoint_every=0)
    det.fit(tiny_category, progress=False)
    model = det.save(tmp_path / "g.safetensors")
    out = tmp_path / "rows.md"
    assert synthetic_check.main(["--cross", "--copies", "2", "--model", str(model), "--data", str(tiny_category),
                                 "--variant", "scale", "map_norm=scale", "--variant", "location", "map_norm=location",
                                 "--digits", "5", "--out", str(out)]) == 0
    rows = [r for r in out.read_text().splitlines() if r.startswith("|")]
    assert len(rows) == 2 and "map_norm=location" in rows[1]
    n = len(det.info["heldout_files"])
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[4] == f"{n} + {2 * n}"
        assert all(0.0 <= float(v) <= 1.0 and len(v.split(".")[1]) == 5 for v in cells[5:8])
