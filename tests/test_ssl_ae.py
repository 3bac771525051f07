import numpy as np
import pytest
import torch

import anomap
from anomap.config import build_config
from anomap.methods.ssl_ae import SslAe, SslAeConfig
from anomap.nn.conv_ae import DilatedConvAE
from anomap.nn.filters import gaussian_blur


@pytest.mark.parametrize("full", [False, True])
def test_autoencoder_keeps_size(full):
    net = DilatedConvAE(channels=3, width=8, full=full)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        y = net(x)
    assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1


def test_paper_scale_net_is_about_six_million_parameters():
    net = DilatedConvAE(3, 64, full=True)
    n = sum(p.numel() for p in net.parameters())
    assert 4e6 < n < 8e6


def test_gaussian_blur_matches_scipy_in_the_interior():
    from scipy.ndimage import gaussian_filter

    x = torch.rand(1, 40, 40)
    ours = gaussian_blur(x, 2.0)[0].numpy()
    ref = gaussian_filter(x[0].numpy().astype(np.float64), 2.0, truncate=4.0)
    assert np.allclose(ours[10:-10, 10:-10], ref[10:-10, 10:-10], atol=1e-5)


def test_loss_weights_normal_and_corrupted_regions():
    cfg = build_config(SslAeConfig, {"width": 8, "lambda_normal": 0.25})
    m = SslAe(cfg, channels=1)
    class Zero(torch.nn.Module):
        def forward(self, x):
            return torch.zeros_like(x)

    m.net = Zero()  # output 0 -> error = target^2
    target = torch.zeros(2, 1, 4, 4)
    target[0, 0, :2] = 1.0  # image 0: error 1 on the top half
    mask = torch.zeros(2, 4, 4)
    mask[0, :2] = 1.0  # ... which is exactly the corrupted region
    target[1] = 0.5  # image 1: uncorrupted, error 0.25 everywhere
    out = m.training_step({"input": target, "target": target, "mask": mask}, 0)
    # image 0: 0.25 * 0 (normal) + 0.75 * 1 (corrupted); image 1: only the normal term, 0.25
    assert out["loss"].item() == pytest.approx((0.75 + 0.25) / 2)


def test_make_batch_corrupts_and_keeps_clean_target():
    cfg = build_config(SslAeConfig, {"width": 8, "image_size": 32})
    m = SslAe(cfg, channels=3)
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    b = m.make_batch(imgs, rng, imgs)
    assert b["input"].shape == (4, 3, 32, 32) and b["mask"].shape == (4, 32, 32)
    assert torch.equal(b["target"], torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255)
    assert b["mask"].sum() > 0
    changed = (b["input"] != b["target"]).any(1)
    assert changed.sum() > 0


def test_fit_predict_kinds(tiny_category, tiny_cfg):
    det = anomap.create("ssl_ae", **tiny_cfg).fit(tiny_category, progress=False)
    assert det.calibration.threshold is not None and det.info["stopped_by"] in ("schedule", "max_steps")
    img = next((tiny_category / "test/spot").glob("*.png"))
    one = det.predict(img)
    assert isinstance(one.score, float) and one.anomaly_map.shape == (48, 48)
    assert isinstance(one.is_anomalous, bool)
    arr = np.zeros((30, 40, 3), np.uint8)
    assert det.predict(arr).anomaly_map.shape == (30, 40)
    many = det.predict([img, arr])
    assert len(many) == 2 and many[0].score == pytest.approx(one.score, rel=1e-5)
    batch = det.predict(np.stack([arr, arr]))
    assert batch.score.shape == (2,) and batch.anomaly_map.shape == (2, 30, 40)
    t = torch.zeros(2, 3, 30, 40)
    assert det.predict(t).anomaly_map.shape == (2, 30, 40)


def test_select_on_val_loss_uses_heldout_only(tiny_category, tiny_cfg):
    det = anomap.create("ssl_ae", select_on="val_loss", **tiny_cfg).fit(tiny_category, progress=False)
    assert det.info["best_step"] is not None
