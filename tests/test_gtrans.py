import math

import numpy as np
import pytest
import torch

import anomap
from anomap.cli import main as cli_main
from anomap.config import build_config, config_to_dict
from anomap.errors import CheckpointError, ConfigError
from anomap.methods.gtrans import GTrans, GTransConfig
from anomap.nn.gtrans_student import Student
from anomap.train.checkpoint import load_checkpoint, save_checkpoint
from anomap.train.loop import train
from anomap.train.resume import check_compatible
from conftest import _normal

TINY = {"image_size": 64, "tr_dim": 32, "tr_depth": 1, "tr_heads": 2, "batch_size": 4, "lr": 2e-3,
        "smoothing_sigma": 1.0, "device": "cpu", "num_threads": 1, "memory": "off"}  # the student alone


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("values,match", [
    ({"teacher_arch": "wide_resnet50_2"}, "teacher_weights"),
    ({"preset": "paper"}, "teacher_weights"),
    ({"teacher_arch": "vgg16"}, "teacher_arch"),
    ({"distance": "l1"}, "distance"),
    ({"map_heads": "tokens"}, "map_heads"),
    ({"map_norm": "pixel"}, "map_norm"),
    ({"scales": [0, 3]}, "scales"),
    ({"scales": [1, 2], "map_scales": [0]}, "map_scales"),
    ({"map_scales": [1, 1]}, "map_scales"),
    ({"image_size": 80}, "multiple of 32"),
    ({"warmup_frac": 1.0}, "warmup_frac"),
    ({"hard_fraction": 1.5}, "hard_fraction"),
    ({"fine_tokens": "unshuffle"}, "fine_tokens"),
    ({"teacher_pool": 2}, "teacher_pool"),
    ({"teacher_pool": 0}, "teacher_pool"),
    ({"hard_fraction": -0.1}, "hard_fraction"),
    ({"image_score": "mean"}, "image_score"),
    ({"topk_fraction": 0.0}, "topk_fraction"),
])
def test_config_errors(values, match):
    with pytest.raises(ConfigError, match=match):
        build_config(GTransConfig, values)


@pytest.mark.parametrize("fine_tokens", ["pool", "shuffle"])
def test_student_token_grid_and_shapes(fine_tokens):
    s = Student((40, 112, 320), (8, 16, 32), dim=32, depth=1, heads=2, fine_tokens=fine_tokens)
    n_tokens = []
    s.blocks[0].register_forward_hook(lambda mod, inp, out: n_tokens.append(inp[0].shape[1]))
    with torch.no_grad():
        feats, toks = s(torch.rand(1, 3, 224, 224))
    expect = [(1, 40, 28, 28), (1, 112, 14, 14), (1, 320, 7, 7)]
    assert [tuple(f.shape) for f in feats] == expect and [tuple(t.shape) for t in toks] == expect
    assert n_tokens == [196 + 196 + 49]  # either way the finest grid enters the Transformer at half resolution


def test_shuffled_fine_tokens_keep_the_finest_resolution():
    """A target alternating from cell to cell of the finest grid: the pooled tokens, upsampled bilinearly,
    cannot follow it; the shuffled ones predict each token's 2x2 cells and can."""
    torch.manual_seed(0)
    x = torch.rand(4, 3, 64, 64)
    sign = (torch.arange(8)[:, None] + torch.arange(8)[None]) % 2 * 2.0 - 1  # 8x8 checkerboard at stride 8
    target = sign.expand(4, 4, 8, 8)
    losses = {}
    for mode in ("pool", "shuffle"):
        torch.manual_seed(0)
        s = Student((4, 8, 8), (8, 16, 32), dim=32, depth=1, heads=2, fine_tokens=mode)
        opt = torch.optim.Adam(s.parameters(), lr=3e-3)
        for _ in range(60):
            loss = (s(x)[1][0] - target).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses[mode] = float(loss.detach())
    assert losses["pool"] > 0.5  # close to the variance of the target (1): the pattern is out of its reach
    assert losses["shuffle"] < 0.1


def _tiny_trained(steps: int = 40, **over) -> tuple[GTrans, list[dict]]:
    rng = np.random.default_rng(0)
    imgs = np.stack([_normal(rng, 64) for _ in range(12)])
    torch.manual_seed(0)
    m = GTrans(build_config(GTransConfig, {**TINY, "max_steps": steps, **over}), 3)
    m.prepare_fit(imgs)
    res = train(m, imgs, seed=0, device=torch.device("cpu"), progress=False, log_every=5)
    m.calibrate(torch.from_numpy(np.stack([_normal(rng, 64) for _ in range(4)])).permute(0, 3, 1, 2) / 255)
    return m, res.history


def test_tiny_training_lowers_loss_and_maps_show_a_pasted_defect():
    m, hist = _tiny_trained()
    assert hist[-1]["loss"] < 0.7 * hist[0]["loss"]
    img = _normal(np.random.default_rng(5), 64)
    clean = torch.from_numpy(img[None]).permute(0, 3, 1, 2).float() / 255
    img[20:34, 28:42] = (250, 40, 40)
    scores, maps = m.predict(torch.from_numpy(img[None]).permute(0, 3, 1, 2).float() / 255)
    assert maps.shape == (1, 64, 64) and float(scores[0]) == pytest.approx(float(maps.max()))
    y, x = divmod(int(maps[0].argmax()), 64)
    assert 16 <= y < 38 and 24 <= x < 46  # the peak is on the defect (4 px margin for the blur)
    inside = maps[0, 20:34, 28:42].mean()
    outside = torch.cat([maps[0, :10].flatten(), maps[0, -10:].flatten()]).mean()
    # at 64 px the coarsest teacher grid is 2x2, so the defect raises that scale everywhere
    assert inside > 1.2 * outside
    assert float(scores[0]) > 2 * float(m.predict(clean)[0][0])


def test_grey_images_and_ablation_knobs():
    m = GTrans(build_config(GTransConfig, {**TINY, "scales": [1], "distance": "cos"}), 1)
    m.eval()
    scores, maps = m.predict(torch.rand(2, 1, 64, 64))
    assert scores.shape == (2,) and maps.shape == (2, 64, 64) and m.map_mean.shape == (1,)
    t, p = torch.randn(2, 8, 3, 3), torch.randn(2, 8, 3, 3)
    m2 = GTrans(build_config(GTransConfig, {**TINY, "distance": "l2"}), 3)
    assert torch.allclose(m2.distance(t, p), (t - p).pow(2).mean(1))
    assert torch.allclose(m.distance(t, 2 * t), torch.zeros(2, 3, 3), atol=1e-6)


def test_teacher_pool_averages_each_targets_neighbourhood():
    x = torch.rand(2, 3, 64, 64)
    raw = GTrans(build_config(GTransConfig, TINY), 3)
    pooled = GTrans(build_config(GTransConfig, {**TINY, "teacher_pool": 3}), 3)
    pooled.teacher.load_state_dict(raw.teacher.state_dict())
    for r, p in zip(raw._teacher(x), pooled._teacher(x), strict=True):
        assert p.shape == r.shape
        assert torch.allclose(p[..., 1, 1], r[..., :3, :3].mean(dim=(-2, -1)), atol=1e-6)  # inner cell: 3x3
        assert torch.allclose(p[..., 0, 0], r[..., :2, :2].mean(dim=(-2, -1)), atol=1e-6)  # corner: its 4 cells


def test_hard_fraction_averages_the_hardest_locations_only():
    d = torch.arange(40, dtype=torch.float32).view(2, 4, 5)  # 40 locations, values 0..39
    plain = GTrans(build_config(GTransConfig, {**TINY, "hard_fraction": 0.0}), 3)
    assert float(plain._loss_term(d)) == pytest.approx(19.5)
    hard = GTrans(build_config(GTransConfig, TINY), 3)
    assert hard.config.hard_fraction == 0.1  # the default
    paper = build_config(GTransConfig, {"preset": "paper", "teacher_weights": "wrn50.pth"})
    assert paper.hard_fraction == 0.0  # the paper scale keeps METHODS.md's plain mean
    assert float(hard._loss_term(d)) == pytest.approx((39 + 38 + 37 + 36) / 4)  # the top 10%: 4 of 40
    hard.config.hard_fraction = 0.001  # fewer than one location: the single hardest one
    assert float(hard._loss_term(d)) == 39.0
    hard.config.hard_fraction = 1.0
    assert float(hard._loss_term(d)) == pytest.approx(19.5)
    _, hist = _tiny_trained(steps=20, hard_fraction=0.25)  # it trains: the hard loss goes down too
    assert hist[-1]["loss"] < hist[0]["loss"]


def test_map_heads_use_their_own_calibration_and_both_averages_them():
    m, _ = _tiny_trained(steps=10)
    m.eval()
    assert float(m.map_mean_feat.min()) > 0 and not torch.allclose(m.map_mean_feat, m.map_mean)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    maps = {}
    for heads in ("token", "feature", "both"):
        m.config.map_heads = heads
        scores, maps[heads] = m.predict(x)
        assert torch.equal(scores, maps[heads].flatten(1).max(1).values)
    m.config.map_heads = "token"
    m.config.image_score = "topk_mean"  # the mean of the top 1% of the 64x64 map: its 41 largest values
    top, _ = m.predict(x)
    torch.testing.assert_close(top, maps["token"].flatten(1).topk(41).values.mean(1))
    assert (top <= maps["token"].flatten(1).max(1).values).all()
    m.config.image_score = "max"
    # the blur is linear: the "both" map is the mean of the two one-head maps
    torch.testing.assert_close(maps["both"], (maps["token"] + maps["feature"]) / 2, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(maps["token"], maps["feature"])


def test_fine_feature_takes_the_finest_scale_from_the_feature_head():
    m, _ = _tiny_trained(steps=10)
    m.eval()
    assert m.config.map_heads == "fine_feature"  # the CPU default
    paper = build_config(GTransConfig, {"preset": "paper", "teacher_weights": "wrn50.pth"})
    assert paper.map_heads == "token"  # the paper scale keeps METHODS.md's token-head map
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))

    def map_of(heads: str, scales: list[int]) -> torch.Tensor:
        m.config.map_heads, m.config.map_scales = heads, scales
        return m.predict(x)[1]

    mixed = map_of("fine_feature", [])
    finest_feature, coarser_token = map_of("feature", [0]), map_of("token", [1, 2])
    torch.testing.assert_close(map_of("fine_feature", [0]), finest_feature)
    torch.testing.assert_close(map_of("fine_feature", [1, 2]), coarser_token)
    # the blur is linear: one scale from the feature head, two from the token heads, each over its own mean
    torch.testing.assert_close(mixed, (finest_feature + 2 * coarser_token) / 3, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(mixed, map_of("token", []))


def test_files_without_later_keys_are_refused_with_the_fix(tiny_category, tmp_path, capsys):
    """A model file or training checkpoint written by a development version of 0.1.0, before map_heads /
    hard_fraction existed, is refused: today's defaults would change what it does."""
    det = anomap.create("gtrans", **TINY, max_steps=2, min_heldout=3, checkpoint_every=0)
    det.fit(tiny_category, progress=False)
    tensors, meta = load_checkpoint(det.save(tmp_path / "new.safetensors"))
    assert anomap.load(tmp_path / "new.safetensors").config == det.config
    for key in ("map_heads", "hard_fraction"):
        del meta["config"][key]
    save_checkpoint(tmp_path / "old.safetensors", tensors, meta)
    with pytest.raises(CheckpointError, match=r"development version .*hard_fraction, map_heads.*Fix: retr"):
        anomap.load(tmp_path / "old.safetensors")
    code = cli_main(["predict", str(tmp_path / "old.safetensors"), str(tiny_category / "test" / "good")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "development version" in err[0] and "Fix: retrain" in err[0]

    state = {"kind": "train_state", "method": "gtrans", "config": meta["config"], "planned": {"gtrans": 2},
             "n_images": 5}
    with pytest.raises(CheckpointError, match=r"different config \(hard_fraction, map_heads\)"):
        check_compatible(state, {"config": config_to_dict(det.config)}, {"gtrans": 2}, 5,
                         tmp_path / "old.partial")


def test_map_scales_picks_the_scales_that_make_the_map():
    m, _ = _tiny_trained(steps=10)
    m.eval()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    _, full = m.predict(x)
    one = []
    for k in (0, 1, 2):
        m.config.map_scales = [k]
        one.append(m.predict(x)[1])
    m.config.map_scales = [0, 1]
    _, two = m.predict(x)
    m.config.map_scales = []
    # the blur is linear: all scales = the mean of the one-scale maps; [0, 1] = the mean of those two
    torch.testing.assert_close(full, sum(one) / 3, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(two, (one[0] + one[1]) / 2, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(one[0], one[2])


def test_map_norm_location_evens_out_a_fixed_position_artefact():
    m, _ = _tiny_trained(steps=10)
    m.eval()
    gen = torch.Generator().manual_seed(5)
    held = torch.rand(12, 3, 64, 64, generator=gen)
    held[:, :, :16, :16] = 1.0  # every normal image has a bright corner: the student misses it at the same place
    m.calibrate(held)
    grid = m.map_loc0_0
    assert grid.shape == (64 // 8, 64 // 8) and float(grid.min()) > 0
    n, prior = len(held), 5.0  # LOCATION_PRIOR: the mean over the grid is (n + prior m) / (n + prior) / m = 1
    assert float(grid.mean()) == pytest.approx(1.0, rel=1e-4) and n / (n + prior) < 1
    maps = {}
    for norm in ("scale", "location"):
        m.config.map_norm = norm
        maps[norm] = m.predict(held)[1].mean(0)
    m.config.map_norm = "scale"

    def corner_excess(a):
        return float(a[:12, :12].mean() / a[24:40, 24:40].mean())

    assert corner_excess(maps["location"]) < corner_excess(maps["scale"])
    assert abs(corner_excess(maps["location"]) - 1) < abs(corner_excess(maps["scale"]) - 1)


def test_map_norm_quantile_maps_each_scale_by_its_heldout_quantiles():
    m, _ = _tiny_trained(steps=10)
    m.eval()
    held = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    m.calibrate(held)
    q = m.map_quant
    assert q.shape == (2, 3, 2) and bool((q[..., 1] > q[..., 0]).all())
    targets, _, tok_preds = m._forward(held)
    d = m.distance(targets[2], tok_preds[2]).detach().flatten().double().numpy()
    assert float(q[0, 2, 0]) == pytest.approx(np.quantile(d, 0.9), rel=1e-5)
    assert float(q[0, 2, 1]) == pytest.approx(np.quantile(d, 0.995), rel=1e-5)
    # the map is the mean of (d - q_a) / (q_b - q_a) over the scales: with one scale, a fixed affine
    # function of the scale-mean map
    m.config.map_scales, m.config.map_heads = [2], "token"
    maps = {}
    for norm in ("scale", "quantile"):
        m.config.map_norm = norm
        maps[norm] = m.predict(held)[1]
    q_a, q_b = (float(v) for v in q[0, 2])
    mean = float(m.map_mean[2])
    torch.testing.assert_close(maps["quantile"], (maps["scale"] * mean - q_a) / (q_b - q_a), rtol=1e-4, atol=1e-4)


def test_a_state_without_the_map_buffers_is_refused():
    """Development files lacked map_mean_feat / map_loc* / map_quant; they are not filled in any more."""
    m = GTrans(build_config(GTransConfig, TINY), 3)
    state = {k: v for k, v in m.state_dict().items()
             if k not in ("map_mean_feat", "map_quant") and not k.startswith("map_loc")}
    with pytest.raises(RuntimeError, match="Missing key.*map_mean_feat"):
        GTrans(build_config(GTransConfig, TINY), 3).load_state_dict(state)


def test_fit_save_load_round_trip(tiny_category, tmp_path):
    det = anomap.create("gtrans", **TINY, max_steps=3, min_heldout=3, checkpoint_every=0)
    det.fit(tiny_category, progress=False)
    assert float(det.model.map_mean.min()) > 0 and det.calibration.threshold is not None
    path = det.save(tmp_path / "g.safetensors")
    back = anomap.load(path)
    img = next((tiny_category / "test/spot").glob("*.png"))
    a, b = det.predict(img), back.predict(img)
    assert a.anomaly_map.shape == (48, 48) and a.score == pytest.approx(b.score, rel=1e-5)
    assert np.allclose(a.anomaly_map, b.anomaly_map, rtol=1e-4, atol=1e-6)


def test_schedule_is_planned_within_the_time_budget():
    """CPU default: the paper's epochs, cut so that the cosine schedule ends inside max_train_seconds."""
    small = GTrans(build_config(GTransConfig, {"max_train_seconds": 540}), 3)
    bs = small.config.batch_size
    assert small.stages(49)[0].steps == math.ceil(200 * 49 / bs)  # a small category gets all epochs
    big = small.stages(630)[0].steps
    assert big == int(0.95 * 540 * small.config.est_images_per_s / bs) < math.ceil(200 * 630 / bs)
    unlimited = GTrans(build_config(GTransConfig, {"max_train_seconds": 0, "batch_size": 16}), 3)
    assert unlimited.stages(630)[0].steps == math.ceil(200 * 630 / 16)


def test_warmup_frac_ramps_the_rate_then_follows_the_cosine():
    plain = GTrans(build_config(GTransConfig, {"max_train_seconds": 0}), 3).stages(40)[0]
    warm = GTrans(build_config(GTransConfig, {"max_train_seconds": 0, "warmup_frac": 0.1}), 3).stages(40)[0]
    assert plain.steps == warm.steps == 1000
    assert plain.lr_factor(0) == 1.0 and warm.lr_factor(0) == pytest.approx(0.01)
    assert warm.lr_factor(49) == pytest.approx(0.5) and warm.lr_factor(99) == pytest.approx(1.0)
    assert warm.lr_factor(999) == pytest.approx(plain.lr_factor(999), abs=1e-6)
    assert warm.lr_factor(550) == pytest.approx(plain.lr_factor(500), abs=1e-6)  # the cosine starts 100 steps later


def test_teacher_feature_cache_gives_the_live_loss(one_thread):
    rng = np.random.default_rng(0)
    imgs = np.stack([_normal(rng, 64) for _ in range(6)])
    m = GTrans(build_config(GTransConfig, TINY), 3).eval()
    m.prepare_fit(imgs)
    batch = m.make_batch(imgs[[4, 1]], rng, imgs)
    assert batch["cached"].tolist() == [4, 1]
    live = {"image": batch["image"]}
    with torch.no_grad():
        assert float(m.training_step(batch, 0)["loss"]) == pytest.approx(float(m.training_step(live, 0)["loss"]),
                                                                         rel=1e-5)
    other = np.stack([_normal(rng, 64)])
    assert "cached" not in m.make_batch(other, rng, imgs)  # an unseen image runs the teacher
