"""Fuzzing the upload endpoint: random and mutated bytes must give 200 or a clean 4xx JSON error, never 5xx.

Bounded for CI: ``ANOMAP_FUZZ_EXAMPLES`` examples per strategy (default 200), derandomised so a CI run is
reproducible; raise the count (and unset derandomisation with ANOMAP_FUZZ_RANDOM=1) for a longer hunt.
"""

from __future__ import annotations

import io
import math
import os

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
hypothesis = pytest.importorskip("hypothesis")
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anomap.runtime.backend import Backend
from anomap.serve.app import create_app
from anomap.serve.limits import Limits
from anomap.types import Calibration

EXAMPLES = int(os.environ.get("ANOMAP_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                derandomize=os.environ.get("ANOMAP_FUZZ_RANDOM") != "1",
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CLEAN = {200, 400, 413, 415}


class MeanBackend(Backend):
    """The real decode -> channels -> resize path of :class:`Backend`, with the network replaced by a mean."""

    name, method, channels, image_size = "fuzz", "fuzz", 3, 16

    def __init__(self):
        self.calibration = Calibration(threshold=0.5, map_low=0.0, map_scale=1.0)
        self.meta = {"method": "fuzz", "config": {}, "calibration": self.calibration.to_dict(), "info": {}}

    def predict_prepared(self, batch_u8):
        arr = self._check_batch(batch_u8).astype(np.float32) / 255.0
        maps = arr.mean(axis=3)
        return maps.mean(axis=(1, 2)), maps


def _seed_images() -> list[bytes]:
    """Small valid files in every accepted format and several modes, for the mutation strategy."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (12, 9, 3), dtype=np.uint8)
    out = []
    for img, fmt in ((Image.fromarray(rgb), "PNG"), (Image.fromarray(rgb), "JPEG"), (Image.fromarray(rgb), "BMP"),
                     (Image.fromarray(rgb), "TIFF"), (Image.fromarray(rgb[..., 0]), "PNG"),
                     (Image.fromarray(rgb).convert("RGBA"), "PNG"), (Image.fromarray(rgb).convert("P"), "PNG"),
                     (Image.fromarray(rgb).convert("CMYK"), "JPEG"), (Image.fromarray(rgb).convert("1"), "TIFF"),
                     (Image.fromarray(rgb[..., 0].astype(np.uint16) * 257), "PNG")):
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        out.append(buf.getvalue())
    return out


SEEDS = _seed_images()


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for pos, value in draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)), max_size=6)):
        data[pos] = value
    cut = draw(st.integers(1, len(data)))
    return bytes(data[:cut]) if draw(st.booleans()) else bytes(data)


@pytest.fixture(scope="module")
def fuzz_client():
    app = create_app(MeanBackend(), limits=Limits(max_bytes=64 * 1024, max_pixels=1_000_000, max_files=4))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def check(r) -> None:
    assert r.status_code in CLEAN, (r.status_code, r.text[:300])
    body = r.json()
    if r.status_code == 200:
        for res in body["results"]:
            assert res["score"] is None or math.isfinite(res["score"])
            assert res["heatmap"].startswith("data:image/png;base64,")
    else:
        assert isinstance(body["detail"], str) and body["detail"]


@FUZZ
@given(data=st.binary(max_size=4096), name=st.text(max_size=40))
def test_fuzz_random_bytes(fuzz_client, data, name):
    check(fuzz_client.post("/v1/predict?heatmap=true", files=[("file", (name or "x", data, "image/png"))]))


@FUZZ
@given(data=mutated())
def test_fuzz_mutated_images(fuzz_client, data):
    check(fuzz_client.post("/v1/predict?heatmap=true", files=[("file", ("m.img", data, "image/png"))]))


@FUZZ
@given(body=st.binary(max_size=2048), boundary=st.sampled_from(["b", "----x", ""]))
def test_fuzz_raw_multipart_bodies(fuzz_client, body, boundary):
    r = fuzz_client.post("/v1/predict?heatmap=true", content=body,
                         headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    check(r)
