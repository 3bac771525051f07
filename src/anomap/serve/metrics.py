"""``GET /metrics``: the service's Prometheus metrics, and the drift signal (docs/deploy.md).

All metrics live in the app's own :class:`prometheus_client.CollectorRegistry` (two apps in one process,
as in the tests, do not share counters). Names start with ``anomap_``.

The drift signal: a model's held-out normal scores give a reference quantile (``drift_quantile``, 0.99 by
default) and the share of new normal images expected above it. Over the last ``drift_window`` scored
images the service counts the share actually above it. On a stable line the two agree; a moved camera,
a dimmed lamp or a new batch of material pushes the observed share up long before anyone reads a report.
``anomap_drift_zscore`` is that excess in binomial standard errors, ready for an alert rule.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Sequence

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from anomap.types import Calibration

__all__ = ["CONTENT_TYPE_LATEST", "DriftWindow", "ServiceMetrics", "reference_quantile"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
SCORE_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)


def reference_quantile(heldout: Sequence[float], q: float) -> tuple[float, float] | None:
    """(reference score, expected share of new normals above it) from held-out normal scores.

    The reference is the k-th smallest held-out score with ``k = ceil(q (n + 1))`` (at most n); a new
    normal image exchangeable with the n held-out ones lands above it with probability ``(n + 1 - k) /
    (n + 1)`` (the conformal rank argument: ``1 - q`` or a little more). None without held-out scores.
    """
    scores = np.sort(np.asarray([s for s in heldout if math.isfinite(s)], dtype=np.float64))
    n = len(scores)
    if n == 0:
        return None
    k = min(n, max(1, math.ceil(q * (n + 1))))
    return float(scores[k - 1]), (n + 1 - k) / (n + 1)


class DriftWindow:
    """Share of the last ``size`` scores above a reference, against the share expected (thread-safe)."""

    def __init__(self, reference: float | None, expected: float, size: int = 500):
        self.reference, self.expected, self.size = reference, expected, size
        self._above: deque[bool] = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, scores: Sequence[float]) -> None:
        if self.reference is None:
            return
        with self._lock:
            self._above.extend(bool(s > self.reference) for s in scores if math.isfinite(s))

    def count(self) -> int:
        return len(self._above)

    def share(self) -> float:
        with self._lock:
            n = len(self._above)
            return sum(self._above) / n if n else math.nan

    def zscore(self) -> float:
        """(observed - expected) / its binomial standard error over the window; NaN while empty."""
        n, p = self.count(), self.expected
        if n == 0 or not 0 < p < 1:
            return math.nan
        return (self.share() - p) / math.sqrt(p * (1 - p) / n)


class ServiceMetrics:
    """The counters, histograms and gauges of one app; ``calibrate`` resets the model-dependent ones."""

    def __init__(self, calibration: Calibration, drift_quantile: float = 0.99, drift_window: int = 500):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("anomap_requests", "HTTP requests answered, by route and status code",
                                ["route", "status"], registry=r)
        self.latency = Histogram("anomap_request_duration_seconds", "time from request to response, by route",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("anomap_batch_size_images", "images per model call (dynamic batching)",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.scored = Counter("anomap_images_scored", "images scored", registry=r)
        self.flagged = Counter("anomap_images_flagged", "images whose verdict was anomalous", registry=r)
        self.queue_depth = Gauge("anomap_queue_depth_images", "images waiting for a batch", registry=r)
        self.in_flight = Gauge("anomap_requests_in_flight", "admitted requests not answered yet", registry=r)
        self.reloads = Counter("anomap_model_reloads", "model reloads, by result", ["result"], registry=r)
        self.drift_quantile, self.drift_size = drift_quantile, drift_window
        self.score_hist: Histogram | None = None
        self.drift = DriftWindow(None, math.nan, drift_window)
        for name, doc, fn in (
            ("anomap_drift_share", "share of the last window's images scored above the held-out reference",
             lambda: self.drift.share()),
            ("anomap_drift_expected_share", "share expected above the reference from the calibration",
             lambda: self.drift.expected),
            ("anomap_drift_zscore", "(observed - expected share) in binomial standard errors",
             lambda: self.drift.zscore()),
            ("anomap_drift_window_images", "images in the drift window", lambda: self.drift.count()),
            ("anomap_drift_reference_score", "the held-out normal score quantile the window compares with",
             lambda: math.nan if self.drift.reference is None else self.drift.reference),
        ):
            Gauge(name, doc, registry=r).set_function(fn)
        self.calibrate(calibration)

    def calibrate(self, calibration: Calibration) -> None:
        """Score buckets and drift reference of a (new) model; the drift window starts empty."""
        ref = reference_quantile(calibration.heldout_scores, self.drift_quantile)
        self.drift = DriftWindow(ref[0] if ref else None, ref[1] if ref else math.nan, self.drift_size)
        if self.score_hist is not None:
            self.registry.unregister(self.score_hist)
        self.score_hist = Histogram("anomap_image_score", "raw image scores; bucket edges are held-out normal "
                                    "score quantiles (0.1 ... 0.99) and the threshold x 1, 1.5, 2, 4",
                                    buckets=score_buckets(calibration), registry=self.registry)

    def observe_scores(self, scores: Sequence[float], flags: Sequence[bool | None]) -> None:
        self.scored.inc(len(scores))
        self.flagged.inc(sum(1 for f in flags if f))
        assert self.score_hist is not None
        for s in scores:
            if math.isfinite(s):
                self.score_hist.observe(s)
        self.drift.add(scores)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def score_buckets(calibration: Calibration) -> list[float]:
    """Sorted distinct bucket edges for the score histogram (Prometheus adds +Inf)."""
    held = [s for s in calibration.heldout_scores if math.isfinite(s)]
    edges = [float(np.quantile(held, q)) for q in SCORE_QUANTILES] if held else []
    thr = calibration.threshold
    if thr is not None and math.isfinite(thr):
        edges += [thr * f for f in (1.0, 1.5, 2.0, 4.0)] if thr > 0 else [thr]
    if not edges:
        edges = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
    return sorted({round(e, 9) for e in edges})
