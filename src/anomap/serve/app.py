"""The prediction service: a FastAPI app over one model (PyTorch or ONNX backend).

``create_app("model.safetensors")`` gives an ASGI app with

- ``POST /v1/predict``: one or several images as multipart upload -> score, verdict and threshold per
  image, the heat-map overlay as a PNG data URI with ``?heatmap=true``, the threshold set per request
  with ``?threshold=``;
- ``GET /v1/model``: method, config, calibration, versions and this server's limits;
- ``GET /healthz``: liveness, and what the calibrated threshold promises (``calibration``); OpenAPI at
  ``/openapi.json`` and ``/docs``; the web page at ``/``.

Hardening: a request-body byte limit (413), a per-image pixel limit read from the header (413), content
checks (415 not an image, 400 undecodable), a per-request timeout (504), bounded admission (503 at once
when ``concurrency + queue`` requests are in the house), an optional API key (``ANOMAP_API_KEY``, header
``X-API-Key``, constant-time compare, 401), and CORS only for the origins given. Uploaded file names are
labels only; nothing from a request is used as a path. Decoding and inference run in worker threads.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import APIKeyHeader
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from anomap._version import __version__
from anomap.report.overlay import downscale, heatmap_overlay, png_data_uri
from anomap.runtime.backend import Backend, load_backend
from anomap.serve.decode import ACCEPTED_TEXT, UploadError, clean_label, decode_upload
from anomap.serve.limits import Gate, Limits, Overloaded, TimedOut
from anomap.serve.security import SecurityHeaders, docs_routes

log = logging.getLogger("anomap.serve")

API_KEY_ENV = "ANOMAP_API_KEY"
API_KEY_HEADER = "X-API-Key"
STATIC_DIR = Path(__file__).parent / "static"
# training paths, file names and fingerprints stay on the server
PRIVATE_INFO_KEYS = ("dataset", "heldout_files", "heldout_sha256")
MULTIPART_HINT = "send images as multipart/form-data, e.g. curl -F file=@part.png http://HOST:PORT/v1/predict"


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


async def _read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``max_bytes``."""
    too_big = f"request body is over this server's limit of {max_bytes:,} bytes; send fewer or smaller images."
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise HTTPException(400, "the Content-Length header is not a number.") from None
        if size > max_bytes:
            raise HTTPException(413, too_big)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise HTTPException(413, too_big)
    return bytes(body)


async def _read_uploads(request: Request, limits: Limits) -> list[tuple[str, bytes]]:
    """(label, bytes) for every file part of a multipart request, in order; text fields are ignored."""
    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise HTTPException(415, f"expected a multipart/form-data upload, got {ctype[:80] or 'no Content-Type'}; "
                                 f"{MULTIPART_HINT}.")
    body = await _read_body(request, limits.max_bytes)

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    uploads: list[tuple[str, bytes]] = []
    async with Request(request.scope, replay).form(max_files=limits.max_files, max_fields=64) as form:
        for _, value in form.multi_items():
            if isinstance(value, UploadFile):
                uploads.append((clean_label(value.filename, len(uploads)), await value.read()))
    if not uploads:
        raise HTTPException(400, f"the request holds no file; {MULTIPART_HINT}.")
    return uploads


class Predictor:
    """Decodes, scores and renders uploads (runs in a worker thread).

    Uploads are decoded here (with the service's limits), then scored through the backend's
    :meth:`~anomap.runtime.backend.Backend.score`: the one prepare-and-score path of anomap.
    """

    def __init__(self, backend: Backend, limits: Limits):
        self.backend = backend
        self.limits = limits

    def _chunks(self, uploads: list[tuple[str, bytes]]) -> Iterator[list[tuple[str, np.ndarray]]]:
        """Decoded images in chunks of at most ``batch_size`` images and about ``max_pixels`` pixels."""
        chunk: list[tuple[str, np.ndarray]] = []
        pixels = 0
        for label, data in uploads:
            img = decode_upload(data, label, self.limits.max_pixels)
            if chunk and (len(chunk) >= self.backend.batch_size or pixels + img.shape[0] * img.shape[1]
                          > self.limits.max_pixels):
                yield chunk
                chunk, pixels = [], 0
            chunk.append((label, img))
            pixels += img.shape[0] * img.shape[1]
        if chunk:
            yield chunk

    def __call__(self, uploads: list[tuple[str, bytes]], threshold: float | None,
                 heatmap: bool) -> list[dict[str, Any]]:
        cal = self.backend.calibration
        out: list[dict[str, Any]] = []
        for chunk in self._chunks(uploads):
            res = self.backend.score([img for _, img in chunk], threshold=threshold, maps=heatmap)
            for k, (label, img) in enumerate(chunk):
                score = float(res.scores[k])
                finite = math.isfinite(score)
                item = {"label": label, "score": score if finite else None, "threshold": threshold,
                        "is_anomalous": res.is_anomalous[k] if finite else None,
                        "width": int(img.shape[1]), "height": int(img.shape[0]), "heatmap": None}
                if heatmap:
                    item["heatmap"] = self._overlay(img, res.maps[k], cal.map_low, cal.map_scale)
                out.append(item)
        return out

    def _overlay(self, img: np.ndarray, amap: np.ndarray, low: float | None, top: float | None) -> str:
        amap = np.nan_to_num(np.asarray(amap, dtype=np.float32))
        if low is None or top is None:
            low, top = float(amap.min()), float(amap.max())
        side = self.limits.heatmap_side
        return png_data_uri(heatmap_overlay(downscale(img, side), amap, low, top), max_side=side)


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
               limits: Limits | None = None, api_key: str | None = None,
               cors_origins: Sequence[str] = ()) -> FastAPI:
    """Build the service for one model.

    Args:
        model: a ``.safetensors`` (torch) or ``.onnx`` file, or an already loaded :class:`Backend`.
        backend: "torch" or "onnx"; None infers it from the file suffix.
        device: torch device for the torch backend (cpu, cuda, auto).
        limits: request limits and concurrency (defaults: :class:`Limits`).
        api_key: the key clients must send in ``X-API-Key`` for ``/v1/*``; None reads ``ANOMAP_API_KEY``
            (unset or empty: no key). ``/``, ``/healthz`` and the docs stay open.
        cors_origins: origins allowed to call the API from a browser (none by default: CORS off).

    Raises:
        CheckpointError, ConfigError: the model cannot be loaded (before anything is served).
    """
    be = model if isinstance(model, Backend) else load_backend(model, backend, device=device)
    limits = limits or Limits()
    key = os.environ.get(API_KEY_ENV, "") if api_key is None else api_key
    gate = Gate(limits.concurrency, limits.queue)
    predictor = Predictor(be, limits)

    app = FastAPI(title="anomap", version=__version__, docs_url=None, redoc_url=None,
                  description="Visual anomaly detection: score images and see where they differ from the "
                              f"normal images the model was trained on. Uploads: {ACCEPTED_TEXT}.")
    app.state.backend, app.state.limits, app.state.gate = be, limits, gate
    app.add_middleware(SecurityHeaders)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=[API_KEY_HEADER, "Content-Type"])
    docs_routes(app)
    require_key = _key_check(key)
    _error_handlers(app)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/healthz", tags=["service"], summary="liveness (never needs the API key)")
    def healthz() -> dict[str, Any]:
        cal = be.calibration  # what the verdicts' threshold promises (docs/protocol.md)
        return _finite({"status": "ok", "method": be.method, "backend": be.name, "in_flight": gate.active,
                        "calibration": {"target_fpr": cal.target_fpr, "promised_fpr": cal.promised_fpr,
                                        "fpr_upper95": cal.fpr_upper95, "n_heldout": cal.n_heldout}})

    @app.get("/v1/model", tags=["model"], summary="method, config, calibration and versions",
             dependencies=[Depends(require_key)])
    def model_info() -> dict[str, Any]:
        info = {k: v for k, v in (be.meta.get("info") or {}).items() if k not in PRIVATE_INFO_KEYS}
        return _finite({
            "method": be.method, "backend": be.name, "channels": be.channels, "image_size": be.image_size,
            "config": be.meta.get("config", {}), "calibration": be.calibration.to_dict(), "info": info,
            "version": be.meta.get("anomap_version"), "server_version": __version__,
            "limits": limits.to_dict(), "api_key_required": bool(key),
        })

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
        thr, source = (threshold, "request") if threshold is not None else (
            (be.calibration.threshold, "calibration") if be.calibration.threshold is not None else (None, "none"))
        try:
            gate.enter()
        except Overloaded:
            return _error(503, "server busy: too many requests in progress; retry shortly.", {"Retry-After": "1"})
        handed = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limits.timeout_s
        try:
            try:
                uploads = await asyncio.wait_for(_read_uploads(request, limits), limits.timeout_s)
            except TimeoutError:
                return _error(408, f"the upload did not arrive within {limits.timeout_s:g} s.")
            handed = True
            results = await gate.run(lambda: run_in_threadpool(predictor, uploads, thr, heatmap),
                                     deadline - loop.time())
        except UploadError as e:
            return _error(e.status, e.message)
        except TimedOut:
            return _error(504, f"the request took longer than this server's limit of {limits.timeout_s:g} s.")
        finally:
            if not handed:
                gate.leave()
        ms = (time.perf_counter() - t0) * 1000.0
        log.info("scored %d image(s) in %.1f ms", len(results), ms)
        return _finite({"results": results, "threshold": thr, "threshold_source": source, "method": be.method,
                        "backend": be.name, "elapsed_ms": round(ms, 2)})

    return app
