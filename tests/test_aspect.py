"""aspect=fit: the working shape follows the fit images' aspect ratio (gtrans_memory's default), through fit,
prediction, calibration, save/load and ONNX; square when the ratios vary; one-line errors where it cannot work."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import anomap
from anomap.data.aspect import fit_shape
from anomap.errors import ConfigError
from anomap.export.onnx import export_onnx
from anomap.runtime.backend import OnnxBackend
from anomap.train.checkpoint import load_checkpoint, save_checkpoint
from conftest import make_category

SMALL = {"image_size": 64, "smoothing_sigma": 1.0, "device": "cpu", "num_threads": 1, "min_heldout": 3}

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fit_shape_keeps_a_shared_aspect_at_about_the_squares_pixel_count():
    (h, w), why = fit_shape([(512, 208)] * 20, 320, 32)
    assert (h, w) == (192, 512) and "2.46" in why
    assert abs(h * w / 320**2 - 1) < 0.1
    (h, w), _ = fit_shape([(208, 512)] * 19 + [(210, 512)], 320, 32)  # tall, one slightly off
    assert (h, w) == (512, 192)
    assert fit_shape([(500, 500)] * 5, 320, 32)[0] == (320, 320)
    (h, w), _ = fit_shape([(4000, 100)] * 5, 64, 32)  # extreme: each side at least two multiples
    assert h == 64 and w % 32 == 0


def test_fit_shape_stays_square_when_the_ratios_vary_or_there_are_none():
    sizes = [(100, 100), (300, 100), (100, 300), (200, 100), (100, 250)] * 4
    (hw, why) = fit_shape(sizes, 320, 32)
    assert hw == (320, 320) and "vary" in why
    assert fit_shape([], 320, 32)[0] == (320, 320)


def _widen(root):
    """Stretch every image (and mask) of a category to 2.5x its width: one shared, wide aspect ratio."""
    for p in root.rglob("*.png"):
        img = Image.open(p)
        img.resize((img.width * 5 // 2, img.height), Image.Resampling.NEAREST).save(p)
    return root


def test_a_wide_category_is_seen_at_its_aspect_end_to_end(tmp_path):
    data = _widen(make_category(tmp_path / "wide", size=40))  # 100 x 40 images
    det = anomap.create("gtrans_memory", **SMALL).fit(data, out=tmp_path / "m.safetensors", progress=False)
    assert det.config.work_shape == [64, 96] and det.config.work_hw == (64, 96)
    assert det.info["aspect"].startswith("64x96: aspect ratio 2.50")
    assert tuple(det.model.memory.mean_loc.shape) == (8, 12)  # calibrated per cell of the wide grid
    assert not (det.model.memory.mean_loc == 1).all()
    spots = det.predict(sorted((data / "test/spot").glob("*.png")))
    goods = det.predict(sorted((data / "test/good").glob("*.png")))
    assert spots[0].anomaly_map.shape == (40, 100)  # back in the image's own frame
    assert min(r.score for r in spots) > max(r.score for r in goods)
    back = anomap.load(tmp_path / "m.safetensors")
    assert back.config.work_hw == (64, 96)
    assert [r.score for r in back.predict(sorted((data / "test/spot").glob("*.png")))] == pytest.approx(
        [r.score for r in spots], rel=1e-6)
    report = export_onnx(back, tmp_path / "m.onnx")
    assert report["parity"]["passed"]
    onnx = OnnxBackend(tmp_path / "m.onnx", threads=1)
    assert onnx.work_hw == (64, 96) and onnx.describe()["work_shape"] == [64, 96]
    assert onnx.predict_images([data / "test/spot/000.png"])[0][1].shape == (40, 100)


def test_aspect_square_resizes_to_the_square_as_before(tmp_path):
    data = _widen(make_category(tmp_path / "wide", size=40))
    det = anomap.create("gtrans_memory", **SMALL, aspect="square").fit(data, progress=False)
    assert det.config.work_shape == [] and det.config.work_hw == (64, 64) and "aspect" not in det.info
    assert det.predict(data / "test/spot/000.png").anomaly_map.shape == (40, 100)


def test_a_model_file_from_before_aspect_loads_as_a_square_model(tmp_path):
    data = make_category(tmp_path / "cat", size=64)
    det = anomap.create("gtrans_memory", **SMALL).fit(data, out=tmp_path / "m.safetensors", progress=False)
    tensors, meta = load_checkpoint(tmp_path / "m.safetensors")
    for key in ("aspect", "work_shape"):
        del meta["config"][key]
    save_checkpoint(tmp_path / "old.safetensors", tensors, meta)
    old = anomap.load(tmp_path / "old.safetensors")
    assert (old.config.aspect, old.config.work_hw) == ("square", (64, 64))
    image = data / "test/spot/000.png"
    assert old.predict(image).score == pytest.approx(det.predict(image).score, rel=1e-6)


@pytest.mark.parametrize("method, values, match", [
    ("gtrans", {"aspect": "fit"}, "aspect=fit is not available: gtrans's student reads square images only"),
    ("gtrans_memory", {"memory": "fused"}, "aspect=fit is not available: gtrans's student reads square"),
    ("isstad", {"aspect": "fit"}, "aspect=fit is not available: its model reads square images only"),
    ("ssl_ae", {"aspect": "fit"}, "aspect=fit is not available"),
    ("gtrans_memory", {"aspect": "wide"}, "aspect='wide' is not known"),
    ("gtrans_memory", {"aspect": "square", "work_shape": [64, 96]}, r"work_shape=\[64, 96\] is not usable"),
    ("gtrans_memory", {"work_shape": [64, 100]}, r"work_shape=\[64, 100\] is not usable.*multiples of 32"),
    ("gtrans_memory", {"work_shape": [64]}, r"work_shape=\[64\] is not usable"),
])
def test_aspect_options_reject_what_cannot_work_in_one_line(method, values, match):
    with pytest.raises(ConfigError, match=match) as err:
        anomap.create(method, **values)
    assert "\n" not in str(err.value)


def test_fit_images_of_varied_shapes_keep_the_square(tmp_path):
    data = make_category(tmp_path / "cat", size=64)
    rng = np.random.default_rng(0)
    for i, p in enumerate(sorted((data / "train/good").glob("*.png"))):
        w = int(rng.choice([40, 64, 120, 160])) if i % 2 else 64
        Image.open(p).resize((w, 64)).save(p)
    det = anomap.create("gtrans_memory", **SMALL).fit(data, progress=False)
    assert det.config.work_hw == (64, 64) and "vary" in det.info["aspect"]
