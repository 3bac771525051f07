"""ONNX export: parity with PyTorch for every method, calibration in the metadata, loud parity failures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import anomap
from anomap.cli import main
from anomap.errors import CheckpointError, ExportError
from anomap.export.onnx import export_onnx, parity_check
from anomap.runtime.backend import OnnxBackend, TorchBackend, load_backend, normalise_map
from conftest import TINY, make_category

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = {
    "ssl_ae": {**TINY, "max_steps": 3, "checkpoint_every": 0},
    "isstad": {"image_size": 32, "patch_size": 8, "enc_dim": 32, "enc_depth": 1, "enc_heads": 2, "dec_dim": 16,
               "dec_heads": 2, "dec_depth_stage1": 1, "dec_depth_stage2": 2, "stage1_batch_size": 4,
               "stage2_batch_size": 4, "max_steps": 4, "checkpoint_every": 0, "device": "cpu", "min_heldout": 3,
               "num_threads": 1},
    "gtrans": {"image_size": 64, "tr_dim": 32, "tr_depth": 1, "tr_heads": 2, "batch_size": 4,
               "smoothing_sigma": 1.0, "max_steps": 2, "checkpoint_every": 0, "device": "cpu", "min_heldout": 3,
               "num_threads": 1},
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_category(tmp_path_factory.mktemp("export") / "cat")


@pytest.fixture(scope="module")
def models(data, tmp_path_factory) -> dict[str, Path]:
    """One tiny trained model per method (the isstad one runs both stages, so stage 2 is exported)."""
    out = tmp_path_factory.mktemp("models")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    paths = {name: anomap.create(name, **cfg).fit(data, progress=False).save(out / f"{name}.safetensors")
             for name, cfg in CONFIGS.items()}
    torch.set_num_threads(before)
    return paths


def props(path: Path) -> dict:
    return {p.key: json.loads(p.value) for p in onnx.load(str(path)).metadata_props}


@pytest.mark.parametrize("method", list(CONFIGS))
def test_export_parity_and_metadata(method, models, data, tmp_path):
    det = anomap.load(models[method])
    if method == "isstad":
        assert bool(det.model.stage2_initialised.item())  # the scoring path of stage 2 is what gets exported
    out = tmp_path / "m.onnx"
    rep = export_onnx(det, out)
    par = rep["parity"]
    assert par["passed"] and par["n_images"] == len(det.info["heldout_files"])
    assert par["max_map_diff"] <= 1e-3 and par["max_score_diff"] <= 1e-3
    assert "held-out" in rep["images_from"] and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]

    model = onnx.load(str(out))
    s, c = det.config.image_size, det.channels
    (inp,) = model.graph.input
    assert inp.name == "images" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims[1:] == [s, s, c] and isinstance(dims[0], str)  # dynamic batch axis
    assert [o.name for o in model.graph.output] == ["scores", "maps"]

    meta = props(out)
    cal = det.calibration
    assert meta["method"] == method and meta["image_size"] == s and meta["channels"] == c
    assert meta["threshold"] == cal.threshold and meta["map_low"] == cal.map_low
    assert meta["map_scale"] == cal.map_scale and meta["target_fpr"] == cal.target_fpr
    assert meta["calibration"]["threshold"] == cal.threshold and meta["config"]["image_size"] == s
    assert meta["anomap_version"] == anomap.__version__ and meta["parity"]["passed"] is True

    # raw outputs, not calibrated ones: the backend reproduces Detector.predict_raw on a batch of 3
    imgs = sorted((data / "test").rglob("*.png"))[:3]
    onnx_b, torch_b = OnnxBackend(out, threads=1), TorchBackend(det)
    batch = np.stack([torch_b.prepare(p) for p in imgs])
    so, mo = onnx_b.predict_prepared(batch)
    st, mt = torch_b.predict_prepared(batch)
    assert so.shape == (3,) and mo.shape == (3, s, s) and mo.dtype == np.float32
    np.testing.assert_allclose(normalise_map(mo, cal), normalise_map(mt, cal), atol=1e-3)
    np.testing.assert_allclose(so / cal.threshold, st / cal.threshold, atol=1e-3)
    assert onnx_b.describe()["calibration"]["threshold"] == cal.threshold
    for (a, ma), (b, mb), p in zip(onnx_b.predict_images(imgs), torch_b.predict_images(imgs), imgs, strict=True):
        assert ma.shape == mb.shape == (48, 48) and abs(a - b) <= 1e-3 * cal.threshold, p


def test_parity_failure_after_weight_perturbation(models, tmp_path):
    det = anomap.load(models["ssl_ae"])
    out = tmp_path / "m.onnx"
    export_onnx(det, out)
    images = [Path(det.info["dataset"]) / "train/good" / n for n in det.info["heldout_files"]]
    assert parity_check(det, out, images)["passed"]
    with torch.no_grad():
        list(det.model.parameters())[-1].add_(0.5)  # the output layer: every pixel changes
    with pytest.raises(ExportError, match="parity check failed"):
        parity_check(det, out, images)


def test_failed_parity_leaves_no_file(models, tmp_path, monkeypatch, capsys):
    """The weights change between tracing and the check: the CLI exits 2 and nothing is written."""
    import anomap.export.onnx as mod

    real = mod._trace

    def trace_then_perturb(det, path, opset):
        real(det, path, opset)
        with torch.no_grad():
            list(det.model.parameters())[-1].add_(0.5)

    monkeypatch.setattr(mod, "_trace", trace_then_perturb)
    out = tmp_path / "out" / "m.onnx"
    assert main(["export", str(models["ssl_ae"]), "--format", "onnx", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("anomap: error:") and "parity check failed" in err and "tolerance 0.001" in err
    assert "\n" not in err and not out.exists() and list(out.parent.iterdir()) == []


def test_cli_export_prints_parity_and_predicts(models, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(["export", str(models["gtrans"]), "--format", "onnx", "--out", str(out), "--tol", "1e-3"]) == 0
    text = capsys.readouterr().out
    assert "parity on 3 images" in text and "max |map diff|" in text and "passed" in text
    assert load_backend(out).method == "gtrans"


def test_parity_images_from_folder_or_clear_error(models, tmp_path, capsys):
    moved = tmp_path / "moved.safetensors"
    shutil.copy(models["ssl_ae"], moved)
    det = anomap.load(moved)
    det.info["dataset"] = str(tmp_path / "gone")  # the training folder is not here any more
    with pytest.raises(ExportError, match="--images DIR"):
        export_onnx(det, tmp_path / "a.onnx")
    assert not (tmp_path / "a.onnx").exists()
    folder = Path(anomap.load(models["ssl_ae"]).info["dataset"]) / "test/good"
    rep = export_onnx(det, tmp_path / "b.onnx", parity_images=folder)
    assert rep["parity"]["passed"] and rep["parity"]["n_images"] == 4 and rep["images_from"] == str(folder)
    rep = export_onnx(det, tmp_path / "c.onnx", parity=False)
    assert rep["parity"] is None and props(tmp_path / "c.onnx")["parity"] == "not checked"
    det.save(moved)
    assert main(["export", str(moved), "--out", str(tmp_path / "d.onnx")]) == 2
    assert "--images DIR" in capsys.readouterr().err


def test_foreign_and_mismatched_files_are_rejected(models, tmp_path):
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    foreign = tmp_path / "foreign.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), str(foreign))
    with pytest.raises(CheckpointError, match="not one written by anomap") as e:
        load_backend(foreign)
    assert str(foreign) in str(e.value) and "anomap export" in str(e.value)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not onnx" * 50)
    with pytest.raises(CheckpointError, match="not a readable ONNX model"):
        load_backend(garbage)
    with pytest.raises(CheckpointError, match="anomap export"):
        load_backend(models["ssl_ae"], "onnx")
    with pytest.raises(CheckpointError, match="--backend onnx"):
        load_backend(foreign, "torch")
