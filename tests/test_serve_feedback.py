"""POST /v1/feedback: operators' verdicts stored by anomap.feedback.FeedbackStore."""

from __future__ import annotations

import hashlib

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient

from anomap.feedback import FeedbackStore
from anomap.runtime.backend import load_backend
from anomap.serve.app import create_app
from test_serve import files, image, png
from test_serve_batching import model  # noqa: F401 - the module's tiny model fixture


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch):
    monkeypatch.delenv("ANOMAP_API_KEY", raising=False)


def test_feedback_with_the_image_or_the_predict_id(model, tmp_path):  # noqa: F811
    path, _ = model
    fb = tmp_path / "fb"
    with TestClient(create_app(load_backend(path, threads=1), feedback_dir=fb)) as c:
        health = c.get("/healthz").json()
        assert health["feedback"] is True
        data = png(image(5))
        r = c.post("/v1/feedback", data={"verdict": "normal"}, files=files(("part 7.png", data)))
        assert r.status_code == 201, r.text
        again = c.post("/v1/feedback", data={"verdict": "normal"}, files=files(("part 7.png", data)))
        assert again.status_code == 201 and again.json()["record"] == r.json()["record"]  # a retry: no duplicate

        pred = c.post("/v1/predict", files=files(("cam.png", png(image(6))))).json()["results"][0]
        by_id = c.post("/v1/feedback", data={"verdict": "anomalous", "id": pred["id"]})
        assert by_id.status_code == 201 and by_id.json()["label"] == "cam.png"
    records = FeedbackStore(fb).records()
    assert [(r.label, r.verdict) for r in records] == [("part 7.png", "normal"), ("cam.png", "anomalous")]
    assert records[0].sha256 == hashlib.sha256(data).hexdigest()
    assert records[0].model_sha256 == health["model_sha256"]
    assert records[1].score == pytest.approx(pred["score"])


def test_feedback_refusals_are_one_line(model, tmp_path):  # noqa: F811
    path, _ = model
    be = load_backend(path, threads=1)
    with TestClient(create_app(be)) as c:
        r = c.post("/v1/feedback", data={"verdict": "normal"}, files=files(("a.png", png(image(1)))))
        assert r.status_code == 503 and "--feedback-dir" in r.json()["detail"]
    with TestClient(create_app(be, feedback_dir=tmp_path / "fb", api_key="k")) as c:
        key = {"X-API-Key": "k"}
        one = files(("a.png", png(image(1))))
        assert c.post("/v1/feedback", data={"verdict": "normal"}, files=one).status_code == 401
        cases = [
            ({"verdict": "fine"}, one, 400, "verdict must be"),
            ({"verdict": "normal"}, None, 400, "neither an image nor an id"),
            ({"verdict": "normal", "id": "nope"}, None, 404, "no recent prediction"),
            ({"verdict": "normal"}, files(("a.png", png(image(1))), ("b.png", png(image(2)))), 400, "one image"),
            ({"verdict": "normal"}, files(("t.png", b"plain text")), 415, "t.png"),
        ]
        for data, up, status, text in cases:
            r = c.post("/v1/feedback", data=data, files=up, headers=key) if up else \
                c.post("/v1/feedback", data=data, headers=key)
            assert r.status_code == status and text in r.json()["detail"], (data, r.text)
            assert "\n" not in r.json()["detail"]
    assert len(FeedbackStore(tmp_path / "fb")) == 0


def test_full_store_answers_507_and_keeps_what_it_has(model, tmp_path, monkeypatch):  # noqa: F811
    path, _ = model
    import anomap.feedback

    monkeypatch.setattr(anomap.feedback.FeedbackStore.__init__, "__defaults__", (1, 1 << 30))
    fb = tmp_path / "fb"
    with TestClient(create_app(load_backend(path, threads=1), feedback_dir=fb)) as c:
        ok = c.post("/v1/feedback", data={"verdict": "normal"}, files=files(("a.png", png(image(1)))))
        full = c.post("/v1/feedback", data={"verdict": "normal"}, files=files(("b.png", png(image(2)))))
    assert ok.status_code == 201 and full.status_code == 507 and "full" in full.json()["detail"].lower()
    assert [r.label for r in FeedbackStore(fb).records()] == ["a.png"]
