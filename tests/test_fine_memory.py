"""gtrans's fine memory (``memory_fine_weight``): the finest scale's rows in a bank of their own, whose excess
over its held-out mean enters the anomaly map only; built, calibrated, saved, added to and exported with the memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import anomap
from anomap.config import build_config
from anomap.export.onnx import export_onnx
from anomap.methods.gtrans import GTrans, GTransConfig
from conftest import _normal, make_category

TINY = {"image_size": 64, "smoothing_sigma": 0.0, "device": "cpu", "num_threads": 1, "min_heldout": 3,
        "checkpoint_every": 0, "memory": "only"}

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(n_fit: int = 10, **over) -> tuple[GTrans, torch.Tensor]:
    rng = np.random.default_rng(0)
    imgs = np.stack([_normal(rng, 64) for _ in range(n_fit)])
    m = GTrans(build_config(GTransConfig, {**TINY, **over}), 3)
    m.prepare_fit(imgs)
    return m.eval(), torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255


def test_fine_bank_is_a_coreset_of_the_finest_block_of_the_memory_rows():
    m, x = _model(memory_fine_weight=0.4, memory_fine_max=50, memory_ratio=0.5)
    assert m.memory is not None and m.memory.fine is not None and m.memory.fine.fine is None
    assert m.memory.bank.shape == (320, 152) and m.memory.fine.bank.shape == (50, 40)  # capped by memory_fine_max
    rows = m.memory.rows(m._teacher(x))[0]
    fine_rows = m.memory.fine.standardise(rows[:, :40], *m._feat_stats())
    assert float(fine_rows.mean(0).abs().max()) < 0.2  # standardised with the stride-8 statistics
    assert max(float((fine_rows - b).abs().sum(1).min()) for b in m.memory.fine.bank) < 1e-3  # fit rows
    # the main bank does not change with the fine memory
    plain, _ = _model(memory_ratio=0.5)
    assert plain.memory is not None and plain.memory.fine is None
    torch.testing.assert_close(plain.memory.bank, m.memory.bank, rtol=0, atol=0)


def test_fine_memory_mixes_into_the_anomaly_map_and_not_into_the_image_score():
    m, _ = _model(memory_fine_weight=0.4)
    plain, _ = _model()
    fine_alone, _ = _model(memory_scales=[0])
    held = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    for model in (m, plain, fine_alone):
        model.calibrate(held)
    assert m.memory is not None and fine_alone.memory is not None
    assert float(m.memory.fine.mean_dist) == pytest.approx(float(fine_alone.memory.mean_dist), rel=1e-4)
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(9))
    scores, amap = m.predict(x)
    p_scores, p_map = plain.predict(x)
    f_scores, f_map = fine_alone.predict(x)  # the same bank: memory_ratio 0.1 of 640 rows is below 4096
    torch.testing.assert_close(amap, p_map + 0.4 * (f_map - 1).clamp_min(0), rtol=1e-4, atol=1e-5)
    assert float((f_map > 1).float().mean()) > 0.1  # the excess is not empty on these images
    torch.testing.assert_close(scores, p_scores)  # the image score reads the memory's own map
    assert not torch.allclose(amap, p_map)
    m.config.memory_image_norm = "location"  # a second map for the image score: still without the fine one
    plain.config.memory_image_norm = "location"
    torch.testing.assert_close(m.predict(x)[0], plain.predict(x)[0])


def test_fine_memory_saves_adds_normals_and_exports_with_parity(tmp_path):
    data = make_category(tmp_path / "cat", size=64, n_train=14)
    det = anomap.create("gtrans_memory", **TINY, memory_fine_weight=0.4).fit(data, out=tmp_path / "m.safetensors",
                                                                             progress=False)
    fine = det.model.memory.fine
    back = anomap.load(tmp_path / "m.safetensors")
    torch.testing.assert_close(back.model.memory.fine.bank, fine.bank, rtol=0, atol=0)
    assert float(back.model.memory.fine.mean_dist) == float(fine.mean_dist) > 0
    img = sorted((data / "test/spot").glob("*.png"))[0]
    np.testing.assert_allclose(back.predict(img).anomaly_map, det.predict(img).anomaly_map, rtol=1e-6, atol=1e-6)
    n_fine = len(fine)
    det.add_normals(_normal(np.random.default_rng(99), 64)[:, ::-1].copy())
    assert len(det.model.memory.fine) > n_fine  # the new image's fine rows are remembered too
    assert export_onnx(det, tmp_path / "m.onnx")["parity"]["passed"]
