"""One image, four front doors, one score: the Python API (``Detector.predict``), ``anomap predict`` (CSV),
the ONNX backend and the service all prepare through :func:`anomap.inference.prepare_image` (the first
three inside :func:`anomap.inference.score_images`; the service in each request's thread before its
dynamic batch) and score with the backend's ``predict_prepared``."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("onnxruntime")
pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient

import anomap
from anomap import inference
from anomap.cli import main
from anomap.runtime.backend import load_backend
from anomap.serve.app import create_app
from conftest import tiny_ssl_ae_with_onnx

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny ssl_ae (.safetensors), its ONNX export, and a defect image of another size than the model's."""
    root = tmp_path_factory.mktemp("one_path")
    data, model, _ = tiny_ssl_ae_with_onnx(root, parity_images=root / "cat" / "test")
    img = np.asarray(Image.open(data / "test" / "spot" / "000.png"))[:40, :44]  # 40 x 44: not the working 32
    Image.fromarray(img).save(root / "part.png")
    return {"model": model, "onnx": root / "m.onnx", "image": root / "part.png"}


@pytest.fixture
def calls(monkeypatch) -> list[int]:
    """Counts the images prepared by prepare_image: a front door that does not go through it adds nothing."""
    seen: list[int] = []
    real = inference.prepare_image

    def spy(image, channels, size):
        seen.append(1)
        return real(image, channels, size)

    monkeypatch.setattr(inference, "prepare_image", spy)
    return seen


def _api(models: dict[str, Path]) -> tuple[float, bool]:
    res = anomap.load(models["model"]).predict(str(models["image"]))
    return float(res.score), bool(res.is_anomalous)


def _cli(models: dict[str, Path], out: Path) -> tuple[float, bool]:
    assert main(["predict", str(models["model"]), str(models["image"]), "--out", str(out), "-q"]) == 0
    with out.open(newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["status"] == "ok"
    return float(row["score"]), row["is_anomalous"] == "True"


def _onnx(models: dict[str, Path]) -> tuple[float, bool]:
    backend = load_backend(models["onnx"], threads=1)
    res = backend.score([str(models["image"])], threshold=backend.calibration.threshold)
    return float(res.scores[0]), bool(res.is_anomalous[0])


def _service(model: Path, image: Path) -> tuple[float, bool]:
    with TestClient(create_app(model)) as client:
        r = client.post("/v1/predict", files=[("file", ("part.png", image.read_bytes(), "image/png"))])
    assert r.status_code == 200, r.text
    (result,) = r.json()["results"]
    assert (result["width"], result["height"]) == (44, 40)
    return float(result["score"]), bool(result["is_anomalous"])


def test_one_image_gets_the_same_score_through_every_front_door(models, tmp_path, calls):
    doors = {
        "api": lambda: _api(models),
        "cli": lambda: _cli(models, tmp_path / "r.csv"),
        "onnx backend": lambda: _onnx(models),
        "service (torch)": lambda: _service(models["model"], models["image"]),
        "service (onnx)": lambda: _service(models["onnx"], models["image"]),
    }
    got = {}
    for name, door in doors.items():
        before = len(calls)
        got[name] = door()
        assert len(calls) == before + 1, f"{name} did not prepare its image through prepare_image"
    ref, verdict = got["api"]
    for name in ("cli", "service (torch)"):  # the same PyTorch model on the same prepared bytes
        assert got[name][0] == pytest.approx(ref, rel=1e-6, abs=1e-9), name
    for name in ("onnx backend", "service (onnx)"):  # onnxruntime against PyTorch: float rounding only
        assert got[name][0] == pytest.approx(ref, rel=1e-4, abs=1e-7), name
    threshold = anomap.load(models["model"]).calibration.threshold
    if abs(ref - threshold) > 1e-4 * abs(threshold):  # verdicts agree unless the score ties the threshold
        assert {name: v for name, (_, v) in got.items()} == dict.fromkeys(got, verdict)


def test_maps_come_back_at_the_image_size_the_same_through_api_and_onnx(models):
    amap = anomap.load(models["model"]).predict(str(models["image"])).anomaly_map
    backend = load_backend(models["onnx"], threads=1)
    res = backend.score([str(models["image"])], threshold=None)
    assert amap.shape == res.maps[0].shape == (40, 44)
    assert res.is_anomalous == [None]  # no threshold, no verdict
    np.testing.assert_allclose(res.maps[0], amap, rtol=1e-4, atol=1e-5 * float(np.abs(amap).max()))


def test_api_inputs_of_every_kind_score_alike(models):
    """A path, an array, a PIL image, a list and a uint8 batch are all the same image to Detector.predict."""
    det = anomap.load(models["model"])
    arr = np.asarray(Image.open(models["image"]))
    ref = float(det.predict(str(models["image"])).score)
    assert float(det.predict(arr).score) == pytest.approx(ref, rel=1e-6)
    pil = Image.open(io.BytesIO(models["image"].read_bytes()))
    assert float(det.predict(pil).score) == pytest.approx(ref, rel=1e-6)
    (one,) = det.predict([arr])
    assert one.score == pytest.approx(ref, rel=1e-6)
    batch = det.predict(np.stack([arr, arr]))
    assert batch.anomaly_map.shape == (2, 40, 44)
    np.testing.assert_allclose(batch.score, [ref, ref], rtol=1e-5)
