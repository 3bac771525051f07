"""The prediction service: every endpoint and error path, with FastAPI's TestClient and a tiny real model."""

from __future__ import annotations

import base64
import io
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient

import anomap
from anomap.cli import build_parser, main
from anomap.errors import ConfigError
from anomap.runtime.backend import Backend, load_backend
from anomap.serve.app import create_app
from anomap.serve.limits import Limits
from anomap.types import Calibration
from conftest import TINY, make_category


@pytest.fixture(scope="module")
def backend(tmp_path_factory) -> Backend:
    """A tiny ssl_ae trained in a few seconds, opened through the torch backend (one torch thread meanwhile)."""
    root = make_category(tmp_path_factory.mktemp("serve") / "cat")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = root.parent / "model.safetensors"
        anomap.create("ssl_ae", **TINY).fit(root, out=out, progress=False)
        yield load_backend(out, threads=1)
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch):
    monkeypatch.delenv("ANOMAP_API_KEY", raising=False)


def png(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def image(seed: int = 0, size: tuple[int, int] = (40, 56), bright: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    arr = rng.integers(90, 150, (*size, 3), dtype=np.uint8)
    if bright:
        arr[10:22, 10:22] = 255
    return arr


def files(*items: tuple[str, bytes]) -> list:
    return [("file", (name, data, "application/octet-stream")) for name, data in items]


def client(backend: Backend, **kw) -> TestClient:
    return TestClient(create_app(backend, **kw))


def test_healthz_and_model(backend):
    c = client(backend)
    h = c.get("/healthz").json()
    cal = backend.calibration
    assert h["status"] == "ok" and h["calibration"] == {  # what the verdicts promise, with no key needed
        "target_fpr": 0.05, "promised_fpr": pytest.approx(cal.promised_fpr),
        "fpr_upper95": pytest.approx(cal.fpr_upper95), "n_heldout": cal.n_heldout,
        "n_group_scores": len(cal.group_scores)}
    assert 0.05 < cal.promised_fpr == 1 / (cal.n_scores + 1) < cal.fpr_upper95 < 1  # too few normal scores
    m = c.get("/v1/model").json()
    assert m["calibration"]["promised_fpr"] == pytest.approx(cal.promised_fpr)
    assert m["calibration"]["order_k"] == cal.n_heldout
    assert m["method"] == "ssl_ae" and m["backend"] == "torch" and m["image_size"] == 32
    assert m["calibration"]["threshold"] == pytest.approx(backend.calibration.threshold)
    assert m["config"]["width"] == TINY["width"] and m["version"] == anomap.__version__
    assert "dataset" not in m["info"] and "heldout_files" not in m["info"]  # no training paths leak
    assert m["limits"]["max_bytes"] == Limits().max_bytes and m["api_key_required"] is False


def test_page_docs_and_headers(backend):
    c = client(backend)
    page = c.get("/")
    assert page.status_code == 200 and 'id="threshold"' in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert c.get("/static/app.js").status_code == 200
    docs = c.get("/docs")
    assert docs.status_code == 200 and "cdn." not in docs.text  # Swagger UI from local files
    assert "/v1/predict" in c.get("/openapi.json").json()["paths"]


def test_predict_one_matches_backend(backend):
    arr = image(1, bright=True)
    r = client(backend).post("/v1/predict", files=files(("part.png", png(arr))))
    assert r.status_code == 200, r.text
    body = r.json()
    (res,) = body["results"]
    (want, _), = backend.predict_images([arr])
    thr = backend.calibration.threshold
    assert res["score"] == pytest.approx(want, rel=1e-5) and res["threshold"] == pytest.approx(thr)
    # The verdict is the service's own score against its threshold; it equals the backend's verdict
    # unless the two scores (which agree to rel=1e-5, not to the last bit) straddle the threshold.
    assert res["is_anomalous"] == (res["score"] > res["threshold"])
    if abs(want - thr) > 1e-5 * abs(want):
        assert res["is_anomalous"] == (want > thr)
    assert (res["label"], res["width"], res["height"], res["heatmap"]) == ("part.png", 56, 40, None)
    assert body["threshold_source"] == "calibration"


def test_several_images_with_heatmaps_keep_order(backend):
    grey = image(2)[:, :, 0]
    items = [("a.png", png(image(3))), ("b.jpg", png(grey, "JPEG")), ("c.bmp", png(image(4, (30, 30)), "BMP"))]
    r = client(backend, limits=Limits(heatmap_side=48)).post("/v1/predict?heatmap=true", files=files(*items))
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["label"] for x in results] == ["a.png", "b.jpg", "c.bmp"]
    for x in results:
        head, data = x["heatmap"].split(",", 1)
        assert head == "data:image/png;base64"
        overlay = Image.open(io.BytesIO(base64.b64decode(data)))
        assert overlay.mode == "RGB" and max(overlay.size) <= 48
        assert overlay.size[0] / overlay.size[1] == pytest.approx(x["width"] / x["height"], rel=0.05)


def test_threshold_per_request(backend):
    c = client(backend)
    body = files(("x.png", png(image(5))))
    low = c.post("/v1/predict?threshold=-1e9", files=body).json()
    high = c.post("/v1/predict?threshold=1e9", files=body).json()
    assert low["threshold_source"] == "request" and low["results"][0]["is_anomalous"] is True
    assert high["results"][0]["is_anomalous"] is False and high["threshold"] == 1e9
    assert low["results"][0]["score"] == high["results"][0]["score"]
    for bad in ("nan", "inf", "abc"):
        r = c.post(f"/v1/predict?threshold={bad}", files=body)
        assert r.status_code == 400 and "threshold" in r.json()["detail"]


def test_byte_limit_413(backend):
    c = client(backend, limits=Limits(max_bytes=2000))
    big = png(image(6, (64, 64)))
    assert len(big) > 2000
    r = c.post("/v1/predict", files=files(("big.png", big)))
    assert r.status_code == 413 and "2,000 bytes" in r.json()["detail"]
    # without Content-Length (chunked upload) the body is counted while it arrives
    boundary = "xyz"
    raw = (f"--{boundary}\r\nContent-Disposition: form-data; name=file; filename=big.png\r\n\r\n").encode() + big \
        + f"\r\n--{boundary}--\r\n".encode()
    r = c.post("/v1/predict", content=iter([raw[:1000], raw[1000:]]),
               headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a huge size but carries almost no data (a decompression-bomb header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_pixel_limits_413(backend):
    c = client(backend, limits=Limits(max_pixels=1000))
    r = c.post("/v1/predict", files=files(("wide.png", png(image(7, (40, 40))))))
    assert r.status_code == 413 and "1,000 pixels" in r.json()["detail"] and "wide.png" in r.json()["detail"]
    for w, h in ((60_000, 60_000), (20_000, 20_000)):  # over Pillow's bomb guard, and over our default limit
        r = client(backend).post("/v1/predict", files=files(("bomb.png", _png_header_only(w, h))))
        assert r.status_code == 413 and "bomb.png" in r.json()["detail"], r.text


def test_content_checks_415_400(backend):
    c = client(backend)
    gif = io.BytesIO()
    Image.fromarray(image(8)).save(gif, format="GIF")
    good = png(image(9))
    cases = [
        (files(("notes.txt", b"hello, not an image")), 415, "is not a PNG, JPEG, BMP or TIFF image"),
        (files(("anim.gif", gif.getvalue())), 415, "is not a PNG, JPEG, BMP or TIFF image"),
        (files(("cut.png", good[: len(good) // 2])), 400, "truncated or corrupt"),
        (files(("empty.png", b"")), 400, "is empty"),
        (files(("ok.png", good), ("bad.txt", b"nope")), 415, "'bad.txt'"),
    ]
    for body, status, words in cases:
        r = c.post("/v1/predict", files=body)
        assert r.status_code == status and words in r.json()["detail"], r.text
    r = c.post("/v1/predict", json={"image": "x"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]
    r = c.post("/v1/predict", data={"field": "text only"}, files=files())
    assert r.status_code in (400, 415) and "detail" in r.json()
    r = c.post("/v1/predict", content=b"--b\r\nContent-Disposition: form-data; name=a\r\n\r\nx\r\n--b--\r\n",
               headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 400 and "no file" in r.json()["detail"]


def test_too_many_files_400(backend):
    r = client(backend, limits=Limits(max_files=2)).post(
        "/v1/predict", files=files(*[(f"{i}.png", png(image(i))) for i in range(3)]))
    assert r.status_code == 400 and "2" in r.json()["detail"]


def test_api_key(backend, monkeypatch):
    c = client(backend, api_key="s3cret-key")
    body = files(("x.png", png(image(10))))
    assert c.get("/healthz").status_code == 200 and c.get("/").status_code == 200
    for hdr in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": ""}):
        assert c.get("/v1/model", headers=hdr).status_code == 401
        r = c.post("/v1/predict", files=body, headers=hdr)
        assert r.status_code == 401 and "X-API-Key" in r.json()["detail"]
    assert c.get("/v1/model", headers={"X-API-Key": "s3cret-key"}).json()["api_key_required"] is True
    assert c.post("/v1/predict", files=body, headers={"X-API-Key": "s3cret-key"}).status_code == 200
    monkeypatch.setenv("ANOMAP_API_KEY", "from-env")
    c = client(backend)
    assert c.get("/v1/model").status_code == 401
    assert c.get("/v1/model", headers={"X-API-Key": "from-env"}).status_code == 200


def test_cors_off_by_default(backend):
    origin = {"Origin": "http://elsewhere.example"}
    assert "access-control-allow-origin" not in client(backend).get("/v1/model", headers=origin).headers
    c = client(backend, cors_origins=["http://elsewhere.example"])
    assert c.get("/v1/model", headers=origin).headers["access-control-allow-origin"] == "http://elsewhere.example"


def test_upload_name_never_touches_filesystem(backend, tmp_path):
    target = tmp_path / "sub" / "planted.png"
    for name in (str(target), "../../" + target.name, "a\x00b\nc.png"):
        r = client(backend).post("/v1/predict", files=files((name, png(image(11)))))
        assert r.status_code == 200
        label = r.json()["results"][0]["label"]
        assert label.isprintable() and (label == name or not name.isprintable())  # echoed as text only
    assert not target.exists() and not target.parent.exists()


class BlockingBackend(Backend):
    """Stands in for a slow model: each model call waits until the test releases it."""

    name, method, channels, image_size = "stub", "stub", 3, 8

    def __init__(self):
        self.calibration = Calibration(threshold=0.5)
        self.meta = {"method": "stub", "config": {}, "calibration": self.calibration.to_dict(), "info": {},
                     "anomap_version": anomap.__version__}
        self.started = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def predict_prepared(self, batch_u8):
        self.calls += 1
        self.started.set()
        assert self.release.wait(30), "test never released the stub"
        return np.full(len(batch_u8), 0.7, np.float32), np.zeros(batch_u8.shape[:3], np.float32)


def test_overload_gives_503_fast(backend):
    stub = BlockingBackend()
    body = files(("x.png", png(image(12))))
    with TestClient(create_app(stub, limits=Limits(concurrency=1, queue=0, max_batch=1))) as c:
        first: dict = {}
        t = threading.Thread(target=lambda: first.update(r=c.post("/v1/predict", files=body)))
        t.start()
        try:
            assert stub.started.wait(20)
            r = c.post("/v1/predict", files=body)
            assert r.status_code == 503 and r.headers["retry-after"] == "1" and "busy" in r.json()["detail"]
            assert "r" not in first  # refused while the first request is still held: it did not wait
            assert c.get("/healthz").json()["in_flight"] == 1
        finally:
            stub.release.set()
            t.join(30)
        assert first["r"].status_code == 200 and first["r"].json()["results"][0]["is_anomalous"] is True
        assert c.post("/v1/predict", files=body).status_code == 200


def test_timeout_504_keeps_admission_until_work_ends():
    stub = BlockingBackend()
    body = files(("x.png", png(image(13))))
    with TestClient(create_app(stub, limits=Limits(timeout_s=1.0, concurrency=1, queue=1, max_batch=1))) as c:
        try:
            first: dict = {}
            t = threading.Thread(target=lambda: first.update(r=c.post("/v1/predict", files=body)))
            t.start()
            assert stub.started.wait(20)
            queued = c.post("/v1/predict", files=body)  # waits for the busy slot, then times out
            t.join(20)
            for r in (first["r"], queued):
                assert r.status_code == 504 and "1 s" in r.json()["detail"]
            assert c.app.state.gate.active == 1  # the running thread keeps its place; the queued one left
            assert c.post("/v1/predict", files=body).status_code == 504  # admitted, queued, timed out again
        finally:
            stub.release.set()
        deadline = time.monotonic() + 20
        while c.app.state.gate.active and time.monotonic() < deadline:
            time.sleep(0.01)
        assert c.app.state.gate.active == 0
        assert stub.calls == 1  # the timed-out queued requests never ran
        assert c.post("/v1/predict", files=body).status_code == 200


def test_create_app_from_a_model_file(backend):
    c = TestClient(create_app(str(backend.path)))  # backend chosen by the suffix: torch
    assert c.get("/v1/model").json()["backend"] == "torch"
    assert c.post("/v1/predict", files=files(("x.png", png(image(15))))).status_code == 200


def test_limits_and_cli_arguments(tmp_path, capsys):
    with pytest.raises(ConfigError, match="concurrency"):
        Limits(concurrency=0)
    with pytest.raises(ConfigError, match="timeout_s"):
        Limits(timeout_s=float("nan"))
    args = build_parser().parse_args(["serve", "m.safetensors", "--max-bytes", "5M", "--cors-origin", "http://a"])
    assert (args.max_bytes, args.host, args.port, args.cors_origin) == (5 * 1024**2, "127.0.0.1", 8000, ["http://a"])
    assert main(["serve", str(tmp_path / "missing.safetensors"), "--port", "1"]) == 2
    assert "missing.safetensors" in capsys.readouterr().err
    assert Path(anomap.__file__).parent.joinpath("serve/static/index.html").is_file()


def test_onnx_backend_serves_same_scores(backend, tmp_path):
    pytest.importorskip("onnxruntime")
    from anomap.export.onnx import export_onnx

    onnx_path = tmp_path / "model.onnx"
    export_onnx(backend.path, onnx_path, parity=False)
    arr = image(14, bright=True)
    c = TestClient(create_app(load_backend(onnx_path, threads=1)))
    assert c.get("/v1/model").json()["backend"] == "onnx"
    r = c.post("/v1/predict?heatmap=true", files=files(("p.png", png(arr))))
    assert r.status_code == 200, r.text
    (want, _), = backend.predict_images([arr])
    assert r.json()["results"][0]["score"] == pytest.approx(want, rel=1e-3, abs=1e-5)
    assert r.json()["backend"] == "onnx" and r.json()["results"][0]["heatmap"].startswith("data:image/png")
