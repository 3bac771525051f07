"""The AGN's memory: greedy coreset and kNN against brute force, the bank buffer, gtrans's memory modes,
persistence, resume, ONNX parity and ``add_normals``."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import anomap
from anomap.config import build_config
from anomap.errors import AnomapError, ConfigError, DataError
from anomap.export.onnx import export_onnx
from anomap.methods.gtrans import GTrans, GTransConfig
from anomap.metrics.threshold import CalibrationWarning
from anomap.nn.memory import PatchMemory, greedy_coreset, greedy_coreset_radius, knn_distance, project
from conftest import _normal, make_category

TINY = {"image_size": 64, "tr_dim": 32, "tr_depth": 1, "tr_heads": 2, "batch_size": 4, "smoothing_sigma": 1.0,
        "device": "cpu", "num_threads": 1, "min_heldout": 3, "checkpoint_every": 0}

pytestmark = pytest.mark.usefixtures("one_thread")


def _brute_greedy(x: torch.Tensor, n_pick: int, first: int | None, start: torch.Tensor | None = None):
    """Textbook greedy k-center with full squared distances: (picks, covering radius)."""
    d = torch.full((len(x),), float("inf"), dtype=x.dtype)
    if start is not None:
        d = torch.cdist(x, start).pow(2).min(1).values
    picks: list[int] = []
    nxt = first if first is not None else int(d.argmax())
    while len(picks) < n_pick:
        picks.append(nxt)
        d = torch.minimum(d, (x - x[nxt]).pow(2).sum(1))
        d[picks] = -1.0
        nxt = int(d.argmax())
    return picks, float(d.max())


@pytest.mark.parametrize("chunk", [7, 64, 5000])
def test_coreset_equals_brute_force_greedy_k_center(chunk):
    x = torch.randn(600, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    idx, radius = greedy_coreset_radius(x, 40, proj_dim=0, seed=3, chunk=chunk)
    ref, ref_radius = _brute_greedy(x, 40, int(idx[0]))
    assert idx.tolist() == ref and radius == pytest.approx(ref_radius, rel=1e-9)
    assert torch.equal(greedy_coreset(x, 40, proj_dim=0, seed=3, chunk=chunk), idx)
    assert int(greedy_coreset(x, 40, proj_dim=0, seed=4)[0]) != int(idx[0])  # the seed draws the start


def test_coreset_with_projection_is_the_greedy_of_the_projected_points():
    x = torch.randn(500, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    idx = greedy_coreset(x, 30, proj_dim=8, seed=5, chunk=50)
    assert idx.tolist() == _brute_greedy(project(x, 8, 5), 30, int(idx[0]))[0]
    assert project(x, 8, 5).shape == (500, 8) and torch.equal(project(x, 8, 5), project(x, 8, 5))


def test_coreset_continues_from_start_rows_and_stops_at_a_radius():
    x = torch.randn(400, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    bank, rest = x[:30], x[30:]
    idx, radius = greedy_coreset_radius(rest, 25, proj_dim=0, chunk=32, start=bank)
    ref, ref_radius = _brute_greedy(rest, 25, None, start=bank)
    assert idx.tolist() == ref and radius == pytest.approx(ref_radius, rel=1e-9)
    r10 = _brute_greedy(rest, 10, None, start=bank)[1]  # the radius after 10 picks: stop there
    early, left = greedy_coreset_radius(rest, 25, proj_dim=0, chunk=32, start=bank, stop_at=r10 * (1 + 1e-9))
    assert early.tolist() == ref[:10] and left == pytest.approx(r10, rel=1e-9)


def test_coreset_edge_cases_and_candidate_cap():
    x = torch.randn(300, 5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(greedy_coreset(x, 500), torch.arange(300))  # more picks than rows: all of them
    assert len(greedy_coreset(x, 0)) == 0
    dup = torch.cat([x[:3]] * 50)  # 150 rows, 3 distinct: all picks distinct even after the duplicates run out
    assert len(set(greedy_coreset(dup, 10, proj_dim=0).tolist())) == 10
    capped = greedy_coreset(x, 20, max_candidates=60, seed=1)
    assert len(set(capped.tolist())) == 20 and int(capped.max()) < 300


def test_knn_distance_equals_brute_force():
    gen = torch.Generator().manual_seed(5)
    q, bank = torch.randn(70, 9, generator=gen), torch.randn(300, 9, generator=gen)
    full = torch.cdist(q.double(), bank.double())
    for k in (1, 4):
        ref = full.topk(k, largest=False).values.mean(1)
        torch.testing.assert_close(knn_distance(q, bank, k, chunk=64).double(), ref, rtol=1e-4, atol=1e-4)
    exact = knn_distance(bank[:5], bank, 1)  # a query on a bank row: 0, not nan from rounding below zero
    assert torch.isfinite(exact).all() and float(exact.max()) < 1e-2
    with pytest.raises(ValueError, match="k=0"):
        knn_distance(q, bank, 0)


def test_patch_memory_loads_a_bank_of_any_size():
    src = PatchMemory(6)
    assert len(src) == 0 and torch.equal(src(torch.ones(4, 6)), torch.zeros(4))  # empty: off
    src.set_bank(torch.randn(11, 6))
    dst = PatchMemory(6)
    dst.load_state_dict(src.state_dict())
    assert len(dst) == 11 and torch.equal(dst.bank, src.bank)
    with pytest.raises(RuntimeError, match="size mismatch"):
        PatchMemory(5).load_state_dict(src.state_dict())


def test_memory_add_keeps_the_bank_while_there_is_room_and_rethins_when_full():
    from anomap.methods.gtrans.memory import GTransMemory

    gen = torch.Generator().manual_seed(6)
    fit, far = torch.randn(400, 4, generator=gen), torch.randn(30, 4, generator=gen) + 20.0
    mem = GTransMemory([0], [4], 1, grid=(8, 8))
    mem.build(fit, 0.1, 1000, seed=0)
    old, radius = mem.bank.clone(), float(mem.radius)
    assert len(old) == 40 and radius > 0
    mem.add(fit[:50], 1000, seed=0)  # patches like the fit ones: already covered, nothing to add
    assert torch.equal(mem.bank, old)
    mem.add(far, 1000, seed=0)  # a new appearance: appended until it is covered as tightly, nothing dropped
    assert torch.equal(mem.bank[:40], old) and 40 < len(mem) <= 70
    covered = torch.cdist(far, mem.bank).min(1).values.pow(2)
    assert float(covered.max()) <= radius * 1.01
    mem.add(far + 40.0, 50, seed=0)  # over memory_max: a coreset of bank and new rows, 50 rows in all
    assert len(mem) == 50 and float(torch.cdist(far + 40.0, mem.bank).min(1).values.max()) < 20
    assert float(mem.radius) >= radius


@pytest.mark.parametrize("values,match", [
    ({"memory": "on"}, "memory='on'"),
    ({"memory_scales": [0, 0]}, "memory_scales"),
    ({"memory_scales": [3]}, "memory_scales"),
    ({"memory": "fused", "scales": [1, 2], "memory_scales": [0, 1]}, "not a subset of scales"),
    ({"memory_pool": 2}, "memory_pool"),
    ({"memory_pool": 0}, "memory_pool"),
    ({"memory_pool_pad": "reflect"}, "memory_pool_pad"),
    ({"memory_norm": "quantile"}, "memory_norm"),
    ({"memory_image_norm": "cell"}, "memory_image_norm"),
    ({"memory_metric": "cosine"}, "memory_metric"),
    ({"memory_balance": "equal"}, "memory_balance"),
    ({"memory_ratio": 0.0}, "memory_ratio"),
    ({"memory_ratio": 1.5}, "memory_ratio"),
    ({"memory_max": 0}, "memory_max"),
    ({"memory_weight": -0.1}, "memory_weight"),
    ({"memory_weight": 1.1}, "memory_weight"),
    ({"memory_fine_weight": 101.0}, "memory_fine_weight"),
    ({"memory_fine_weight": -0.1}, "memory_fine_weight"),
    ({"memory_fine_weight": 0.4, "memory": "only", "memory_scales": [0]}, "two memory scales"),
    ({"memory_fine_max": 0}, "memory_fine_max"),
])
def test_memory_options_reject_bad_values_in_one_line(values, match):
    with pytest.raises(ConfigError, match=match) as err:
        build_config(GTransConfig, values)
    assert "\n" not in str(err.value)
    assert build_config(GTransConfig, {"scales": [1, 2]}).memory_scales_used == [1]  # []: the trained ones of 0, 1
    assert build_config(GTransConfig, {"scales": [2]}).memory_scales_used == [2]  # else the finest trained
    assert build_config(GTransConfig, {}).memory_scales_used == [0, 1]


def _tiny_memory_model(mode: str, n_fit: int = 10, **over) -> tuple[GTrans, np.ndarray]:
    rng = np.random.default_rng(0)
    imgs = np.stack([_normal(rng, 64) for _ in range(n_fit)])
    torch.manual_seed(0)
    m = GTrans(build_config(GTransConfig, {**TINY, "max_steps": 3, "memory": mode, **over}), 3)
    m.prepare_fit(imgs)
    return m.eval(), imgs


def test_bank_is_a_coreset_of_the_fit_patches_and_off_has_none():
    m, imgs = _tiny_memory_model("fused", memory_ratio=0.25, memory_pool_pad="none")
    assert m.memory is not None and m.memory.bank.shape == (int(np.ceil(0.25 * 10 * 64)), 40 + 112)
    rows, shape = m.memory.rows(m._teacher(torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255))
    assert shape == (10, 8, 8) and rows.shape == (640, 152)  # stride-8 grid, stride 16 upsampled onto it
    fit = m.memory.standardise(rows, *m._feat_stats())
    assert max(float((fit - b).abs().sum(1).min()) for b in m.memory.bank) < 1e-3  # bank rows are fit rows
    # without the zero padding, pooling and upsampling mix each channel convexly: standardising the rows at
    # the end (as prepare_fit must, before the statistics are known) is standardising the teacher's maps first
    means, stds = m._feat_stats()
    feats = m._teacher(torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255)
    first = m.memory.rows([(f - mu) / sd for f, mu, sd in zip(feats, means, stds, strict=True)])[0]
    torch.testing.assert_close(first, fit, rtol=1e-4, atol=1e-4)
    plain, _ = _tiny_memory_model("fused", memory_pool=1, memory_scales=[0])
    raw = plain.memory.standardise(plain.memory.rows(feats)[0], *plain._feat_stats())
    assert float(raw.mean(0).abs().max()) < 1e-4 and float((raw.std(0) - 1).abs().max()) < 1e-2  # per channel
    assert float(m.memory.radius) > 0
    capped, _ = _tiny_memory_model("only", memory_max=17)
    assert len(capped.memory) == 17
    off, _ = _tiny_memory_model("off")
    assert off.memory is None and not any("memory" in k for k in off.state_dict())


def test_fused_map_is_the_weighted_mean_of_student_and_memory_maps():
    m, _ = _tiny_memory_model("fused")
    held = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    m.calibrate(held)
    assert float(m.memory.mean_dist) > 0
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(8))
    maps = {}
    for w in (0.0, 0.5, 1.0):
        m.config.memory_weight = w
        scores, maps[w] = m.predict(x)
        assert torch.equal(scores, maps[w].flatten(1).max(1).values)
    torch.testing.assert_close(maps[0.5], (maps[0.0] + maps[1.0]) / 2, rtol=1e-4, atol=1e-5)  # the blur is linear
    m.config.memory = "only"
    torch.testing.assert_close(m.predict(x)[1], maps[1.0])
    m.config.memory, m.config.memory_weight = "off", 0.5
    torch.testing.assert_close(m.predict(x)[1], maps[0.0])
    # the memory map is normalised by its held-out mean: about 1 on the held-out images themselves
    m.config.memory, m.config.smoothing_sigma = "only", 0.0
    assert float(m.predict(held)[1].mean()) == pytest.approx(1.0, rel=0.15)


def test_memory_norm_location_divides_each_cell_by_its_heldout_mean():
    m, _ = _tiny_memory_model("only", smoothing_sigma=0.0)
    held = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    feats = m._teacher(held)
    d = m.memory.distance_maps(feats, *m._feat_stats())[0]
    m.memory.calibrate(d, prior=0.0)  # no shrinkage: each cell's held-out mean, over the overall mean
    torch.testing.assert_close(m.memory.mean_loc, (d.mean(0) / d.mean()).float(), rtol=1e-5, atol=1e-6)
    loc, plain, fine = m.memory.normalised_maps(feats, *m._feat_stats(), "location", "scale")  # map, image score
    torch.testing.assert_close(loc.mean(0), torch.ones(8, 8), rtol=1e-4, atol=1e-4)  # every cell's mean is 1
    torch.testing.assert_close(plain, d / m.memory.mean_dist)
    assert fine is None  # no fine memory by default
    m.memory.calibrate(d, prior=1e9)  # an overwhelming prior: every cell at the overall mean
    torch.testing.assert_close(m.memory.mean_loc, torch.ones(8, 8), rtol=1e-5, atol=1e-5)


def test_memory_image_norm_scores_images_on_their_own_map_and_leaves_the_anomaly_map():
    m, _ = _tiny_memory_model("only", memory_norm="scale", smoothing_sigma=0.0)
    held = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    m.calibrate(held)
    m.memory.mean_loc.copy_(torch.linspace(0.5, 2.0, 64).reshape(8, 8))  # cells that count differently
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(9))
    scores, amap = m.predict(x)
    m.config.memory_image_norm = "location"
    loc_scores, loc_amap = m.predict(x)
    torch.testing.assert_close(loc_amap, amap)  # the anomaly map keeps memory_norm=scale
    m.config.memory_norm, m.config.memory_image_norm = "location", "same"
    loc_scores_alone, loc_map = m.predict(x)
    torch.testing.assert_close(loc_scores, loc_scores_alone)  # the image score of memory_norm=location
    torch.testing.assert_close(loc_scores, loc_map.flatten(1).max(1).values)
    assert not torch.allclose(loc_scores, scores)
    m.config.memory_norm, m.config.memory_image_norm = "scale", "scale"  # = same
    torch.testing.assert_close(m.predict(x)[0], scores)


def test_memory_metric_mahalanobis_whitens_the_fit_rows_and_every_query():
    plain, imgs = _tiny_memory_model("only")
    assert torch.equal(plain.memory.whiten, torch.eye(152))
    m, _ = _tiny_memory_model("only", memory_metric="mahalanobis")
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255
    before = plain.memory.standardise(plain.memory.rows(plain._teacher(x))[0], *plain._feat_stats())
    after = m.memory.standardise(m.memory.rows(m._teacher(x))[0], *m._feat_stats())  # as queries are
    lam = torch.linalg.eigvalsh(torch.cov(before.double().T)).clamp_min(0)
    # (C + 0.01 I)^-1/2 C (C + 0.01 I)^-1/2 has the eigenvalues lambda / (lambda + 0.01)
    torch.testing.assert_close(torch.linalg.eigvalsh(torch.cov(after.double().T)), lam / (lam + 0.01),
                               rtol=1e-3, atol=1e-3)
    assert max(float((after - b).abs().sum(1).min()) for b in m.memory.bank[:20]) < 1e-2  # bank rows are such rows


def test_memory_balance_scales_weighs_each_scale_block_alike():
    plain, imgs = _tiny_memory_model("only")
    m, _ = _tiny_memory_model("only", memory_balance="scales")
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255
    before = plain.memory.standardise(plain.memory.rows(plain._teacher(x))[0], *plain._feat_stats())
    after = m.memory.standardise(m.memory.rows(m._teacher(x))[0], *m._feat_stats())
    w8, w16 = (152 / (2 * 40)) ** 0.5, (152 / (2 * 112)) ** 0.5  # Lite0: 40 channels at stride 8, 112 at 16
    torch.testing.assert_close(after, torch.cat([before[:, :40] * w8, before[:, 40:] * w16], 1))


def test_memory_pool_pad_zeros_shrinks_only_the_border_cells():
    m, imgs = _tiny_memory_model("only", memory_pool_pad="none")
    z, _ = _tiny_memory_model("only", memory_pool_pad="zeros")
    feats = m._teacher(torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255)
    a, (b, h, w) = m.memory.rows(feats)
    c, _ = z.memory.rows(feats)
    a, c = a.reshape(b, h, w, -1), c.reshape(b, h, w, -1)
    torch.testing.assert_close(c[:, 1:-1, 1:-1, :40], a[:, 1:-1, 1:-1, :40])  # stride 8: inside, no padding
    torch.testing.assert_close(c[:, 0, 1:-1, :40], a[:, 0, 1:-1, :40] * 6 / 9)  # an edge cell: 6 of 9 inside
    torch.testing.assert_close(c[:, 0, 0, :40], a[:, 0, 0, :40] * 4 / 9)  # a corner: 4 of 9


def _save_with_defect(path, size=64, seed=11):
    img = _normal(np.random.default_rng(seed), size)
    img[20:34, 24:38] = 255
    Image.fromarray(img).save(path)


@pytest.mark.parametrize("mode", ["only", "fused"])
def test_detector_modes_find_a_defect(tmp_path, mode):
    data = make_category(tmp_path / "cat", size=64)
    det = anomap.create("gtrans", **TINY, max_steps=4, memory=mode).fit(data, progress=False)
    assert det.info["steps"] == ({} if mode == "only" else {"gtrans": 4})  # "only" trains nothing
    spots = [r.score for r in det.predict(sorted((data / "test/spot").glob("*.png")))]
    goods = [r.score for r in det.predict(sorted((data / "test/good").glob("*.png")))]
    assert min(spots) > max(goods)
    assert export_onnx(det, tmp_path / "m.onnx")["parity"]["passed"]
    if mode == "fused":  # memory_weight is scoring only: a saved model is re-scored and recalibrated
        det.rescore({"memory_weight": 1.0}, data)
        assert det.model.config.memory_weight == 1.0 and det.info["rescored"] == {"memory_weight": 1.0}


def test_fused_model_saves_loads_resumes_and_exports_with_parity(tmp_path, monkeypatch):
    data = make_category(tmp_path / "cat", size=64)
    cfg = {**TINY, "max_steps": 6, "checkpoint_every": 2, "memory": "fused", "memory_ratio": 0.3}
    ref = anomap.create("gtrans", **cfg).fit(data, out=tmp_path / "ref.safetensors", progress=False)
    n_bank = len(ref.model.memory)
    back = anomap.load(tmp_path / "ref.safetensors")
    assert len(back.model.memory) == n_bank > 0  # the bank's size comes back from the file
    torch.testing.assert_close(back.model.memory.bank, ref.model.memory.bank, rtol=0, atol=0)
    img = sorted((data / "test/spot").glob("*.png"))[0]
    assert back.predict(img).score == pytest.approx(ref.predict(img).score, rel=1e-6)

    original = GTrans.training_step

    def crash(self, batch, step):
        if step == 3:
            raise RuntimeError("simulated crash")
        return original(self, batch, step)

    out = tmp_path / "run.safetensors"
    with monkeypatch.context() as patch:
        patch.setattr(GTrans, "training_step", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            anomap.create("gtrans", **cfg).fit(data, out=out, progress=False)
    assert out.with_name(out.name + ".partial").is_file() and not out.exists()
    resumed = anomap.create("gtrans", **cfg).fit(data, out=out, resume=True, progress=False)
    a, b = ref.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bank, buffers and weights

    report = export_onnx(ref, tmp_path / "m.onnx")  # parity on the held-out normals of the dataset
    assert report["parity"]["passed"] and report["parity"]["n_images"] >= 3
    spot = export_onnx(ref, tmp_path / "s.onnx", parity_images=data / "test" / "spot")
    assert spot["parity"]["max_score_diff"] <= 1e-3


def test_add_normals_makes_an_added_image_normal_and_keeps_the_others_ranks(tmp_path):
    data = make_category(tmp_path / "cat", size=64, n_train=14, n_defect=6)
    odd = _normal(np.random.default_rng(99), 64)[:, ::-1].copy()  # the stripes turned: normal, not seen in fit
    odd[..., 2] = 255 - odd[..., 2]
    det = anomap.create("gtrans", **TINY, max_steps=4, memory="only").fit(data, progress=False)
    others = sorted((data / "test").rglob("*.png"))
    before = np.array([r.score for r in det.predict(others)])
    first = det.predict(odd).score
    held = np.array(det.calibration.heldout_scores)
    assert first > det.calibration.threshold and first > held.max()  # it looks anomalous
    det.add_normals([odd])
    assert det.info["added_normals"] == 1 and det.calibration.n_heldout == len(held)  # recalibrated on held-out
    after_score = det.predict(odd).score
    assert after_score <= det.calibration.threshold  # in the normal range now
    after = np.array([r.score for r in det.predict(others)])
    rank_before, rank_after = before.argsort().argsort(), after.argsort().argsort()
    assert np.abs(rank_before - rank_after).max() <= 1  # the others keep their order (within one place)

    fused = anomap.create("gtrans", **TINY, max_steps=4, memory="fused").fit(data, progress=False)
    f0 = fused.predict(odd).score
    fused.add_normals(np.stack([odd]))  # a uint8 batch works too
    assert fused.predict(odd).score < f0  # the student's part of the map is not retrained


def test_add_normals_without_the_heldout_images_keeps_the_calibration(tmp_path):
    data = make_category(tmp_path / "cat", size=64)
    det = anomap.create("gtrans", **TINY, max_steps=2, memory="only").fit(data, progress=False)
    cal = det.calibration.to_dict()
    n_bank = len(det.model.memory)
    det.info["dataset"] = str(tmp_path / "moved")
    img = tmp_path / "new.png"
    _save_with_defect(img)
    with pytest.warns(CalibrationWarning, match="held-out normal images were not found"):
        det.add_normals(img)
    assert det.calibration.to_dict() == cal and len(det.model.memory) > n_bank
    n_bank = len(det.model.memory)
    with pytest.raises(AnomapError, match="folder not found"):
        det.add_normals(img, data=tmp_path / "moved")  # a folder given explicitly must hold them ...
    assert len(det.model.memory) == n_bank  # ... and nothing changed before that was known
    with pytest.raises(ConfigError, match="held-out images were not all found"):
        det.add_normals(img, data=make_category(tmp_path / "other", size=64, n_train=3))
    with pytest.raises(DataError, match="no images") as err:
        det.add_normals([])
    assert "\n" not in str(err.value) and "Fix:" in str(err.value)


def test_add_normals_is_refused_without_a_memory(tmp_path):
    data = make_category(tmp_path / "cat", size=64)
    det = anomap.create("gtrans", **TINY, max_steps=1, memory="off").fit(data, progress=False)
    img = sorted((data / "test/good").glob("*.png"))[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ConfigError, match="memory=off") as err:
            det.add_normals(img)
    assert "\n" not in str(err.value)
    ae = anomap.create("ssl_ae", image_size=32, max_steps=1, width=8, device="cpu", min_heldout=3,
                       checkpoint_every=0).fit(data, progress=False)
    with pytest.raises(ConfigError, match="ssl_ae cannot learn new normal images"):
        ae.add_normals(img)
