"""Tests of the shared synthetic-anomaly generator."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from scipy import ndimage

from anomap.data.corruption import (
    FILL_KINDS,
    PRESETS,
    SHAPE_KINDS,
    CorruptionConfig,
    corrupt,
    corrupt_batch,
    foreground_box,
    get_preset,
    make_grid,
)
from anomap.errors import ConfigError, ImageError

SIZE = 64


def _image(seed: int = 0, channels: int = 3, size: int = SIZE) -> np.ndarray:
    """A smooth textured test image: gradient plus blurred noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = 60 + 120 * (0.5 * yy + 0.5 * xx)
    noise = ndimage.gaussian_filter(rng.normal(0, 40, (size, size, channels)), (1.5, 1.5, 0))
    return np.clip(base[..., None] + noise, 0, 255).astype(np.uint8)


def _pool(n: int = 4, channels: int = 3) -> np.ndarray:
    return np.stack([_image(100 + i, channels) for i in range(n)])


def _changed_outside(img: np.ndarray, out: np.ndarray, mask: np.ndarray, margin: int) -> int:
    grown = ndimage.binary_dilation(mask > 0, iterations=margin) if margin else mask > 0
    changed = np.abs(out.astype(int) - img.astype(int)).max(axis=2) > 0
    return int((changed & ~grown).sum())


def test_presets_exist_and_are_valid():
    for name in ("ssl_ae", "isstad", "validation"):
        assert isinstance(PRESETS[name], CorruptionConfig)
    assert PRESETS["ssl_ae"] == CorruptionConfig()
    iss = PRESETS["isstad"]
    assert iss.n_shapes == (1, 3) and iss.alpha == (1.0, 1.0) and iss.area_limitation
    assert {k for k, v in iss.fills.items() if v > 0} == {"color", "self", "noise"}
    val = PRESETS["validation"]
    assert all(val.shapes.get(k, 0) > 0 for k in SHAPE_KINDS)
    assert all(val.fills.get(k, 0) > 0 for k in FILL_KINDS)
    copy = get_preset("ssl_ae")
    copy.fills["noise"] = 5.0
    assert PRESETS["ssl_ae"].fills["noise"] == 0.2
    with pytest.raises(ConfigError):
        get_preset("nope")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"shapes": {"triangle": 1.0}},
        {"fills": {"noise": 0.0}},
        {"n_shapes": (3, 1)},
        {"shape_area": (0.0, 0.1)},
        {"alpha": (0.5, 1.5)},
        {"self_mode": "mirror"},
    ],
)
def test_invalid_config_raises(kwargs):
    with pytest.raises(ConfigError):
        CorruptionConfig(**kwargs)


def test_lists_become_tuples_and_replace_works():
    cfg = CorruptionConfig(n_shapes=[2, 2], shape_area=[0.02, 0.05])  # type: ignore[arg-type]
    assert cfg.n_shapes == (2, 2) and cfg.shape_area == (0.02, 0.05)
    cfg2 = dataclasses.replace(PRESETS["ssl_ae"], alpha=[1, 1])  # type: ignore[arg-type]
    assert cfg2.alpha == (1.0, 1.0)


def test_deterministic_for_same_seed_and_different_otherwise():
    img, pool = _image(), _pool()
    cfg = PRESETS["validation"]
    a = corrupt(img, np.random.default_rng(7), cfg, pool)
    b = corrupt(img, np.random.default_rng(7), cfg, pool)
    c = corrupt(img, np.random.default_rng(8), cfg, pool)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_shapes_dtypes_mask_values_and_locality(channels, preset):
    cfg = PRESETS[preset]
    pool = _pool(channels=channels)
    rng = np.random.default_rng(1)
    margin = math.ceil(3 * cfg.soft_edge) + 1
    for seed in range(12):
        img = _image(seed, channels)
        out, mask = corrupt(img, rng, cfg, pool)
        assert out.shape == img.shape and out.dtype == np.uint8
        assert mask.shape == img.shape[:2] and mask.dtype == np.float32
        assert set(np.unique(mask)) <= {0.0, 1.0}
        assert _changed_outside(img, out, mask, margin) == 0


@pytest.mark.parametrize("kind", SHAPE_KINDS)
def test_each_shape_alone_and_area_roughly_within_bounds(kind):
    lo, hi = 0.02, 0.08
    cfg = CorruptionConfig(n_shapes=(1, 1), shape_area=(lo, hi), shapes={kind: 1.0}, fills={"const": 1.0})
    rng = np.random.default_rng(3)
    areas = []
    for seed in range(20):
        img = _image(seed)
        out, mask = corrupt(img, rng, cfg)
        assert mask.sum() > 0
        areas.append(mask.mean())
        assert _changed_outside(img, out, mask, 4) == 0
    assert max(areas) <= 1.6 * hi
    assert min(areas) >= 0.15 * lo  # a shape centred near a corner is clipped
    assert np.median(areas) >= 0.5 * lo


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("kind", FILL_KINDS)
def test_each_fill_alone_changes_the_masked_pixels(kind, channels):
    cfg = CorruptionConfig(
        n_shapes=(1, 1), shape_area=(0.05, 0.1), fills={kind: 1.0}, alpha=(1.0, 1.0), soft_edge=0.0
    )
    pool = _pool(channels=channels)
    rng = np.random.default_rng(5)
    for seed in range(6):
        img = _image(seed, channels)
        out, mask = corrupt(img, rng, cfg, pool)
        inside = mask > 0
        assert inside.any()
        diff = np.abs(out.astype(float) - img.astype(float)).mean(axis=2)
        assert diff[inside].mean() >= 8.0
        assert _changed_outside(img, out, mask, 0) == 0


def test_other_fill_without_pool_or_with_only_itself_falls_back():
    cfg = CorruptionConfig(n_shapes=(1, 1), fills={"other": 1.0}, alpha=(1.0, 1.0))
    img = _image()
    for pool in (None, img[None]):
        out, mask = corrupt(img, np.random.default_rng(0), cfg, pool)
        assert mask.sum() > 0 and not np.array_equal(out, img)


def test_other_fill_never_pastes_the_same_image_in_place():
    cfg = CorruptionConfig(n_shapes=(1, 1), fills={"other": 1.0}, alpha=(1.0, 1.0), soft_edge=0.0)
    img = _image()
    pool = np.stack([img, img, _image(9)])  # the image itself twice, one other image
    rng = np.random.default_rng(2)
    for _ in range(10):
        out, mask = corrupt(img, rng, cfg, pool)
        assert np.abs(out.astype(int) - img)[mask > 0].mean() > 5


def test_bad_inputs_raise_image_error():
    cfg = PRESETS["ssl_ae"]
    rng = np.random.default_rng(0)
    with pytest.raises(ImageError):
        corrupt(_image().astype(np.float32), rng, cfg)  # type: ignore[arg-type]
    with pytest.raises(ImageError):
        corrupt(_image()[..., :2], rng, cfg)
    with pytest.raises(ImageError):
        corrupt(_image(), rng, cfg, pool=_pool()[:, :32])


def test_corrupt_batch_shapes_and_determinism():
    images = _pool(5)
    cfg = PRESETS["ssl_ae"]
    a, ma = corrupt_batch(images, np.random.default_rng(4), cfg)
    b, mb = corrupt_batch(images, np.random.default_rng(4), cfg, pool=None)
    assert a.shape == images.shape and a.dtype == np.uint8
    assert ma.shape == images.shape[:3] and ma.dtype == np.float32
    assert np.array_equal(a, b) and np.array_equal(ma, mb)
    assert (ma.reshape(5, -1).sum(1) > 0).all()


def test_zero_shapes_leave_the_image_alone():
    cfg = CorruptionConfig(n_shapes=(0, 0))
    img = _image()
    out, mask = corrupt(img, np.random.default_rng(0), cfg)
    assert np.array_equal(out, img) and mask.sum() == 0


def test_foreground_box_and_area_limitation():
    img = np.full((128, 128, 3), 20, dtype=np.uint8)
    img[40:80, 50:90] = 200  # bright part on a dark background
    t, b, left, r = foreground_box(img)
    assert t <= 40 and b >= 80 and left <= 50 and r >= 90
    assert t >= 25 and b <= 95 and left >= 40 and r <= 100  # widened 20% / 10% only
    assert foreground_box(np.zeros((64, 64, 3), np.uint8)) == (0, 64, 0, 64)
    cfg = CorruptionConfig(n_shapes=(1, 1), shape_area=(0.005, 0.01), area_limitation=True)
    rng = np.random.default_rng(0)
    for _ in range(10):
        _, mask = corrupt(img, rng, cfg)
        cy, cx = ndimage.center_of_mass(mask)
        assert t - 3 <= cy <= b + 3 and left - 3 <= cx <= r + 3


def test_remove_dark_and_flip_mode_run():
    cfg = dataclasses.replace(PRESETS["isstad"], remove_dark=True)
    out, mask = corrupt(_image(), np.random.default_rng(0), cfg)
    assert out.shape == (SIZE, SIZE, 3) and mask.sum() > 0


def test_make_grid():
    grid = make_grid([_image(), _image(1, 1), np.ones((SIZE, SIZE), np.float32)], ncol=2, pad=2)
    assert grid.dtype == np.uint8 and grid.shape == (2 * (SIZE + 2) + 2, 2 * (SIZE + 2) + 2, 3)
    assert (grid[SIZE + 4 : 2 * SIZE + 4, 2 : SIZE + 2] == 255).all()  # the float mask, scaled
