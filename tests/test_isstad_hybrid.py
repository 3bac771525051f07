"""isstad's hybrid variant (``encoder=efficientnet_lite0``): frozen pretrained CNN tokens, stage 2 alone."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import anomap
from anomap.config import build_config
from anomap.errors import ConfigError
from anomap.export.onnx import export_onnx
from anomap.methods.isstad import STAGE1, STAGE2, Isstad, IsstadConfig
from anomap.nn.cnn_tokens import CnnTokens
from anomap.nn.efficientnet import Teacher

HYBRID = {"encoder": "efficientnet_lite0", "image_size": 32, "patch_size": 16, "dec_dim": 16, "dec_heads": 2,
          "dec_depth_stage2": 2, "stage2_batch_size": 4, "max_steps": 4, "checkpoint_every": 0, "device": "cpu",
          "min_heldout": 3, "num_threads": 1}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(("values", "match"), [
    ({"encoder": "resnet18"}, "encoder='resnet18' must be one of vit, efficientnet_lite0"),
    ({"encoder": "efficientnet_lite0", "patch_size": 8}, "patch_size must be 16"),
    ({"encoder": "efficientnet_lite0", "mae_checkpoint_path": "mae.pth"}, "has no MAE stage"),
    ({"encoder": "efficientnet_lite0", "score_model": "stage1"}, "has no MAE stage"),
])
def test_hybrid_rejects_what_it_cannot_do_in_one_line(values, match):
    with pytest.raises(ConfigError, match=match) as err:
        build_config(IsstadConfig, values)
    assert "\n" not in str(err.value)


def test_cnn_tokens_are_the_teachers_stride_16_map_normalised_with_a_zero_cls():
    enc = CnnTokens("efficientnet_lite0", 64)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    latent, mask, ids = enc(x)
    assert latent.shape == (2, 1 + 16, enc.dim) and enc.dim == 112 and enc.grid == 4
    assert torch.equal(latent[:, 0], torch.zeros(2, 112)) and not mask.any()
    feats = enc.teacher((x + 1) / 2, 2)[1].flatten(2).transpose(1, 2)
    expect = (feats - feats.mean(-1, keepdim=True)) / (feats.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    torch.testing.assert_close(latent[:, 1:], expect, rtol=1e-4, atol=1e-4)
    kept, mask, ids = enc(x, mask_ratio=0.75, shuffle=True)
    assert kept.shape == (2, 1 + 4, 112) and mask.sum(1).tolist() == [12.0, 12.0] and ids.shape == (2, 16)
    assert not any(p.requires_grad for p in enc.parameters())


def test_hybrid_plans_stage2_alone_in_the_whole_budget():
    m = Isstad.__new__(Isstad)  # plan_steps reads only the config
    m.config = build_config(IsstadConfig, {"encoder": "efficientnet_lite0", "max_train_seconds": 0})
    assert m.plan_steps(250) == (0, math.ceil(200 * 250 / 16))
    m.config = build_config(IsstadConfig, {"encoder": "efficientnet_lite0", "max_train_seconds": 900})
    assert m.plan_steps(630) == (0, int(0.95 * 900 * m.config.est_images_per_s[1] / 16))
    m.config = build_config(IsstadConfig, {"encoder": "efficientnet_lite0", "max_steps": 7})
    assert m.plan_steps(250) == (0, 7)


@pytest.fixture(scope="module")
def hybrid(tiny_category):
    return anomap.create("isstad", **HYBRID).fit(tiny_category, progress=False)


def test_hybrid_trains_the_decoder_on_frozen_pretrained_tokens(hybrid):
    assert hybrid.info["steps"] == {STAGE2: 4} and STAGE1 not in hybrid.info["steps"]
    model = hybrid.model
    assert model.decoder1 is None and int(model.stage2_initialised) == 1
    packaged = Teacher("efficientnet_lite0", 32)
    packaged.load_pretrained()
    for k, v in packaged.state_dict().items():  # the pretrained weights, untouched by training
        assert torch.equal(model.encoder.teacher.state_dict()[k], v), k
    scores, maps = model.predict(torch.rand(3, 3, 32, 32))
    assert scores.shape == (3,) and maps.shape == (3, 32, 32) and torch.isfinite(maps).all()
    with pytest.raises(ValueError, match="has no stage 'stage1_mae'"):
        model.set_stage(STAGE1)


def test_an_untrained_hybrid_scores_with_its_stage2_decoder():
    model = Isstad(build_config(IsstadConfig, HYBRID), channels=3)
    assert int(model.stage2_initialised) == 0
    m, r = model.components(torch.rand(2, 3, 32, 32))  # no MAE decoder to fall back on
    assert m.shape == r.shape == (2, 32, 32) and not torch.equal(m, torch.ones_like(m))


def test_hybrid_saves_loads_and_exports_with_parity(hybrid, tiny_category, tmp_path: Path):
    path = hybrid.save(tmp_path / "hybrid.safetensors")
    again = anomap.load(path)
    assert again.config.encoder == "efficientnet_lite0"
    rng = np.random.default_rng(7)
    batch = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    s1, m1 = hybrid.predict_raw(batch)
    s2, m2 = again.predict_raw(batch)
    assert np.array_equal(s1, s2) and np.array_equal(m1, m2)
    rep = export_onnx(again, tmp_path / "hybrid.onnx")
    assert rep["parity"]["passed"] and rep["parity"]["max_map_diff"] <= 1e-3
