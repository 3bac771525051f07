"""Shape rasterisers and the foreground box used by the corruption generator (numpy + Pillow)."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

Box = tuple[int, int, int, int]  # top, bottom, left, right (bottom/right exclusive)


def _otsu(values: np.ndarray) -> float:
    hist = np.bincount(np.clip(values, 0, 255).astype(np.int64).ravel(), minlength=256).astype(np.float64)
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * np.arange(256))
    mt = m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mt * w0 / w0[-1] - m0) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1.0
    return float(np.argmax(between))


def foreground_box(image: np.ndarray) -> Box:
    """(top, bottom, left, right) of the largest Otsu foreground blob of a uint8 (H, W, C) image.

    The box is widened 10% left/right and 20% top/bottom (ISSTAD); the Otsu class covering most of the
    border is the background; computed at about 64 px. The whole image when nothing is found.
    """
    h, w = image.shape[:2]
    whole = (0, h, 0, w)
    s = max(1, min(h, w) // 64)
    grey = image[::s, ::s].mean(axis=2)
    if grey.max() - grey.min() < 1:
        return whole
    fg = grey > _otsu(grey)
    border = np.concatenate([fg[0], fg[-1], fg[:, 0], fg[:, -1]])
    if border.mean() > 0.5:
        fg = ~fg
    labels, n = ndimage.label(fg)
    if n == 0:
        return whole
    k = int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
    sl = ndimage.find_objects(labels)[k - 1]
    t, b, left, r = sl[0].start * s, min(h, sl[0].stop * s), sl[1].start * s, min(w, sl[1].stop * s)
    dh, dw = round(0.2 * (b - t)), round(0.1 * (r - left))
    return max(0, t - dh), min(h, b + dh), max(0, left - dw), min(w, r + dw)


def random_shape(kind: str, area: float, rng: np.random.Generator, min_px: int, hmax: int, wmax: int) -> np.ndarray:
    """Boolean mask (h, w) of one shape of about ``area`` pixels, centred in its own canvas."""
    a = float(math.exp(rng.uniform(-math.log(3), math.log(3))))  # aspect ratio in [1/3, 3]
    if kind == "rectangle":
        h = int(np.clip(round(math.sqrt(area / a)), min_px, hmax))
        w = int(np.clip(round(area / max(h, 1)), min_px, wmax))
        return np.ones((h, w), dtype=bool)
    if kind == "ellipse":
        ra = max(min_px / 2, math.sqrt(area * a / math.pi))
        rb = max(min_px / 2, area / (math.pi * ra))
        th = rng.uniform(0, math.pi)
        c, s = math.cos(th), math.sin(th)
        ey, ex = math.hypot(ra * s, rb * c), math.hypot(ra * c, rb * s)
        yy = np.arange(-math.ceil(ey), math.ceil(ey) + 1, dtype=np.float32)[:, None]
        xx = np.arange(-math.ceil(ex), math.ceil(ex) + 1, dtype=np.float32)[None, :]
        u, v = xx * c + yy * s, -xx * s + yy * c
        return (u / ra) ** 2 + (v / rb) ** 2 <= 1.0
    if kind == "polygon":
        n = int(rng.integers(3, 9))
        gaps = rng.uniform(0.7, 1.3, n)
        ang = rng.uniform(0, 2 * math.pi) + 2 * math.pi * np.cumsum(gaps) / gaps.sum()
        rad = rng.uniform(0.45, 1.0, n)
        px, py = rad * np.cos(ang) * math.sqrt(a), rad * np.sin(ang) / math.sqrt(a)
        unit_area = 0.5 * abs(float(np.dot(px, np.roll(py, -1)) - np.dot(py, np.roll(px, -1))))
        scale = math.sqrt(area / max(unit_area, 1e-6))
        px, py = px * scale, py * scale
        ext_y = max(float(np.abs(py).max()), min_px / 2)
        ext_x = max(float(np.abs(px).max()), min_px / 2)
        hh, ww = math.ceil(2 * ext_y) + 1, math.ceil(2 * ext_x) + 1
        canvas = Image.new("L", (ww, hh), 0)
        pts = [(float(x + ww / 2 - 0.5), float(y + hh / 2 - 0.5)) for x, y in zip(px, py, strict=True)]
        ImageDraw.Draw(canvas).polygon(pts, fill=1)
        return np.asarray(canvas, dtype=bool)
    # blob: smooth noise (bicubic upsampling of a coarse grid) with a radial envelope, thresholded
    frac = 0.5
    h = int(np.clip(round(math.sqrt(area / frac / a)), min_px, hmax))
    w = int(np.clip(round(area / frac / max(h, 1)), min_px, wmax))
    coarse = rng.standard_normal((5, 5)).astype(np.float32)
    noise = np.asarray(Image.fromarray(coarse, mode="F").resize((w, h), Image.Resampling.BICUBIC))
    yy = np.linspace(-1, 1, h, dtype=np.float32)[:, None]
    xx = np.linspace(-1, 1, w, dtype=np.float32)[None, :]
    field_ = noise - 2.5 * (yy**2 + xx**2)
    k = int((1 - frac) * (field_.size - 1))
    return field_ >= np.partition(field_.ravel(), k)[k]
