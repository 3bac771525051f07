"""Same seed + same data -> bit-identical weights, calibration and scores on CPU, for every method.

Two fits in one process here; tests/test_kill_resume.py also compares a fit run by the CLI in a
separate process (and killed and resumed) with an in-process fit, bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import anomap

COMMON = {"device": "cpu", "num_threads": 1, "min_heldout": 3, "checkpoint_every": 0, "seed": 11}
CONFIGS = {
    "ssl_ae": {"image_size": 32, "width": 8, "batch_size": 4, "max_steps": 6},
    "gtrans": {"image_size": 64, "tr_dim": 32, "tr_depth": 1, "tr_heads": 2, "batch_size": 4, "max_steps": 3},
    "isstad": {"image_size": 32, "patch_size": 8, "enc_dim": 32, "enc_depth": 1, "enc_heads": 2, "dec_dim": 16,
               "dec_heads": 2, "dec_depth_stage1": 1, "dec_depth_stage2": 2, "stage1_batch_size": 4,
               "stage2_batch_size": 4, "max_steps": 6},
}


def _run(method: str, data, **over) -> tuple[dict[str, torch.Tensor], np.ndarray, np.ndarray, float]:
    det = anomap.create(method, **{**COMMON, **CONFIGS[method], **over}).fit(data, progress=False)
    images = sorted((data / "test").rglob("*.png"))
    res = det.predict(images)
    state = {k: v.detach().clone() for k, v in det.model.state_dict().items()}
    return state, np.array([r.score for r in res]), np.stack([r.anomaly_map for r in res]), det.calibration.threshold


@pytest.mark.parametrize("method", list(CONFIGS))
def test_same_seed_gives_bit_identical_weights_and_scores(method, tiny_category, one_thread) -> None:
    w1, s1, m1, t1 = _run(method, tiny_category)
    w2, s2, m2, t2 = _run(method, tiny_category)
    assert w1.keys() == w2.keys()
    different = [k for k in w1 if not torch.equal(w1[k], w2[k])]
    assert not different, f"{method}: weights differ in {different[:5]}"
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_array_equal(m1, m2)
    assert t1 == t2
    if method == "ssl_ae":  # the seed matters (the test above is not vacuous)
        w3, s3, _, _ = _run(method, tiny_category, seed=12)
        assert any(not torch.equal(w1[k], w3[k]) for k in w1) and not np.array_equal(s1, s3)
