"""The default method, gtrans_memory: what `anomap fit`/`demo`/`bench` and `anomap.create()` use, the same
model as gtrans with ``memory=only``, no student in its file, and one-line errors on settings it cannot use."""

from __future__ import annotations

import pytest
import torch

import anomap
from anomap.cli.parser import build_parser
from anomap.errors import ConfigError
from anomap.export.onnx import export_onnx
from anomap.registry import DEFAULT_METHOD
from conftest import make_category

SMALL = {"image_size": 64, "smoothing_sigma": 1.0, "device": "cpu", "num_threads": 1, "min_heldout": 3}

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_default_method_is_gtrans_memory_everywhere():
    assert DEFAULT_METHOD == "gtrans_memory" and anomap.create().method_name == DEFAULT_METHOD
    parser = build_parser()
    assert parser.parse_args(["fit", "--data", "d", "--out", "m.safetensors"]).method == DEFAULT_METHOD
    assert parser.parse_args(["demo"]).method == DEFAULT_METHOD
    cfg = anomap.create().config
    assert (cfg.memory, cfg.memory_pool_pad, cfg.image_size, cfg.teacher_arch, cfg.memory_image_norm) == (
        "only", "zeros", 320, "efficientnet_lite0", "location")
    gtrans = anomap.create("gtrans").config  # the paper's student keeps its own defaults
    assert (gtrans.memory, gtrans.image_size, gtrans.memory_image_norm) == ("off", 224, "same")


def test_gtrans_memory_is_gtrans_with_memory_only_and_saves_no_student(tmp_path):
    data = make_category(tmp_path / "cat", size=64)
    det = anomap.create(**SMALL).fit(data, out=tmp_path / "m.safetensors", progress=False)
    twin = anomap.create("gtrans", **SMALL, memory="only", memory_pool_pad="zeros",
                         memory_image_norm="location").fit(data, progress=False)
    assert det.info["steps"] == {} and not any(k.startswith("student.") for k in det.model.state_dict())
    torch.testing.assert_close(det.model.memory.bank, twin.model.memory.bank, rtol=0, atol=0)
    images = sorted((data / "test").glob("*/*.png"))
    scores = [r.score for r in det.predict(images)]
    assert scores == pytest.approx([r.score for r in twin.predict(images)], rel=1e-6)
    back = anomap.load(tmp_path / "m.safetensors")
    assert back.method_name == "gtrans_memory"
    assert [r.score for r in back.predict(images)] == pytest.approx(scores, rel=1e-6)
    spots = [r.score for r in back.predict(sorted((data / "test/spot").glob("*.png")))]
    goods = [r.score for r in back.predict(sorted((data / "test/good").glob("*.png")))]
    assert min(spots) > max(goods)
    assert export_onnx(back, tmp_path / "m.onnx")["parity"]["passed"]


@pytest.mark.parametrize("values, match", [
    ({"memory": "off"}, "memory=off leaves gtrans_memory without its memory"),
    ({"preset": "paper"}, "teacher_arch=wide_resnet50_2 needs a weight file"),
    ({"memory_max": 0}, "memory_max=0 must be at least 1"),
])
def test_gtrans_memory_rejects_what_it_cannot_use_in_one_line(values, match):
    with pytest.raises(ConfigError, match=match) as err:
        anomap.create("gtrans_memory", **values)
    assert "\n" not in str(err.value)
