"""`anomap serve` as a process: SIGHUP reloads the model file, the CLI's batching options arrive, and
`--backend auto` picks the faster backend."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
import httpx

import anomap
from test_serve_batching import model  # noqa: F401 - the module's tiny model fixture


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, seconds: float = 60) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "server exited"
        try:
            return httpx.get(url + "/healthz", timeout=2).json()
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError("the server did not answer /healthz in time")


def test_sighup_reloads_the_model_file(model, tmp_path):  # noqa: F811
    path, _ = model
    live = tmp_path / "live.safetensors"
    shutil.copy(path, live)
    det = anomap.load(path)
    det.calibration.threshold = float(det.calibration.threshold) * 2
    other = det.save(tmp_path / "other.safetensors")
    port = _free_port()
    env = {**os.environ, "ANOMAP_API_KEY": ""}
    proc = subprocess.Popen([sys.executable, "-m", "anomap.cli", "serve", str(live), "--port", str(port),
                             "--threads", "1", "--max-batch", "4", "--max-wait-ms", "3", "--log-level", "warning"],
                            env=env, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        first = _wait(url, proc)
        assert first["batching"] == {"max_batch": 4, "max_wait_ms": 3.0, "queued_images": 0}
        assert first["backend"] == "onnx (exported at start-up from live.safetensors)"  # --backend auto
        os.replace(shutil.copy(other, tmp_path / "incoming.tmp"), live)
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _wait(url, proc)["model_sha256"] == first["model_sha256"]:
            time.sleep(0.1)
        after = _wait(url, proc)
        assert after["model_sha256"] != first["model_sha256"] and proc.poll() is None
        thr = httpx.get(url + "/v1/model", timeout=5).json()["calibration"]["threshold"]
        assert thr == pytest.approx(det.calibration.threshold)
    finally:
        proc.terminate()
        proc.wait(20)


def test_auto_backend_falls_back_to_torch_when_the_export_fails(model, monkeypatch, caplog):  # noqa: F811
    pytest.importorskip("onnxruntime")
    import anomap.serve.fastest as fastest
    from anomap.errors import ExportError

    path, _ = model
    be = fastest.open_fastest(path, None, device=None, threads=1, batch_size=4, compile=False)
    assert be.name == "onnx" and be.source == path and be.batch_size == 4

    def broken(*_a, **_k):
        raise ExportError("the exporter broke")

    monkeypatch.setattr(fastest, "export_onnx", broken)
    with caplog.at_level("WARNING", logger="anomap.serve"):
        be = fastest.open_fastest(path, None, device=None, threads=1, batch_size=4, compile=False)
    assert be.name == "torch" and be.source is None
    assert "export at start-up failed" in caplog.text and "exporter broke" in caplog.text
    assert fastest.open_fastest(path, "torch", device=None, threads=1, batch_size=4, compile=False).name == "torch"


def test_auto_backend_serves_a_memory_model_with_pytorch_where_bfloat16_is_native(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    import anomap.nn.memory as memory_mod
    import anomap.serve.fastest as fastest
    from conftest import make_category

    path = tmp_path / "mem.safetensors"
    anomap.create("gtrans_memory", image_size=64, device="cpu", num_threads=1, min_heldout=3).fit(
        make_category(tmp_path / "cat", size=64), out=path, progress=False)
    monkeypatch.setattr(memory_mod, "cpu_has_bf16_matmul", lambda: True)
    assert fastest.open_fastest(path, None, device=None, threads=1, batch_size=4, compile=False).name == "torch"
    monkeypatch.setattr(memory_mod, "cpu_has_bf16_matmul", lambda: False)
    be = fastest.open_fastest(path, None, device=None, threads=1, batch_size=4, compile=False)
    assert be.name == "onnx" and be.source == path
