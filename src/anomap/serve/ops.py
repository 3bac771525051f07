"""Operations routes: ``GET /metrics``, ``POST /v1/feedback``, ``POST /v1/reload`` (and SIGHUP), plus the
middleware that counts every request for the metrics.

- ``/metrics``: Prometheus text format from :class:`anomap.serve.metrics.ServiceMetrics` (open like
  ``/healthz``: counts and score statistics only, never images or file names).
- ``/v1/feedback``: an operator's verdict on an image, ``normal`` (a false alarm) or ``anomalous`` (a
  missed or confirmed defect), sent as the image itself or as the ``id`` a predict response gave. Stored
  durably by :class:`anomap.feedback.FeedbackStore` before the answer; ``anomap update`` folds the
  confirmed normals into a model (docs/deploy.md).
- ``/v1/reload``: loads the served model file again (e.g. after ``anomap update MODEL ... --out MODEL``)
  and swaps it in between batches: requests in flight finish on the model they started with. A file that
  does not load leaves the old model serving. Nothing from the request names a path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from anomap.errors import AnomapError
from anomap.serve.decode import UploadError, decode_upload, read_form
from anomap.serve.limits import Limits
from anomap.serve.metrics import CONTENT_TYPE_LATEST, ServiceMetrics
from anomap.serve.predictor import RecentUploads, Served

log = logging.getLogger("anomap.serve")

ROUTES = ("/", "/healthz", "/metrics", "/v1/model", "/v1/predict", "/v1/feedback", "/v1/reload")
FEEDBACK_HINT = ("send verdict=normal|anomalous with the image as multipart/form-data, e.g. curl -F verdict=normal "
                 "-F file=@part.png http://HOST:PORT/v1/feedback, or with id=ID from a predict response (form or JSON)")


class CountRequests:
    """Pure ASGI middleware: ``anomap_requests_total{route,status}`` and the latency histogram."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        route = path if path in ROUTES else "other"  # bounded label values
        status = 500
        t0 = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - t0)


async def reload_model(served: Served, metrics: ServiceMetrics) -> dict[str, Any]:
    """Load the model file again and swap it in; raises :class:`HTTPException` (the old model stays)."""
    if served.loader is None:
        raise HTTPException(409, "this server was started from an in-memory model, so there is no file to reload.")
    async with served.lock:
        old = served.sha256
        try:
            backend, sha256 = await run_in_threadpool(served.load)  # hashing an ONNX file reads it all
        except (AnomapError, OSError) as e:
            metrics.reloads.labels("failed").inc()
            log.error("reload failed, the old model keeps serving: %s", e)
            raise HTTPException(422, f"reload failed, the old model keeps serving: {e}") from None
        served.set(backend, sha256)
        metrics.calibrate(backend.calibration)
        metrics.reloads.labels("ok").inc()
    log.info("reloaded the model: sha256 %s -> %s", old, served.sha256)
    return {"status": "reloaded", "changed": old != served.sha256, "previous_sha256": old, **served.describe(),
            "method": backend.method, "backend": backend.name}


def ops_routes(app: FastAPI, served: Served, metrics: ServiceMetrics, limits: Limits,
               require_key: Callable[..., None], store: Any | None, recent: RecentUploads | None) -> None:
    """Register ``/metrics``, ``/v1/feedback`` and ``/v1/reload`` on ``app``."""

    @app.get("/metrics", tags=["service"], summary="Prometheus metrics (never needs the API key)",
             response_class=Response)
    def metrics_text() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/reload", tags=["service"], dependencies=[Depends(require_key)],
              summary="load the served model file again and swap it in without dropping requests")
    async def reload() -> dict[str, Any]:
        return await reload_model(served, metrics)

    @app.post("/v1/feedback", tags=["model"], dependencies=[Depends(require_key)],
              summary="an operator's verdict on an image: normal (false alarm) or anomalous",
              responses={404: {"description": "unknown id"}, 503: {"description": "feedback is off"},
                         507: {"description": "the feedback folder is full"}})
    async def feedback(request: Request) -> JSONResponse:
        if store is None:
            raise HTTPException(503, "feedback is off on this server: start it with --feedback-dir DIR.")
        uploads, fields = await read_form(request, limits, FEEDBACK_HINT, files_required=False)
        verdict = fields.get("verdict", "").strip().lower()
        if verdict not in ("normal", "anomalous"):
            raise HTTPException(400, f"verdict must be 'normal' or 'anomalous', not {verdict[:40]!r}; {FEEDBACK_HINT}.")
        data, label, score = _feedback_image(uploads, fields, recent)
        try:
            await run_in_threadpool(decode_upload, data, label, limits.max_pixels)  # refuse what cannot be scored
        except UploadError as e:
            return JSONResponse({"detail": e.message}, status_code=e.status)
        try:
            rec = await asyncio.wait_for(run_in_threadpool(store.add, data, verdict, label=label,
                                                           model_sha256=served.sha256, score=score),
                                         limits.timeout_s)
        except AnomapError as e:
            return JSONResponse({"detail": str(e)}, status_code=507)
        return JSONResponse({"status": "stored", "record": rec.id, "verdict": rec.verdict, "label": rec.label,
                             "model_sha256": rec.model_sha256}, status_code=201)


def _feedback_image(uploads: list[tuple[str, bytes]], fields: dict[str, str],
                    recent: RecentUploads | None) -> tuple[bytes, str, float | None]:
    if len(uploads) > 1:
        raise HTTPException(400, f"send one image per feedback request, not {len(uploads)}.")
    if uploads:
        return uploads[0][1], uploads[0][0], None
    key = fields.get("id", "").strip()
    if not key:
        raise HTTPException(400, f"the request holds neither an image nor an id; {FEEDBACK_HINT}.")
    hit = recent.get(key) if recent is not None else None
    if hit is None:
        raise HTTPException(404, f"no recent prediction has id {key[:40]!r} (the server keeps the last uploads "
                                 "for a while only); send the image itself.")
    return hit
