"""The served model (swappable on reload) and the request-side half of scoring.

A request's thread decodes its uploads (with the service's limits) and prepares each image at the
model's working size, keeping only a small copy for the heat-map overlay; the prepared images are then
scored in a shared batch (:mod:`anomap.serve.batcher`) by the backend's ``predict_prepared``, the model
call every anomap path uses (:func:`anomap.inference.score_images` is the same prepare + call). Verdicts
and overlays are made back in the request's thread with the calibration of the model that scored it.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool

from anomap import inference
from anomap.feedback import model_hash
from anomap.report.overlay import downscale, heatmap_overlay, png_data_uri
from anomap.runtime.backend import Backend
from anomap.serve.batcher import Batcher
from anomap.serve.decode import decode_upload
from anomap.serve.limits import Limits
from anomap.serve.metrics import ServiceMetrics


def hash_of(backend: Backend) -> str | None:
    """The hash feedback records carry: of the file a user names (the source of a start-up export)."""
    model = backend.source or backend.path
    return model_hash(model) if model is not None else None


class Served:
    """The model being served; :meth:`set` replaces it between batches (in-flight batches keep theirs)."""

    def __init__(self, backend: Backend, loader: Callable[[], Backend] | None = None):
        self.loader = loader
        self.lock = asyncio.Lock()  # one reload at a time
        self.set(backend, hash_of(backend))

    def load(self) -> tuple[Backend, str | None]:
        """The model file loaded again and its hash (blocking: run it in a worker thread)."""
        assert self.loader is not None
        backend = self.loader()
        return backend, hash_of(backend)

    def set(self, backend: Backend, sha256: str | None) -> None:
        self.sha256 = sha256
        self.loaded_at = time.time()
        self.backend = backend  # one attribute store: a batch reads either the old or the new model

    def describe(self) -> dict[str, Any]:
        return {"model_sha256": self.sha256, "loaded_at": self.loaded_at}


@dataclass
class Prepared:
    label: str
    image: np.ndarray  # uint8 (S, S, C) at the working size
    width: int
    height: int
    preview: np.ndarray | None  # downscaled RGB for the overlay (only when a heat map is wanted)
    data: bytes  # the upload (kept for feedback by id)


class RecentUploads:
    """The last predicted uploads by id (bounded in bytes) so that feedback can name an image by id."""

    def __init__(self, max_bytes: int = 64 << 20):
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[bytes, str, float | None]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, data: bytes, label: str, score: float | None) -> str:
        key = uuid.uuid4().hex
        if len(data) > self.max_bytes:
            return key  # too big to keep: feedback must send the image itself
        with self._lock:
            self._items[key] = (data, label, score)
            self._bytes += len(data)
            while self._bytes > self.max_bytes:
                _, (old, _, _) = self._items.popitem(last=False)
                self._bytes -= len(old)
        return key

    def get(self, key: str) -> tuple[bytes, str, float | None] | None:
        with self._lock:
            return self._items.get(key)


class Predictor:
    """Decode + prepare (request thread), score (shared batch), verdicts + overlays (request thread)."""

    def __init__(self, served: Served, limits: Limits, batcher: Batcher, metrics: ServiceMetrics,
                 recent: RecentUploads | None = None):
        self.served, self.limits, self.batcher = served, limits, batcher
        self.metrics, self.recent = metrics, recent

    def prepare(self, uploads: Sequence[tuple[str, bytes]], heatmap: bool) -> list[Prepared]:
        be = self.served.backend
        out = []
        for label, data in uploads:
            img = decode_upload(data, label, self.limits.max_pixels)
            small, (h, w) = inference.prepare_image(img, be.channels, be.work_hw)
            preview = downscale(img, self.limits.heatmap_side) if heatmap else None
            out.append(Prepared(label, small, w, h, preview, data if self.recent is not None else b""))
        return out

    async def __call__(self, uploads: Sequence[tuple[str, bytes]], threshold: float | None,
                       heatmap: bool, timeout_s: float) -> tuple[list[dict[str, Any]], float | None, str, str]:
        """Results in upload order, the threshold used, its source, and the backend that scored them."""
        items = await run_in_threadpool(self.prepare, uploads, heatmap)
        scores, maps, be = await self.batcher.submit([p.image for p in items], heatmap, timeout_s)
        thr, source = (threshold, "request") if threshold is not None else (
            (be.calibration.threshold, "calibration") if be.calibration.threshold is not None else (None, "none"))
        results = await run_in_threadpool(self._results, items, scores, maps, be, thr)
        return results, thr, source, be.name

    def _results(self, items: list[Prepared], scores: np.ndarray, maps: list[np.ndarray], be: Backend,
                 thr: float | None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        flags: list[bool | None] = []
        for k, p in enumerate(items):
            score = float(scores[k])
            finite = math.isfinite(score)
            flag = None if thr is None or not finite else score > thr
            flags.append(flag)
            item = {"label": p.label, "score": score if finite else None, "threshold": thr, "is_anomalous": flag,
                    "width": p.width, "height": p.height, "heatmap": None, "id": None}
            if p.preview is not None:
                item["heatmap"] = self._overlay(p.preview, maps[k], be)
            if self.recent is not None:
                item["id"] = self.recent.put(p.data, p.label, score if finite else None)
            out.append(item)
        self.metrics.observe_scores([float(s) for s in scores], flags)
        return out

    def _overlay(self, preview: np.ndarray, amap: np.ndarray, be: Backend) -> str:
        cal = be.calibration
        amap = np.nan_to_num(np.asarray(amap, dtype=np.float32))
        low, top = cal.map_low, cal.map_scale
        if low is None or top is None:
            low, top = float(amap.min()), float(amap.max())
        return png_data_uri(heatmap_overlay(preview, amap, low, top), max_side=self.limits.heatmap_side)


Scored = tuple[np.ndarray, list[np.ndarray], Backend]


def batch_scorer(served: Served) -> Callable[[Sequence[np.ndarray], bool], Scored]:
    """The batcher's model call: prepared images -> raw scores, raw (S, S) maps, and the backend used."""

    def score(images: Sequence[np.ndarray], maps: bool) -> Scored:
        be = served.backend
        s, m = be.predict_prepared(np.stack(images))
        return s, list(m) if maps else [], be

    return score
