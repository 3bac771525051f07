"""Dynamic batching (anomap.serve.batcher) and the service's /metrics, drift gauge and reload."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytest.importorskip("prometheus_client")
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

import anomap
from anomap.runtime.backend import Backend, load_backend
from anomap.serve.app import create_app
from anomap.serve.batcher import Batcher
from anomap.serve.limits import Limits, TimedOut
from anomap.serve.metrics import reference_quantile
from conftest import TINY, _normal, make_category
from test_serve import files, image, png


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny ssl_ae model file and its category (one torch thread while training)."""
    root = make_category(tmp_path_factory.mktemp("batching") / "cat")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = root.parent / "model.safetensors"
        anomap.create("ssl_ae", **TINY).fit(root, out=out, progress=False)
        yield out, root
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch):
    monkeypatch.delenv("ANOMAP_API_KEY", raising=False)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text ``text`` (0 when absent)."""
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


# --- the batcher alone -----------------------------------------------------------------------------

def _fake_scorer(calls: list[int]):
    def score(images, maps):
        calls.append(len(images))
        if any(int(img[0, 0, 0]) == 13 for img in images):
            raise ValueError("poisoned image")
        s = np.array([float(img.mean()) for img in images], np.float32)
        return s, [img[..., 0].astype(np.float32) for img in images] if maps else [], "tag"
    return score


def _img(v: int) -> np.ndarray:
    return np.full((4, 4, 3), v, np.uint8)


def test_batcher_groups_concurrent_jobs_and_keeps_each_result():
    calls: list[int] = []
    sizes: list[int] = []
    b = Batcher(_fake_scorer(calls), max_batch=8, max_wait_ms=200, on_batch=sizes.append)

    async def run():
        jobs = [b.submit([_img(10 * k), _img(10 * k + 1)], k % 2 == 0, 10.0) for k in range(1, 4)]
        return await asyncio.gather(*jobs)

    out = asyncio.run(run())
    assert calls == [6] and sizes == [6]  # three jobs, one model call
    for k, (scores, maps, tag) in enumerate(out, start=1):
        assert scores.tolist() == [10 * k, 10 * k + 1] and tag == "tag"
        assert len(maps) == (2 if k % 2 == 0 else 0)


def test_batch_closes_at_max_batch_and_a_failing_job_fails_alone():
    calls: list[int] = []
    b = Batcher(_fake_scorer(calls), max_batch=2, max_wait_ms=200)

    async def run():
        jobs = [b.submit([_img(v)], False, 10.0) for v in (20, 13, 30, 40)]
        return await asyncio.gather(*jobs, return_exceptions=True)

    out = asyncio.run(run())
    assert isinstance(out[1], ValueError)
    assert [o[0].tolist() for o in (out[0], out[2], out[3])] == [[20], [30], [40]]
    assert calls[0] == 2 and 1 in calls  # the first batch closed at 2 images, then each job alone


def test_expired_job_is_never_scored():
    calls: list[int] = []
    b = Batcher(_fake_scorer(calls), max_batch=4, max_wait_ms=50)

    async def run():
        with pytest.raises(TimedOut):
            await b.submit([_img(1)], False, 0.0)

    asyncio.run(run())
    assert calls == []


# --- the service -----------------------------------------------------------------------------------

def test_batched_service_gives_the_one_by_one_scores(model):
    path, _ = model
    be = load_backend(path, threads=1)
    imgs = [image(seed) for seed in range(8)]
    want = [float(be.score([im], threshold=None, maps=False).scores[0]) for im in imgs]
    with TestClient(create_app(be, limits=Limits(max_batch=8, max_wait_ms=300))) as c:
        got: dict[int, float] = {}

        def post(k: int) -> None:
            r = c.post("/v1/predict", files=files((f"{k}.png", png(imgs[k]))))
            assert r.status_code == 200, r.text
            got[k] = r.json()["results"][0]["score"]

        threads = [threading.Thread(target=post, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        text = c.get("/metrics").text
    assert [got[k] for k in range(8)] == pytest.approx(want, rel=1e-4, abs=1e-6)
    batches = metric(text, "anomap_batch_size_images_count")
    assert metric(text, "anomap_batch_size_images_sum") == 8 and batches < 8  # some requests shared a call


def test_bad_upload_fails_alone_among_concurrent_requests(model):
    path, _ = model
    with TestClient(create_app(load_backend(path, threads=1), limits=Limits(max_wait_ms=200))) as c:
        res: dict[str, int] = {}

        def post(name: str, data: bytes) -> None:
            res[name] = c.post("/v1/predict", files=files((name, data))).status_code

        jobs = [("good1.png", png(image(1))), ("bad.png", png(image(4))[:300]), ("good2.png", png(image(2)))]
        threads = [threading.Thread(target=post, args=j) for j in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert res == {"good1.png": 200, "bad.png": 400, "good2.png": 200}


def test_metrics_parse_and_move(model):
    path, _ = model
    with TestClient(create_app(load_backend(path, threads=1))) as c:
        before = c.get("/metrics")
        assert before.status_code == 200 and before.headers["content-type"].startswith("text/plain")
        for k in range(3):
            assert c.post("/v1/predict", files=files(("a.png", png(image(k))), ("b.png", png(image(k + 9))))
                          ).status_code == 200
        assert c.post("/v1/predict", files=files(("t.txt", b"text"))).status_code == 415
        text = c.get("/metrics").text
        thr = c.get("/v1/model").json()["calibration"]["threshold"]
    names = {fam.name for fam in text_string_to_metric_families(text)}
    assert {"anomap_requests", "anomap_request_duration_seconds", "anomap_batch_size_images",
            "anomap_queue_depth_images", "anomap_images_scored", "anomap_images_flagged", "anomap_image_score",
            "anomap_drift_share", "anomap_drift_zscore"} <= names
    assert metric(text, "anomap_requests_total", route="/v1/predict", status="200") == 3
    assert metric(text, "anomap_requests_total", route="/v1/predict", status="415") == 1
    assert metric(text, "anomap_images_scored_total") == 6
    assert metric(text, "anomap_image_score_count") == 6
    assert metric(text, "anomap_request_duration_seconds_count", route="/v1/predict") == 4
    assert 0 <= metric(text, "anomap_images_flagged_total") <= 6
    assert metric(text, "anomap_image_score_bucket", le=repr(round(thr, 9))) <= 6
    assert metric(text, "anomap_queue_depth_images") == 0


def test_reference_quantile_is_the_conformal_order_statistic():
    assert reference_quantile([], 0.99) is None
    ref, share = reference_quantile([float(v) for v in range(1, 200)], 0.99)  # n = 199: k = ceil(198) = 198
    assert ref == 198.0 and share == pytest.approx(2 / 200)
    ref, share = reference_quantile([3.0, 1.0, 2.0], 0.99)  # too few: the maximum, 1/(n+1) expected above
    assert ref == 3.0 and share == pytest.approx(1 / 4)


def test_drift_gauge_rises_for_darkened_images_not_for_normal_ones(model):
    path, _ = model
    rng = np.random.default_rng(7)
    normals = [_normal(rng, 48) for _ in range(24)]
    with TestClient(create_app(load_backend(path, threads=1))) as c:
        for k in range(0, 24, 8):
            assert c.post("/v1/predict", files=files(*[(f"{j}.png", png(normals[j])) for j in range(k, k + 8)])
                          ).status_code == 200
        normal_text = c.get("/metrics").text
        dark = [(im.astype(np.float32) * 0.35).astype(np.uint8) for im in normals]
        for k in range(0, 24, 8):
            assert c.post("/v1/predict", files=files(*[(f"{j}.png", png(dark[j])) for j in range(k, k + 8)])
                          ).status_code == 200
        mixed_text = c.get("/metrics").text
    expected = metric(normal_text, "anomap_drift_expected_share")
    share_normal = metric(normal_text, "anomap_drift_share")
    share_mixed = metric(mixed_text, "anomap_drift_share")
    assert metric(mixed_text, "anomap_drift_window_images") == 48
    assert share_normal <= expected + 0.25 and metric(normal_text, "anomap_drift_zscore") < 3
    dark_above = round(share_mixed * 48 - share_normal * 24)  # the window holds both sets
    assert dark_above >= 20 and metric(mixed_text, "anomap_drift_zscore") > 3


def _second_model(path, tmp_path):
    """The same model with another threshold: another file (another hash) that loads."""
    det = anomap.load(path)
    det.calibration.threshold = float(det.calibration.threshold) * 3
    return det.save(tmp_path / "other.safetensors")


def test_reload_swaps_the_model_without_dropping_requests(model, tmp_path):
    path, _ = model
    live = tmp_path / "live.safetensors"
    shutil.copy(path, live)
    other = _second_model(path, tmp_path)
    be = load_backend(live, threads=1)
    statuses: list[int] = []
    stop = threading.Event()
    with TestClient(create_app(be, api_key="k")) as c:
        first = c.get("/healthz").json()["model_sha256"]

        def load() -> None:
            while not stop.is_set():
                r = c.post("/v1/predict", files=files(("x.png", png(image(3)))), headers={"X-API-Key": "k"})
                statuses.append(r.status_code)

        threads = [threading.Thread(target=load) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.3)
            assert c.post("/v1/reload").status_code == 401
            shutil.copy(other, live.with_suffix(".tmp"))
            live.with_suffix(".tmp").replace(live)
            r = c.post("/v1/reload", headers={"X-API-Key": "k"})
            assert r.status_code == 200 and r.json()["changed"] is True
            time.sleep(0.3)
            live.write_bytes(b"not a model")  # a broken file: the old model keeps serving
            r = c.post("/v1/reload", headers={"X-API-Key": "k"})
            assert r.status_code == 422 and "keeps serving" in r.json()["detail"]
            time.sleep(0.3)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        health = c.get("/healthz").json()
        text = c.get("/metrics").text
    assert statuses and set(statuses) == {200}
    assert health["model_sha256"] != first and health["status"] == "ok"
    assert metric(text, "anomap_model_reloads_total", result="ok") == 1
    assert metric(text, "anomap_model_reloads_total", result="failed") == 1


def test_healthz_names_backend_and_batching(model):
    path, _ = model
    with TestClient(create_app(load_backend(path, threads=1), limits=Limits(max_batch=4, max_wait_ms=2))) as c:
        h = c.get("/healthz").json()
    assert h["backend"] == "torch" and h["batching"]["max_batch"] == 4 and h["batching"]["max_wait_ms"] == 2
    assert len(h["model_sha256"]) == 64 and h["feedback"] is False


def test_batching_limits_reject_bad_values():
    from anomap.errors import ConfigError

    with pytest.raises(ConfigError, match="max_batch"):
        Limits(max_batch=0)
    with pytest.raises(ConfigError, match="max_wait_ms"):
        Limits(max_wait_ms=-1)
    assert Limits(concurrency=2, max_batch=4, queue=3).capacity == 11


def test_in_memory_backend_cannot_reload():
    class Stub(Backend):
        name, method, channels, image_size = "stub", "stub", 3, 8

        def __init__(self):
            from anomap.types import Calibration

            self.calibration = Calibration(threshold=0.5)
            self.meta = {"method": "stub", "config": {}, "calibration": {}, "info": {}}

    with TestClient(create_app(Stub())) as c:
        r = c.post("/v1/reload")
    assert r.status_code == 409 and "in-memory" in r.json()["detail"]
