"""The prediction service: a FastAPI app over one model (PyTorch or ONNX backend).

``create_app("model.safetensors")`` gives an ASGI app with

- ``POST /v1/predict``: one or several images as multipart upload -> score, verdict, threshold and an
  ``id`` per image, the heat-map overlay as a PNG data URI with ``?heatmap=true``, the threshold set per
  request with ``?threshold=``; concurrent requests are scored together (dynamic batching,
  :mod:`anomap.serve.batcher`);
- ``GET /v1/model``: method, config, calibration, versions and this server's limits;
- ``GET /healthz``: liveness, the backend and batching in use, the model's hash, and what the calibrated
  threshold promises (``calibration``); OpenAPI at ``/openapi.json`` and ``/docs``; the web page at ``/``;
- ``GET /metrics``, ``POST /v1/feedback``, ``POST /v1/reload``: :mod:`anomap.serve.ops`.

Hardening: a request-body byte limit (413), a per-image pixel limit read from the header (413), content
checks (415 not an image, 400 undecodable), a per-request timeout (504), bounded admission (503 at once
when ``Limits.capacity`` requests are in the house), an optional API key (``ANOMAP_API_KEY``, header
``X-API-Key``, constant-time compare, 401), and CORS only for the origins given. Uploaded file names are
labels only; nothing from a request is used as a path. Decoding and inference run in worker threads.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import APIKeyHeader
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from anomap._version import __version__
from anomap.runtime.backend import Backend, load_backend
from anomap.serve.batcher import Batcher
from anomap.serve.decode import ACCEPTED_TEXT, UploadError, read_form
from anomap.serve.limits import Gate, Limits, Overloaded, TimedOut
from anomap.serve.metrics import ServiceMetrics
from anomap.serve.ops import CountRequests, ops_routes, reload_model
from anomap.serve.predictor import Predictor, RecentUploads, Served, batch_scorer
from anomap.serve.security import SecurityHeaders, docs_routes

log = logging.getLogger("anomap.serve")

API_KEY_ENV = "ANOMAP_API_KEY"
API_KEY_HEADER = "X-API-Key"
STATIC_DIR = Path(__file__).parent / "static"
# training paths, file names and fingerprints stay on the server
PRIVATE_INFO_KEYS = ("dataset", "heldout_files", "heldout_sha256")


class ImageResult(BaseModel):
    """The verdict on one uploaded image."""

    label: str = Field(description="the upload's file name (a label only, never used as a path)")
    score: float | None = Field(description="raw anomaly score (higher = more anomalous); null if not finite")
    is_anomalous: bool | None = Field(description="score > threshold; null when there is no threshold")
    threshold: float | None = Field(description="the threshold this verdict used")
    width: int
    height: int
    heatmap: str | None = Field(None, description="heat-map overlay as a data:image/png;base64 URI "
                                                  "(only with ?heatmap=true)")
    id: str | None = Field(None, description="names this upload in POST /v1/feedback for a while (null when "
                                             "feedback is off)")


class PredictResponse(BaseModel):
    """Results in upload order, and where the threshold came from."""

    results: list[ImageResult]
    threshold: float | None
    threshold_source: str = Field(description="'request' (?threshold=), 'calibration' or 'none'")
    method: str
    backend: str
    elapsed_ms: float


def _finite(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become None (JSON has no NaN), containers are walked."""
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _key_check(key: str) -> Callable[..., None]:
    """A FastAPI dependency that refuses a request without ``key`` in the API-key header (none: all pass)."""
    header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False,
                          description=f"required when the server sets {API_KEY_ENV}")

    def require_key(given: str | None = Depends(header)) -> None:
        if key and not (given and hmac.compare_digest(given.encode(), key.encode())):
            raise HTTPException(401, f"missing or wrong API key: send it in the {API_KEY_HEADER} header.",
                                headers={"WWW-Authenticate": API_KEY_HEADER})

    return require_key


def _error_handlers(app: FastAPI) -> None:
    """Every error leaves as the same JSON shape: HTTP errors, bad parameters and crashes (logged)."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def bad_params(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in exc.errors()]
        return _error(400, "invalid request: " + "; ".join(parts))

    @app.exception_handler(Exception)
    async def crash(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error while serving a request")
        return _error(500, f"internal error ({type(exc).__name__}); the server log has the details.")


def create_app(model: str | Path | Backend, backend: str | None = None, *, device: str | None = None,
               limits: Limits | None = None, api_key: str | None = None, cors_origins: Sequence[str] = (),
               feedback_dir: str | Path | None = None, loader: Callable[[], Backend] | None = None,
               sighup: bool = False) -> FastAPI:
    """Build the service for one model.

    Args:
        model: a ``.safetensors`` (torch) or ``.onnx`` file, or an already loaded :class:`Backend`.
        backend: "torch" or "onnx"; None infers it from the file suffix.
        device: torch device for the torch backend (cpu, cuda, auto).
        limits: request limits, batching and concurrency (defaults: :class:`Limits`).
        api_key: the key clients must send in ``X-API-Key`` for ``/v1/*``; None reads ``ANOMAP_API_KEY``
            (unset or empty: no key). ``/``, ``/healthz``, ``/metrics`` and the docs stay open.
        cors_origins: origins allowed to call the API from a browser (none by default: CORS off).
        feedback_dir: where ``POST /v1/feedback`` stores operators' verdicts (None: feedback is off).
        loader: loads the model file again for ``POST /v1/reload`` (default: the same file and backend).
        sighup: also reload on SIGHUP (only where the app runs in the main thread, as ``anomap serve``).

    Raises:
        CheckpointError, ConfigError: the model cannot be loaded (before anything is served).
    """
    be = model if isinstance(model, Backend) else load_backend(model, backend, device=device)
    if loader is None and be.path is not None and be.source is None:
        path, kind, batch = be.path, be.name, be.batch_size
        loader = lambda: load_backend(path, kind, device=device, batch_size=batch)  # noqa: E731
    limits = limits or Limits()
    key = os.environ.get(API_KEY_ENV, "") if api_key is None else api_key
    served = Served(be, loader)
    metrics = ServiceMetrics(be.calibration)
    gate = Gate(limits.slots, limits.queue)
    batcher = Batcher(batch_scorer(served), limits.max_batch, limits.max_wait_ms, limits.concurrency,
                      on_batch=metrics.batch_size.observe)
    metrics.queue_depth.set_function(lambda: batcher.queued_images)
    metrics.in_flight.set_function(lambda: gate.active)
    store = None
    if feedback_dir is not None:
        from anomap.feedback import FeedbackStore

        store = FeedbackStore(feedback_dir)
    recent = RecentUploads() if store is not None else None
    predictor = Predictor(served, limits, batcher, metrics, recent)

    app = FastAPI(title="anomap", version=__version__, docs_url=None, redoc_url=None,
                  lifespan=_on_sighup(served, metrics) if sighup else None,
                  description="Visual anomaly detection: score images and see where they differ from the "
                              f"normal images the model was trained on. Uploads: {ACCEPTED_TEXT}.")
    app.state.served, app.state.limits, app.state.gate = served, limits, gate
    app.state.metrics, app.state.batcher = metrics, batcher
    app.add_middleware(SecurityHeaders)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=[API_KEY_HEADER, "Content-Type"])
    app.add_middleware(CountRequests, metrics=metrics)
    docs_routes(app)
    require_key = _key_check(key)
    _error_handlers(app)
    ops_routes(app, served, metrics, limits, require_key, store, recent)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/healthz", tags=["service"], summary="liveness (never needs the API key)")
    def healthz() -> dict[str, Any]:
        be = served.backend
        cal = be.calibration  # what the verdicts' threshold promises (docs/protocol.md)
        return _finite({"status": "ok", "method": be.method, "backend": backend_label(be), "in_flight": gate.active,
                        "batching": {"max_batch": limits.max_batch, "max_wait_ms": limits.max_wait_ms,
                                     "queued_images": batcher.queued_images},
                        "feedback": store is not None, **served.describe(),
                        "calibration": {"target_fpr": cal.target_fpr, "promised_fpr": cal.promised_fpr,
                                        "fpr_upper95": cal.fpr_upper95, "n_heldout": cal.n_heldout,
                                        "n_group_scores": len(cal.group_scores)}})

    @app.get("/v1/model", tags=["model"], summary="method, config, calibration and versions",
             dependencies=[Depends(require_key)])
    def model_info() -> dict[str, Any]:
        be = served.backend
        info = {k: v for k, v in (be.meta.get("info") or {}).items() if k not in PRIVATE_INFO_KEYS}
        return _finite({
            "method": be.method, "backend": be.name, "channels": be.channels, "image_size": be.image_size,
            "work_shape": list(be.work_hw),
            "config": be.meta.get("config", {}), "calibration": be.calibration.to_dict(), "info": info,
            "version": be.meta.get("anomap_version"), "server_version": __version__,
            "limits": limits.to_dict(), "api_key_required": bool(key), "feedback": store is not None,
        })

    _predict_route(app, served, predictor, gate, limits, require_key)
    return app


def backend_label(be: Backend) -> str:
    """What scores the batches: "onnx", "onnx (exported at start-up from M.safetensors)", "torch" or
    "torch (compiled)"."""
    if be.source is not None and be.source != be.path:
        return f"{be.name} (exported at start-up from {be.source.name})"
    compiled = getattr(getattr(be, "detector", None), "_compiled", None) is not None
    return f"{be.name} (compiled)" if compiled else be.name


def _on_sighup(served: Served, metrics: ServiceMetrics) -> Callable[[FastAPI], Any]:
    """Lifespan that reloads the model on SIGHUP (errors are logged; the old model keeps serving)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()

        async def reload() -> None:
            try:
                await reload_model(served, metrics)
            except HTTPException as e:
                log.error("SIGHUP: %s", e.detail)

        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(reload()))
        try:
            yield
        finally:
            loop.remove_signal_handler(signal.SIGHUP)

    return lifespan


def _predict_route(app: FastAPI, served: Served, predictor: Predictor, gate: Gate, limits: Limits,
                   require_key: Callable[..., None]) -> None:
    @app.post("/v1/predict", tags=["model"], response_model=PredictResponse, dependencies=[Depends(require_key)],
              summary="score one or several images (multipart upload)",
              responses={400: {"description": "no file, or an image that cannot be decoded"},
                         401: {"description": "API key missing or wrong"},
                         413: {"description": "request over the byte limit or an image over the pixel limit"},
                         415: {"description": f"not multipart, or a file that is not a {ACCEPTED_TEXT} image"},
                         503: {"description": "server busy: retry later"},
                         504: {"description": "the request took longer than the server's timeout"}},
              openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                  "type": "object", "properties": {"file": {"type": "array", "description": "images; any "
                                                            "field name works, every file part is scored",
                                                            "items": {"type": "string", "format": "binary"}}}}}}}})
    async def predict(
        request: Request,
        threshold: float | None = Query(None, description="decide with this threshold instead of the "
                                                          "calibrated one"),
        heatmap: bool = Query(False, description="also return the heat-map overlay as a PNG data URI"),
    ) -> dict[str, Any] | JSONResponse:
        t0 = time.perf_counter()
        if threshold is not None and not math.isfinite(threshold):
            raise HTTPException(400, "threshold must be a finite number.")
        try:
            gate.enter()
        except Overloaded:
            return _error(503, "server busy: too many requests in progress; retry shortly.", {"Retry-After": "1"})
        handed = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limits.timeout_s
        try:
            try:
                uploads, _ = await asyncio.wait_for(read_form(request, limits), limits.timeout_s)
            except TimeoutError:
                return _error(408, f"the upload did not arrive within {limits.timeout_s:g} s.")
            handed = True
            results, thr, source, name = await gate.run(
                lambda: predictor(uploads, threshold, heatmap, deadline - loop.time()), deadline - loop.time())
        except UploadError as e:
            return _error(e.status, e.message)
        except TimedOut:
            return _error(504, f"the request took longer than this server's limit of {limits.timeout_s:g} s.")
        finally:
            if not handed:
                gate.leave()
        ms = (time.perf_counter() - t0) * 1000.0
        log.info("scored %d image(s) in %.1f ms", len(results), ms)
        return _finite({"results": results, "threshold": thr, "threshold_source": source,
                        "method": served.backend.method, "backend": name, "elapsed_ms": round(ms, 2)})
