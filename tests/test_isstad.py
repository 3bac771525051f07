"""isstad: ViT pieces, both training stages, resume in stage 2, scoring, persistence, MAE checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import anomap
from anomap.config import build_config
from anomap.errors import CheckpointError, ConfigError
from anomap.methods.isstad import STAGE1, STAGE2, Isstad, IsstadConfig, load_mae_checkpoint, ssim
from anomap.nn.vit import MaeDecoder, ViTEncoder, patchify, random_masking, sincos_2d, unpatchify
from anomap.train.checkpoint import read_metadata
from anomap.train.loop import train

TINY = {"image_size": 32, "patch_size": 8, "enc_dim": 32, "enc_depth": 1, "enc_heads": 2, "dec_dim": 16,
        "dec_heads": 2, "dec_depth_stage1": 1, "dec_depth_stage2": 2, "stage1_batch_size": 4,
        "stage2_batch_size": 4, "max_steps": 6, "checkpoint_every": 2, "device": "cpu", "min_heldout": 3,
        "num_threads": 1}
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int = 0, **kw) -> Isstad:
    torch.manual_seed(seed)
    return Isstad(build_config(IsstadConfig, {**TINY, **kw}), channels=3)


def images(n: int = 10, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32]
    base = 120 + 60 * np.sin(xx / 4.0)[..., None] * np.cos(yy / 6.0)[..., None]
    return np.clip(base + rng.normal(0, 6, (n, 32, 32, 3)), 0, 255).astype(np.uint8)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# --- nn.vit -------------------------------------------------------------------------------------------


def test_patchify_round_trip_and_patch_order():
    x = torch.rand(2, 3, 32, 32)
    p = patchify(x, 8)
    assert p.shape == (2, 16, 192) and torch.equal(unpatchify(p, 8, 3), x)
    # patch 1 is the second patch of the first row; its vector is (row, column, channel)
    assert torch.equal(p[0, 1].view(8, 8, 3), x[0, :, :8, 8:16].permute(1, 2, 0))


def test_sincos_embeddings():
    emb = sincos_2d(16, 4)
    assert emb.shape == (1, 17, 16) and torch.equal(emb[0, 0], torch.zeros(16))
    # token (row 0, col 1): x half at position 1, y half at position 0 (sin 0 = 0, cos 0 = 1)
    tok = emb[0, 2]
    assert tok[0] == pytest.approx(math.sin(1.0)) and tok[4] == pytest.approx(math.cos(1.0))
    assert torch.allclose(tok[8:12], torch.zeros(4)) and torch.allclose(tok[12:], torch.ones(4))
    assert len({tuple(r.tolist()) for r in emb[0, 1:]}) == 16  # every position distinct


def test_random_masking_keeps_the_ratio_and_restores_order():
    torch.manual_seed(0)
    x = torch.arange(16.0).view(1, 16, 1).expand(3, 16, 2)
    kept, mask, ids_restore = random_masking(x, 0.75)
    assert kept.shape == (3, 4, 2) and mask.sum(1).tolist() == [12.0] * 3
    for b in range(3):  # the kept tokens are exactly the unmasked positions
        assert sorted(kept[b, :, 0].long().tolist()) == torch.nonzero(mask[b] == 0).flatten().tolist()
    full = torch.cat([kept, torch.full((3, 12, 2), -1.0)], dim=1)
    restored = torch.gather(full, 1, ids_restore.unsqueeze(-1).expand(-1, -1, 2))
    assert torch.equal(restored[mask == 0], x[mask == 0])
    same, none, ids = random_masking(x, 0.0, shuffle=False)
    assert torch.equal(same, x) and none.sum() == 0 and torch.equal(ids[0], torch.arange(16))


def test_encoder_decoder_shapes():
    enc, dec = ViTEncoder(32, 8, 3, 32, 2, 2), MaeDecoder(4, 8, 3, 32, 16, 3, 2)
    lat, mask, ids = enc(torch.rand(2, 3, 32, 32), 0.5)
    assert lat.shape == (2, 9, 32) and mask.shape == (2, 16)
    pred, hidden = dec(lat, ids)
    assert pred.shape == (2, 16, 192) and len(hidden) == 3 and hidden[0].shape == (2, 16, 16)
    assert not any(n.endswith("pos_embed") for n, _ in enc.named_parameters())  # fixed, not trained


# --- config, schedule, losses ----------------------------------------------------------------------------


def test_config_presets_and_errors():
    paper = build_config(IsstadConfig, {"preset": "paper"})
    assert (paper.image_size, paper.enc_dim, paper.enc_depth, paper.dec_depth_stage2) == (224, 1024, 24, 12)
    assert paper.max_train_seconds == 0 and paper.stage2_t_max == 30
    with pytest.raises(ConfigError, match="recon_target"):
        build_config(IsstadConfig, {"recon_target": "both"})
    with pytest.raises(ConfigError, match="dec_depth_stage1"):
        build_config(IsstadConfig, {"dec_depth_stage1": 5, "dec_depth_stage2": 4})
    with pytest.raises(ConfigError, match="image_score"):
        build_config(IsstadConfig, {"image_score": "median"})


def test_step_plan_follows_epochs_budget_and_max_steps():
    cfg = build_config(IsstadConfig, {"max_train_seconds": 0})
    m = Isstad.__new__(Isstad)  # plan_steps reads only the config
    m.config = cfg
    assert m.plan_steps(250) == (math.ceil(305 * 250 / 32), math.ceil(200 * 250 / 16))
    m.config = build_config(IsstadConfig, {"max_train_seconds": 900})
    s1, s2 = m.plan_steps(630)
    est = s1 * 32 / cfg.est_images_per_s[0] + s2 * 16 / cfg.est_images_per_s[1]
    assert est <= 0.95 * 900 + 1 and s1 < math.ceil(305 * 630 / 32)
    m.config = build_config(IsstadConfig, {"max_steps": 7})
    assert m.plan_steps(250) == (4, 3)  # the loop's max_steps counts both stages


def test_cyclic_stage2_schedule():
    m = tiny_model(max_steps=0, stage2_epochs=8, stage2_t_max=2, max_train_seconds=0)
    lr2 = m.stages(8)[1].lr_factor  # 2 steps per epoch
    assert lr2(0) == pytest.approx(1.0) and lr2(1) == pytest.approx(1.0)
    assert lr2(4) == pytest.approx(1e-3) and lr2(8) == pytest.approx(1.0)  # period 2 * t_max epochs


def test_ssim_and_losses():
    a = torch.rand(2, 3, 16, 16) * 2 - 1
    assert float(ssim(a, a)) == pytest.approx(1.0, abs=1e-5)
    assert abs(float(ssim(a, torch.rand(2, 3, 16, 16) * 2 - 1))) < 0.1  # independent noise
    assert 0.2 < float(ssim(a, a + 0.3 * torch.randn_like(a))) < 0.95
    m = tiny_model()
    imgs = images(4)
    m.set_stage(STAGE1)
    b1 = m.make_batch(imgs, np.random.default_rng(0), imgs)
    assert set(b1) == {"x"} and b1["x"].shape == (4, 3, 32, 32) and float(b1["x"].abs().max()) <= 1
    out1 = m.training_step(b1, 0)
    assert math.isfinite(float(out1["loss"].detach())) and float(out1["loss"].detach()) > 0
    m.set_stage(STAGE2)
    b2 = m.make_batch(imgs, np.random.default_rng(1), imgs)
    corrupted = b2["mask"].flatten(1).amax(1) > 0
    assert corrupted.any()
    changed = (b2["input"] != b2["clean"]).flatten(1).any(1)
    assert torch.equal(changed & ~corrupted, torch.zeros(4, dtype=torch.bool))  # clean images stay clean
    out2 = m.training_step(b2, 0)
    assert set(out2) >= {"loss", "ce", "mse", "ssim_loss"} and math.isfinite(float(out2["loss"].detach()))
    m.config.recon_target = "input"  # target = the (corrupted) input, as in the published code
    out3 = m.training_step(b2, 0)
    assert float(out3["ce"]) == pytest.approx(float(out2["ce"]))
    assert float(out3["mse"]) != pytest.approx(float(out2["mse"]))


# --- stages -------------------------------------------------------------------------------------------


def test_stage2_starts_from_stage1_decoder_once():
    m = tiny_model()
    m.set_stage(STAGE1)
    assert all(p.requires_grad for p in m.encoder.parameters())
    with torch.no_grad():
        m.decoder1.blocks[0].mlp.fc1.weight.add_(1.0)
    assert not torch.equal(m.decoder2.blocks[0].mlp.fc1.weight, m.decoder1.blocks[0].mlp.fc1.weight)
    m.set_stage(STAGE2)
    assert torch.equal(m.decoder2.blocks[0].mlp.fc1.weight, m.decoder1.blocks[0].mlp.fc1.weight)
    assert torch.equal(m.decoder2.pred.weight, m.decoder1.pred.weight)
    assert not any(p.requires_grad for p in m.encoder.parameters())  # frozen encoder
    assert all(p.requires_grad for p in m.decoder2.parameters())
    # idempotent, and the flag travels with the state_dict: no second copy after a reload
    with torch.no_grad():
        m.decoder1.blocks[0].mlp.fc1.weight.add_(1.0)
    m.set_stage(STAGE2)
    fresh = tiny_model(seed=5)
    fresh.load_state_dict(m.state_dict())
    fresh.set_stage(STAGE2)
    assert not torch.equal(fresh.decoder2.blocks[0].mlp.fc1.weight, fresh.decoder1.blocks[0].mlp.fc1.weight)
    assert_same_weights(fresh, m)


@pytest.mark.parametrize(("crash_step", "saved_at"), [(2, (STAGE2, 2)), (0, (STAGE1, 3))])
def test_resume_in_stage2_gives_identical_weights(tmp_path: Path, crash_step, saved_at):
    imgs = images(10)
    ref = tiny_model()
    res = train(ref, imgs, seed=1, device=CPU, progress=False)
    assert res.steps == {STAGE1: 3, STAGE2: 3} and res.stopped_by == "schedule"

    crashed = tiny_model()
    original = crashed.training_step

    def crash(batch, step):
        if crashed.stage == STAGE2 and step == crash_step:
            raise RuntimeError("simulated crash")
        return original(batch, step)

    crashed.training_step = crash
    ckpt = tmp_path / "isstad.partial"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(crashed, imgs, seed=1, device=CPU, progress=False, ckpt_path=ckpt, checkpoint_every=2)
    meta = read_metadata(ckpt)
    assert (meta["stage"], meta["step"]) == saved_at

    resumed = tiny_model(seed=123)  # different init: everything must come from the checkpoint
    res2 = train(resumed, imgs, seed=1, device=CPU, progress=False, ckpt_path=ckpt, resume=True,
                 checkpoint_every=2)
    assert res2.steps == res.steps
    assert_same_weights(ref, resumed)
    assert not torch.equal(ref.decoder2.blocks[0].attn.qkv.weight, ref.decoder1.blocks[0].attn.qkv.weight)


# --- detector: fit, scoring, persistence --------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted(tiny_category):
    return anomap.create("isstad", **TINY).fit(tiny_category, progress=False)


def test_fit_runs_both_stages_and_scores(fitted, tiny_category):
    assert fitted.info["steps"] == {STAGE1: 3, STAGE2: 3} and fitted.info["stopped_by"] == "schedule"
    assert fitted.calibration.threshold is not None
    model = fitted.model
    x = torch.rand(3, 3, 32, 32)
    m, r = model.components(x)
    assert m.shape == r.shape == (3, 32, 32)
    assert float(m.min()) >= 0 and float(m.max()) <= 1 and float(r.min()) >= 0
    for kind in ("mix_minmax", "product", "prob", "recon"):
        model.config.pixel_map = kind
        scores, maps = model.predict(x)
        assert scores.shape == (3,) and maps.shape == (3, 32, 32)
        assert torch.isfinite(scores).all() and torch.isfinite(maps).all() and float(maps.min()) >= 0
    model.config.pixel_map = "mix_minmax"
    s_mix, _ = model.predict(x)
    model.config.pixel_map = "product"
    s_prod, _ = model.predict(x)
    assert torch.equal(s_mix, s_prod)  # the image score does not depend on the pixel map (as published)
    model.config.image_score = "max"
    s_max, prod_map = model.predict(x)
    assert torch.allclose(s_max, prod_map.flatten(1).max(dim=1).values) and (s_max >= s_prod).all()
    model.config.image_score = "mean"
    model.config.pixel_map = "mix_minmax"
    const = torch.full((1, 3, 32, 32), 0.5)
    assert torch.isfinite(model.predict(const)[1]).all()
    res = fitted.predict(next((tiny_category / "test/spot").glob("*.png")))
    assert res.anomaly_map.shape == (48, 48) and isinstance(res.score, float)


def test_grey_images_and_stage1_scoring(tiny_category):
    m = tiny_model()
    grey = torch.rand(2, 1, 32, 32)
    scores, maps = m.predict(grey)  # stage 2 never ran: falls back to the MAE's reconstruction error
    assert torch.equal(scores, m.predict(grey.expand(-1, 3, -1, -1))[0])
    mm, _ = m.components(grey)
    assert torch.equal(mm, torch.ones_like(mm)) and maps.shape == (2, 32, 32)


def test_save_load_round_trip(fitted, tmp_path: Path):
    path = fitted.save(tmp_path / "isstad.safetensors")
    again = anomap.load(path)
    assert int(again.model.stage2_initialised) == 1
    batch = images(3, seed=7)
    s1, m1 = fitted.predict_raw(batch)
    s2, m2 = again.predict_raw(batch)
    assert np.array_equal(s1, s2) and np.array_equal(m1, m2)


def test_rescore_changes_only_scoring_and_recalibrates(fitted, tiny_category, tmp_path: Path):
    path = fitted.save(tmp_path / "isstad.safetensors")
    det = anomap.load(path)
    before = det.calibration.heldout_scores
    det.rescore({"pixel_map": "prob", "score_model": "stage2"}, tiny_category)
    assert det.config.pixel_map == "prob" and det.model.config.pixel_map == "prob"
    assert det.info["rescored"] == {"pixel_map": "prob", "score_model": "stage2"}
    assert det.calibration.n_heldout == len(before) and det.calibration.heldout_scores != before
    held = anomap.load(path)
    scores, _ = det.predict_raw(images(2, seed=3))
    held.model.config.pixel_map = "prob"
    assert np.array_equal(scores, held.predict_raw(images(2, seed=3))[0])
    with pytest.raises(ConfigError, match="enc_dim.*training"):
        det.rescore({"enc_dim": 64}, tiny_category)
    other = tmp_path / "other"
    other.mkdir()
    Image.fromarray(images(1)[0]).save(other / "zzz.png")
    with pytest.raises(ConfigError, match="held-out images"):
        det.rescore({"pixel_map": "recon"}, other)
    assert det.config.pixel_map == "prob" and det.model.config.pixel_map == "prob"  # a refused rescore changes nothing


# --- MAE checkpoints ---------------------------------------------------------------------------------------


def mae_state(model: Isstad, decoder_blocks: int = 2) -> dict[str, torch.Tensor]:
    """The model's stage-1 weights under MAE's key names, with one extra decoder block (dropped on load)."""
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("encoder."):
            out[k[len("encoder."):]] = v.clone()
        elif k.startswith("decoder1."):
            rest = k[len("decoder1."):]
            name = {"pos_embed": "decoder_pos_embed", "mask_token": "mask_token"}.get(rest, "decoder_" + rest)
            out[name] = v.clone()
    for k, v in list(out.items()):
        if k.startswith("decoder_blocks.0."):
            for i in range(1, decoder_blocks):
                out[k.replace("blocks.0.", f"blocks.{i}.")] = v.clone()
    return out


def test_mae_checkpoint_loads_into_stage1(tmp_path: Path):
    src = tiny_model(seed=1)
    path = tmp_path / "mae.pth"
    torch.save({"model": mae_state(src)}, path)
    dst = tiny_model(seed=2)
    load_mae_checkpoint(dst, path)
    for k, v in src.state_dict().items():
        if k.startswith(("encoder.", "decoder1.")):
            assert torch.equal(dst.state_dict()[k], v), k
    from safetensors.torch import save_file

    enc_only = {k: v for k, v in mae_state(src).items() if not k.startswith("decoder") and k != "mask_token"}
    save_file(enc_only, tmp_path / "vit.safetensors")
    dst2 = tiny_model(seed=3)
    load_mae_checkpoint(dst2, tmp_path / "vit.safetensors")
    assert torch.equal(dst2.encoder.blocks[0].attn.qkv.weight, src.encoder.blocks[0].attn.qkv.weight)


def test_bad_mae_checkpoints_raise_checkpoint_error(tmp_path: Path, tiny_category):
    src = tiny_model(seed=1, enc_dim=64)
    path = tmp_path / "wide.pth"
    torch.save(mae_state(src), path)
    with pytest.raises(CheckpointError,
                       match=r"wide\.pth.*shape mismatch.*cls_token \(1, 1, 64\) != \(1, 1, 32\)"):
        load_mae_checkpoint(tiny_model(), path)
    state = mae_state(tiny_model())
    del state["norm.weight"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "partial.pth")
    target = tiny_model()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"missing encoder\.norm\.weight.*unexpected extra\.weight"):
        load_mae_checkpoint(target, tmp_path / "partial.pth")
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())  # nothing half-loaded
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read the MAE checkpoint"):
        load_mae_checkpoint(tiny_model(), tmp_path / "junk.pth")
    det = anomap.create("isstad", **TINY, mae_checkpoint_path=str(tmp_path / "absent.pth"))
    with pytest.raises(CheckpointError, match="absent.pth.*not found"):
        det.fit(tiny_category, progress=False)
