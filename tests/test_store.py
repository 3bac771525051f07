"""The on-disk image cache (data/store.py) and streamed fitting/calibration in Detector."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import anomap
from anomap.config import build_config
from anomap.data.corruption import PRESETS, corrupt_batch
from anomap.data.store import ImageStore, build_store
from anomap.data.transforms import load_stack
from anomap.errors import ImageError

pytestmark = pytest.mark.usefixtures("one_thread")


def write_images(folder, n: int = 9, size: int = 20, seed: int = 0) -> list:
    """Colour PNGs of varying sizes (so that resizing is exercised)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        side = size + (i % 3) * 7
        p = folder / f"{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (side, side + 3, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


@pytest.fixture
def stored(tmp_path):
    paths = write_images(tmp_path / "imgs")
    ref = load_stack(paths, (16, 18), 3)
    store = build_store(paths, (16, 18), 3, tmp_path / "cache", workers=2)
    return paths, ref, store


def test_rows_equal_load_stack_and_cache_is_reused(stored, tmp_path, monkeypatch):
    paths, ref, store = stored
    assert isinstance(store, ImageStore)
    assert store.shape == ref.shape and store.dtype == np.uint8 and store.ndim == 4 and len(store) == len(ref)
    np.testing.assert_array_equal(np.asarray(store), ref)
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".json", ".u8"]  # no temp file left

    def boom(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr("anomap.data.store.load_resized", boom)
    again = build_store(paths, (16, 18), 3, tmp_path / "cache")  # finished cache: opened, not rebuilt
    np.testing.assert_array_equal(again[:], ref)
    with pytest.raises(AssertionError, match="decoded again"):  # other size -> other key -> rebuilt
        build_store(paths, (8, 8), 3, tmp_path / "cache", workers=1)


@pytest.mark.parametrize("key", [
    0, -1, 4, np.int64(3), slice(None), slice(2, 7), slice(None, None, 3), slice(7, 1, -2), slice(5, 5),
    [3, 1, 1, 8], np.array([2, 3, 4]), np.array([-1, 0]), np.arange(9) % 2 == 0, np.zeros(0, np.int64),
    (2, slice(3, 9), slice(1, 5)), (np.array([4, 0]), slice(None, 6)), (1, 2, 3), (slice(1, 3), slice(2, 4)),
])
def test_indexing_matches_numpy(stored, key):
    _, ref, store = stored
    got, want = store[key], ref[key]
    assert isinstance(got, np.ndarray) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)
    if got.ndim:
        got[...] = 0  # a writable copy: the cache is unchanged
        np.testing.assert_array_equal(store[key], want)


def test_views_and_errors(stored):
    _, ref, store = stored
    view = store.rows(3, 8)
    assert len(view) == 5 and view.shape == (5, *ref.shape[1:])
    np.testing.assert_array_equal(view[[0, 4]], ref[[3, 7]])
    np.testing.assert_array_equal(list(view), list(ref[3:8]))
    assert len(store.rows(8, 100)) == 1
    for bad in (9, -10, [0, 9], np.array([0.5])):
        with pytest.raises(IndexError):
            store[bad]
    with pytest.raises(IndexError, match="one row index array"):
        store[np.array([0, 1]), np.array([0, 1])]


def test_broken_image_names_the_file_and_leaves_no_cache(tmp_path):
    paths = write_images(tmp_path / "imgs", n=6)
    paths[4].write_bytes(paths[4].read_bytes()[:60])  # truncated PNG
    with pytest.raises(ImageError, match="04.png"):
        build_store(paths, (16, 16), 3, tmp_path / "cache", workers=2)
    assert list((tmp_path / "cache").iterdir()) == []


def test_methods_get_the_same_batches_from_a_store(stored):
    """Corruption pool draws, isstad's crops and repairs, gtrans statistics: a store is a drop-in array."""
    from anomap.methods.gtrans import GTrans, GTransConfig
    from anomap.methods.isstad import Isstad
    from anomap.methods.isstad.config import STAGE1, STAGE2, IsstadConfig

    paths, ref, store = stored
    idx = np.array([5, 0, 7, 2])
    a, ma = corrupt_batch(ref[idx], np.random.default_rng(3), PRESETS["ssl_ae"], pool=ref)
    b, mb = corrupt_batch(store[idx], np.random.default_rng(3), PRESETS["ssl_ae"], pool=store)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ma, mb)

    isstad = Isstad(build_config(IsstadConfig, {"image_size": 32, "patch_size": 8, "enc_dim": 16, "enc_depth": 1,
                                                "enc_heads": 2, "dec_dim": 16, "dec_heads": 2}), 3)
    square, st = load_stack(paths, 32, 3), build_store(paths, (32, 32), 3, store.path.parent / "sq")
    for stage in (STAGE1, STAGE2):
        isstad.set_stage(stage)
        x = isstad.make_batch(square[idx], np.random.default_rng(1), square)
        y = isstad.make_batch(st[idx], np.random.default_rng(1), st)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)

    gt = GTrans(build_config(GTransConfig, {"image_size": 32, "tr_dim": 32, "tr_depth": 1, "tr_heads": 2}), 3)
    gt.prepare_fit(square[:5])
    want = gt.feat_std1.clone()
    gt.prepare_fit(st.rows(0, 5))
    assert torch.equal(gt.feat_std1, want)


def test_streamed_fit_matches_in_memory_fit(tiny_category, tiny_cfg, tmp_path, monkeypatch):
    """Forced streaming (threshold 0) trains the same weights and calibrates the same; the cache is removed."""
    ram = anomap.create("ssl_ae", **tiny_cfg).fit(tiny_category, out=tmp_path / "a" / "m.safetensors",
                                                  progress=False)
    monkeypatch.setenv("ANOMAP_STREAM_MIN_BYTES", "0")
    streamed = anomap.create("ssl_ae", **tiny_cfg).fit(tiny_category, out=tmp_path / "b" / "m.safetensors",
                                                       progress=False)
    sa, sb = ram.model.state_dict(), streamed.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert ram.calibration.to_dict() == streamed.calibration.to_dict()
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["m.safetensors"]
    streamed.fit(tiny_category, progress=False)  # without out: a temporary cache, removed too


def test_calibration_subsamples_maps_beyond_the_cap(tiny_category, tiny_cfg, monkeypatch):
    det = anomap.create("ssl_ae", **tiny_cfg).fit(tiny_category, progress=False)
    held = load_stack(sorted((tiny_category / "test/good").glob("*.png")), 32, 3)
    exact = det.calibrate(held).to_dict()
    _, maps = det.predict_raw(held)
    assert exact["map_scale"] == pytest.approx(float(np.quantile(maps, 0.999)))
    assert exact["map_low"] == pytest.approx(float(np.quantile(maps, 0.5)))
    monkeypatch.setattr("anomap.detector.MAP_SAMPLE_CAP", 1000)  # 4 maps of 32x32: every 3rd row/column
    sampled = det.calibrate(held).to_dict()
    assert sampled["threshold"] == exact["threshold"] and sampled["heldout_scores"] == exact["heldout_scores"]
    assert sampled["map_low"] == pytest.approx(float(np.quantile(maps[:, ::3, ::3], 0.5)))
    assert sampled["map_scale"] == pytest.approx(exact["map_scale"], rel=0.2)
