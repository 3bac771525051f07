"""Tests for the HTML report and heat-map overlay helpers (no detector needed: fake results)."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
from PIL import Image

from anomap.report.html import (
    GROUP_MISSES,
    GROUP_TOP_DEFECTS,
    GROUP_TOP_GOOD,
    Example,
    render_report,
    select_examples,
)
from anomap.report.overlay import colormap, heatmap_overlay, png_data_uri, side_by_side
from anomap.types import EvalResult

WEIRD_PATH = "test/crack/a<b&c.png"


def _rows() -> list[dict]:
    rows = []
    for i in range(8):
        rows.append({"path": f"test/good/{i:03d}.png", "defect_type": "good", "label": 0,
                     "score": 0.1 * i, "is_anomalous": i >= 7})
    for i in range(6):
        rows.append({"path": f"test/scratch/{i:03d}.png", "defect_type": "scratch", "label": 1,
                     "score": 0.5 + 0.2 * i, "is_anomalous": i >= 2})
    rows.append({"path": WEIRD_PATH, "defect_type": "crack", "label": 1, "score": 0.05, "is_anomalous": False})
    return rows


def _result(curves: dict | None = None) -> EvalResult:
    x = np.linspace(0, 1, 50)
    if curves is None:
        curves = {
            "image_roc": {"fpr": x.tolist(), "tpr": np.sqrt(x).tolist()},
            "pixel_roc": {"fpr": x.tolist(), "tpr": (x ** 0.2).tolist()},
            "pro": {"fpr": (x * 0.5).tolist(), "pro": np.clip(x * 3, 0, 1).tolist()},
        }
    metrics = {"image_auroc": 0.91234, "pixel_auroc": 0.97651, "aupro": 0.81111, "image_f1max": 0.88888,
               "image_aupr": 0.93333, "test_fpr": 0.0625, "test_recall": None}
    info = {"method": "padim", "dataset": "/data/bottle", "image_size": [256, 256], "eval_size": 256,
            "counts": {"good": 8, "scratch": 6, "crack": 1}, "threshold": 0.65, "date": "2024-05-01"}
    return EvalResult(metrics=metrics, rows=_rows(), curves=curves,
                      per_defect={"scratch": 0.95, "crack": 0.125}, info=info)


def _examples(rng: np.random.Generator) -> dict[str, list[Example]]:
    groups: dict[str, list[Example]] = {}
    for g, title in enumerate([GROUP_TOP_DEFECTS, GROUP_TOP_GOOD]):
        items = []
        for j in range(2):
            img = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
            amap = rng.random((20, 24)).astype(np.float32)  # other size: must be resized
            mask = np.zeros((40, 48), dtype=bool)
            mask[10:20, 12:30] = True
            path = WEIRD_PATH if (g, j) == (0, 0) else f"test/x/{g}{j}.png"
            items.append(Example(title=path.rsplit("/", 1)[-1], image=img, amap=amap,
                                 mask=mask if g == 0 else None, score=1.5 - g, label=1 - g,
                                 defect_type="crack" if g == 0 else "good", path=path))
        groups[title] = items
    groups[GROUP_MISSES] = []
    return groups


def test_render_report_content(tmp_path):
    out = render_report(_result(), _examples(np.random.default_rng(0)), tmp_path / "sub" / "r.html",
                        title="T <1>")
    assert out == tmp_path / "sub" / "r.html"
    assert out.exists()
    text = out.read_text(encoding="utf-8")
    for value in ["0.912", "0.977", "0.811", "0.889", "0.933", "0.062"]:
        assert value in text
    assert "n/a" in text  # test_recall is None
    assert text.count("<svg") >= 3
    assert "data:image/png;base64" in text
    assert "http://" not in text and "https://" not in text
    assert "<script" not in text.lower()
    assert "a<b&c.png" not in text
    assert "a&lt;b&amp;c.png" in text
    assert "T &lt;1&gt;" in text
    assert "<details" in text
    assert "padim" in text and "2024-05-01" in text
    # per-image table sorted by score descending
    table = text[text.index("<details"):]
    positions = [table.index(f"test/scratch/{i:03d}.png") for i in (5, 4, 3, 0)]
    assert positions == sorted(positions)
    assert not list(tmp_path.glob("sub/*.tmp"))


def test_render_report_missing_curves_and_examples(tmp_path):
    res = _result(curves={"image_roc": {"fpr": [], "tpr": []}, "pro": {"fpr": [0.0, 0.1]}})
    res.per_defect = {}
    res.info = {}
    out = render_report(res, {}, tmp_path / "r.html")
    text = out.read_text(encoding="utf-8")
    assert text.count("n/a (no curve data)") == 3
    assert "data:image/png;base64" not in text


def test_render_report_fixed_scale(tmp_path):
    text = render_report(_result(), _examples(np.random.default_rng(1)), tmp_path / "r.html",
                         vmin=0.25, vmax=2.5).read_text(encoding="utf-8")
    assert "0.25" in text and "2.5" in text


def test_select_examples_ordering():
    groups = select_examples(_rows(), k=3)
    assert list(groups) == [GROUP_TOP_DEFECTS, GROUP_MISSES, GROUP_TOP_GOOD]
    top = [r["score"] for r in groups[GROUP_TOP_DEFECTS]]
    assert top == sorted(top, reverse=True) and len(top) == 3
    assert all(r["label"] == 1 for r in groups[GROUP_TOP_DEFECTS])
    assert pytest.approx(top[0]) == 1.5
    misses = groups[GROUP_MISSES]
    assert misses[0]["path"] == WEIRD_PATH
    assert [r["score"] for r in misses] == sorted(r["score"] for r in misses)
    good = [r["score"] for r in groups[GROUP_TOP_GOOD]]
    assert good == sorted(good, reverse=True) and all(r["label"] == 0 for r in groups[GROUP_TOP_GOOD])
    assert pytest.approx(good[0]) == 0.7
    assert all(len(v) == 0 for v in select_examples(_rows(), k=0).values())


def test_colormap_endpoints():
    cm = colormap(np.array([[0.0, 0.5, 1.0, -3.0, 7.0, np.nan]]))
    assert cm.shape == (1, 6, 3) and cm.dtype == np.uint8
    lo, mid, hi = cm[0, 0].astype(int), cm[0, 1].astype(int), cm[0, 2].astype(int)
    assert lo[2] > lo[0]  # blue-ish at 0
    assert hi[0] > hi[2]  # red-ish at 1
    assert mid[1] > 150  # bright green-ish in the middle
    assert (cm[0, 3] == cm[0, 0]).all() and (cm[0, 4] == cm[0, 2]).all() and (cm[0, 5] == cm[0, 0]).all()


def test_heatmap_overlay_shape_and_colours():
    img = np.full((32, 40, 3), 128, dtype=np.uint8)
    amap = np.zeros((32, 40), dtype=np.float32)
    amap[:, 20:] = 1.0
    out = heatmap_overlay(img, amap, vmin=0.0, vmax=1.0, alpha=0.6)
    assert out.shape == (32, 40, 3) and out.dtype == np.uint8
    assert np.abs(out[5, 5].astype(int) - out[5, 35].astype(int)).sum() > 60
    assert out[5, 35, 0] > out[5, 5, 0]  # high values are redder


def test_heatmap_overlay_resize_grey_and_mask():
    img = np.zeros((30, 30, 1), dtype=np.uint8)
    amap = np.linspace(0, 1, 100).reshape(10, 10)
    mask = np.zeros((30, 30), dtype=bool)
    mask[10:20, 10:20] = True
    out = heatmap_overlay(img, amap, vmin=0.0, vmax=1.0, alpha=0.0, mask=mask)
    assert out.shape == (30, 30, 3)
    white = (out == 255).all(axis=2)
    assert white[10, 15] and white[15, 10] and white[19, 15]  # contour on the mask border
    assert not white[15, 15] and not white[2, 2] and not white[9, 15]  # neither inside nor outside
    same = heatmap_overlay(img[:, :, 0], amap, vmin=1.0, vmax=1.0)  # degenerate range does not crash
    assert same.shape == (30, 30, 3)


def test_side_by_side_and_data_uri():
    a = np.zeros((20, 10, 3), dtype=np.uint8)
    b = np.zeros((10, 10), dtype=np.uint8)
    out = side_by_side([a, b], gap=4)
    assert out.shape == (20, 10 + 4 + 20, 3) and out.dtype == np.uint8
    assert (out[:, 10:14] == 255).all()
    uri = png_data_uri(np.zeros((600, 300, 3), dtype=np.uint8), max_side=256)
    assert uri.startswith("data:image/png;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert max(decoded.size) == 256 and decoded.size == (128, 256)
    assert re.fullmatch(r"[A-Za-z0-9+/=]+", uri.split(",", 1)[1])
