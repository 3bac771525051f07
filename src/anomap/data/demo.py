"""The embedded demo category: a printed cast-metal part, built offline and deterministically.

Good parts are crops of scikit-image's ``gravel`` texture (shipped with the package, no network),
tinted like cast metal, with small brightness/contrast/illumination jitter and sensor noise, and a
navy mark (a ring and three text-like bars) printed at a fixed position. Test defects are kinds the
training corruption does not produce: ``scratch`` (thin curved bright or dark line), ``stain``
(translucent soft-edged blob), ``hole`` (dark hole with a shadowed rim) and ``missing_print`` (part of
the mark erased). Each mask is exactly the set of pixels the defect changed, 0.3%-5% of the image.

>>> from anomap.data.demo import build_demo
>>> build_demo(Path("/tmp/anomap_demo"))   # MVTec layout: train/good, test/*, ground_truth/*
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from anomap.errors import DataError

DEFECT_TYPES = ("scratch", "stain", "hole", "missing_print")
MARKER = ".anomap_demo.json"
_VERSION = 1
_INK = np.array([28.0, 42.0, 105.0], dtype=np.float32)
_TINT = np.array([1.0, 0.94, 0.83], dtype=np.float32)
_AREA = (0.003, 0.05)  # allowed mask area, fraction of the image
_texture_cache: list[np.ndarray] = []


def _texture() -> np.ndarray:
    if not _texture_cache:
        from skimage import data

        _texture_cache.append(np.asarray(data.gravel(), dtype=np.float32))
    return _texture_cache[0]


def _ink_alpha(size: int) -> np.ndarray:
    """Coverage (S, S) in [0, 1] of the printed mark, anti-aliased; tiny values set to 0."""
    k = 4
    s = size * k
    canvas = Image.new("L", (s, s), 0)
    draw = ImageDraw.Draw(canvas)
    cy, cx, ro, width = 0.32 * s, 0.30 * s, 0.13 * s, 0.038 * s
    draw.ellipse((cx - ro, cy - ro, cx + ro, cy + ro), fill=255)
    ri = ro - width
    draw.ellipse((cx - ri, cy - ri, cx + ri, cy + ri), fill=0)
    rd = 0.035 * s
    draw.ellipse((cx - rd, cy - rd, cx + rd, cy + rd), fill=255)
    for row, length in enumerate((0.34, 0.26, 0.30)):
        y = (0.23 + 0.085 * row) * s
        draw.rectangle((0.52 * s, y, (0.52 + length) * s, y + 0.04 * s), fill=255)
    alpha = np.asarray(canvas.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0
    alpha[alpha < 0.03] = 0.0
    return alpha * 0.95


def _surface(rng: np.random.Generator, size: int) -> np.ndarray:
    """A good part without the print, float32 (S, S, 3) in grey levels."""
    tex = _texture()
    crop = 300
    oy, ox = (int(v) for v in rng.integers(0, tex.shape[0] - crop + 1, 2))
    patch = tex[oy : oy + crop, ox : ox + crop]
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    grey = np.asarray(Image.fromarray(np.ascontiguousarray(patch), mode="F").resize((size, size)))
    z = (grey - grey.mean()) / (grey.std() + 1e-6)
    level = 150.0 * rng.uniform(0.95, 1.05)
    contrast = 24.0 * rng.uniform(0.92, 1.08)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    ang = rng.uniform(0, 2 * math.pi)
    light = 1.0 + rng.uniform(0.0, 0.08) * (yy * math.sin(ang) + xx * math.cos(ang))
    return ((level + contrast * z) * light)[..., None] * _TINT


def _blob(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth random blob filling about half of an (h, w) box, bool."""
    coarse = rng.standard_normal((5, 5)).astype(np.float32)
    noise = np.asarray(Image.fromarray(coarse, mode="F").resize((w, h), Image.Resampling.BICUBIC))
    yy = np.linspace(-1, 1, h, dtype=np.float32)[:, None]
    xx = np.linspace(-1, 1, w, dtype=np.float32)[None, :]
    field = 0.6 * noise - 3.0 * (yy**2 + xx**2)
    return field >= np.quantile(field, 0.5)


def _scratch(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    p0 = rng.uniform(0.15, 0.85, 2) * size
    ang = rng.uniform(0, 2 * math.pi)
    length = rng.uniform(0.3, 0.55) * size
    d = np.array([math.cos(ang), math.sin(ang)])
    p2 = p0 + length * d
    p1 = (p0 + p2) / 2 + rng.uniform(-0.3, 0.3) * length * np.array([-d[1], d[0]])
    t = np.linspace(0, 1, 48)[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
    width = max(2, round(rng.uniform(3.0, 5.0) * size / 256))
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).line([tuple(p) for p in pts.tolist()], fill=255, width=width, joint="curve")
    mask = np.asarray(canvas) > 0
    bright = img[mask].mean() < 150 if mask.any() else True
    colour = np.array([238.0, 236.0, 228.0] if bright else [30.0, 27.0, 25.0], dtype=np.float32)
    out = img.copy()
    out[mask] = 0.12 * out[mask] + 0.88 * colour
    return out, mask


def _stain(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    r = rng.uniform(0.06, 0.1) * size
    cy, cx = rng.uniform(0.2, 0.8, 2) * size
    box = int(2 * r)
    shape = np.zeros((size, size), dtype=np.float32)
    t, left = int(cy - r), int(cx - r)
    blob = _blob(rng, box, box).astype(np.float32)
    t0, l0 = max(0, t), max(0, left)
    shape[t0 : t + box, l0 : left + box] = blob[t0 - t : size - t, l0 - left : size - left]
    soft = ndimage.gaussian_filter(shape, 0.12 * r)
    mask = soft > 0.15
    opacity = rng.uniform(0.6, 0.8)
    alpha = np.where(mask, opacity * np.clip(0.35 + (soft - 0.15) / 0.6, 0, 1), 0.0)[..., None]
    colours = ([70.0, 45.0, 22.0], [150.0, 72.0, 30.0], [40.0, 52.0, 60.0])
    colour = np.array(colours[int(rng.integers(len(colours)))], dtype=np.float32)
    return (img * (1 - alpha) + colour * alpha).astype(np.float32), mask


def _hole(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    r = max(3.0, rng.uniform(0.025, 0.045) * size)
    cy, cx = rng.uniform(0.15, 0.85, 2) * size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dist = np.hypot(yy - cy, xx - cx)
    phi = np.arctan2(yy - cy, xx - cx)
    light = rng.uniform(0, 2 * math.pi)
    mask = dist <= 1.35 * r
    inner = dist <= r
    factor = np.where(inner, 0.0, 0.35 + 0.15 * (1 + np.cos(phi - light)))
    depth = np.clip(dist / r, 0, 1)[..., None]
    core = np.array([14.0, 13.0, 12.0], dtype=np.float32) + 22.0 * depth
    out = img.copy()
    out[mask] = np.where(inner[mask][:, None], core[mask], img[mask] * factor[mask][:, None])
    return out, mask


def _render(rng: np.random.Generator, size: int, ink: np.ndarray, defect: str | None):
    """One image (uint8 (S, S, 3)) and, for a defect, its mask (bool (S, S))."""
    surface = _surface(rng, size)
    noise = rng.normal(0.0, 2.5, surface.shape).astype(np.float32)
    for _ in range(50):
        mask = None
        alpha = ink
        if defect == "missing_print":
            ys, xs = np.nonzero(ink > 0.5)
            i = int(rng.integers(len(ys)))
            rad = rng.uniform(0.06, 0.1) * size
            yy, xx = np.mgrid[0:size, 0:size]
            region = np.hypot(yy - ys[i], xx - xs[i]) <= rad
            mask = region & (ink > 0)
            alpha = np.where(region, 0.0, ink)
        img = surface * (1 - alpha[..., None]) + _INK * alpha[..., None]
        if defect in ("scratch", "stain", "hole"):
            img, mask = {"scratch": _scratch, "stain": _stain, "hole": _hole}[defect](img, rng)
        if mask is None or _AREA[0] <= mask.mean() <= _AREA[1]:
            break
    out = np.clip(np.rint(img + noise), 0, 255).astype(np.uint8)
    return out, mask


def _params(seed: int, size: int, n_train: int, n_test_good: int, n_per_defect: int) -> dict:
    return {
        "version": _VERSION,
        "seed": seed,
        "size": size,
        "n_train": n_train,
        "n_test_good": n_test_good,
        "n_per_defect": n_per_defect,
        "defects": list(DEFECT_TYPES),
    }


def _save(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="PNG", compress_level=1)


def build_demo(
    root: Path,
    seed: int = 0,
    size: int = 256,
    n_train: int = 80,
    n_test_good: int = 20,
    n_per_defect: int = 8,
) -> Path:
    """Write the demo category in MVTec layout to ``root`` (a no-op if it is already there).

    Layout: ``train/good/000.png``, ``test/good``, ``test/<defect>``, and
    ``ground_truth/<defect>/<stem>_mask.png`` (8-bit, 0/255), all RGB 8-bit PNGs of ``size`` px.
    The same arguments always give the same bytes. The folder is built next to ``root`` and moved
    into place, so an interrupted build leaves nothing half-written.

    Args:
        root: target folder; must be new, empty, or an earlier demo build (which is replaced).
        seed: seed of every random choice.
        size: image side, px (at least 64).
        n_train: good training images.
        n_test_good: good test images.
        n_per_defect: test images per defect type.

    Returns:
        ``root``.

    Raises:
        DataError: ``root`` holds something that is not a demo build, or a bad argument.
    """
    root = Path(root)
    if size < 64 or min(n_train, n_test_good, n_per_defect) < 0:
        raise DataError(f"build_demo(size={size}, ...) cannot work.", fix="use size >= 64 and counts >= 0")
    params = _params(seed, size, n_train, n_test_good, n_per_defect)
    marker = root / MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == params:
                return root
        except (OSError, ValueError):
            pass
    elif root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(
            "exists and is not a demo build; refusing to overwrite it.",
            path=root,
            fix="pass a new or empty folder",
        )
    tmp = root.parent / f".{root.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    ink = _ink_alpha(size)
    jobs: list[tuple[str, str | None, int]] = [("train/good", None, i) for i in range(n_train)]
    jobs += [("test/good", None, i) for i in range(n_test_good)]
    jobs += [(f"test/{d}", d, i) for d in DEFECT_TYPES for i in range(n_per_defect)]
    codes: dict[str | None, int] = {None: 0, **{d: k + 1 for k, d in enumerate(DEFECT_TYPES)}}
    try:
        for folder, defect, i in jobs:
            split = 0 if folder == "train/good" else 1
            rng = np.random.default_rng([seed, split, codes[defect], i])
            img, mask = _render(rng, size, ink, defect)
            _save(img, tmp / folder / f"{i:03d}.png")
            if mask is not None:
                _save(mask.astype(np.uint8) * 255, tmp / "ground_truth" / str(defect) / f"{i:03d}_mask.png")
        (tmp / MARKER).write_text(json.dumps(params, indent=1))
        root.parent.mkdir(parents=True, exist_ok=True)
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
