"""The one synthetic-anomaly generator shared by all methods (numpy, scipy.ndimage and Pillow only).

``corrupt`` pastes 1..n random shapes (rectangle, rotated ellipse, star-shaped polygon, noise blob) into
an image, each filled with material from another image, a moved copy of the same image, noise, a
constant colour, a blur, a colour jitter or a procedural texture, blended with a random opacity and a
feathered edge. It returns the corrupted image and a mask of the pixels that were changed.

Mask convention: a pixel is in the mask when it belongs to the hard shape or the feathered shape covers
it at least half (feathered shape >= 0.5, before the opacity is applied). Pixels just outside the mask may change a
little (within ``ceil(3 * soft_edge)`` px of it); pixels further away never change. Inside the mask a
fill always differs from the original (opacity x mean absolute difference of at least ``MIN_FILL_DIFF``
grey levels), but individual pixels may happen to keep their value. With ``ensure_visible`` a fill whose
mean colour and contrast match the original (e.g. texture pasted on the same texture) also gets a
brightness/contrast change, so that every shape is visible.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageFilter
from scipy import ndimage

from anomap.data.shapes import Box, foreground_box, random_shape
from anomap.errors import ConfigError, ImageError

SHAPE_KINDS = ("rectangle", "ellipse", "polygon", "blob")
FILL_KINDS = ("other", "self", "noise", "const", "blur", "color", "texture")
MIN_FILL_DIFF = 10.0  # minimal opacity * mean |fill - original| (grey levels) over a shape; else redrawn

@dataclass
class CorruptionConfig:
    """How synthetic anomalies are drawn.

    Attributes:
        n_shapes: inclusive range of the number of shapes per image.
        shape_area: range of the area of one shape as a fraction of the image area.
        shapes: relative probabilities of "rectangle", "ellipse", "polygon", "blob".
        fills: relative probabilities of the fill kinds in ``FILL_KINDS``.
        alpha: range of the opacity of a fill.
        soft_edge: Gaussian feather sigma (px) of the blending alpha; 0 gives hard edges.
        min_size_px: minimum extent (height and width) of a shape.
        area_limitation: centre shapes inside the foreground box (ISSTAD), see ``foreground_box``.
        remove_dark: before an image-derived fill, replace pixels darker than the mean grey level by the
            mean colour of the brighter ones (ISSTAD).
        self_mode: "any" (a shifted, rotated or flipped patch of the image) or "flip" (the flipped
            image at the same place, ISSTAD).
        noise_mix: range of the share of uniform noise in a "noise" fill (1 = pure noise, ISSTAD 0.5).
        ensure_visible: give a fill whose mean colour and contrast are too close to the original's a
            random brightness/contrast change (see the module docstring).
    """

    n_shapes: tuple[int, int] = (1, 4)
    shape_area: tuple[float, float] = (0.01, 0.15)
    shapes: dict[str, float] = field(
        default_factory=lambda: {"ellipse": 1.0, "polygon": 1.0, "blob": 1.0, "rectangle": 0.0}
    )
    fills: dict[str, float] = field(
        default_factory=lambda: {"other": 0.4, "self": 0.2, "noise": 0.2, "const": 0.2}
    )
    alpha: tuple[float, float] = (0.5, 1.0)
    soft_edge: float = 1.0
    min_size_px: int = 3
    area_limitation: bool = False
    remove_dark: bool = False
    self_mode: str = "any"
    noise_mix: tuple[float, float] = (1.0, 1.0)
    ensure_visible: bool = True

    def __post_init__(self) -> None:  # lists (from YAML) become tuples, weights floats
        self.n_shapes = (int(self.n_shapes[0]), int(self.n_shapes[1]))
        self.shape_area, self.alpha, self.noise_mix = (
            (float(v[0]), float(v[1])) for v in (self.shape_area, self.alpha, self.noise_mix)
        )
        self.shapes, self.fills = (
            {str(k): float(v) for k, v in d.items()} for d in (self.shapes, self.fills)
        )
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError for values that cannot work."""
        if not 0 <= self.n_shapes[0] <= self.n_shapes[1]:
            raise ConfigError(f"n_shapes={self.n_shapes} is not a range.", fix="use (lo, hi), 0 <= lo <= hi")
        if not 0.0 < self.shape_area[0] <= self.shape_area[1] <= 1.0:
            raise ConfigError(f"shape_area={self.shape_area} is not a range in (0, 1].")
        for name, weights, known in (("shapes", self.shapes, SHAPE_KINDS), ("fills", self.fills, FILL_KINDS)):
            unknown = sorted(set(weights) - set(known))
            if unknown:
                raise ConfigError(f"{name} has unknown kinds {unknown}.", fix=f"use kinds from {list(known)}")
            if any(v < 0 for v in weights.values()) or sum(weights.values()) <= 0:
                raise ConfigError(f"{name}={weights} needs non-negative weights with a positive sum.")
        for name, (lo, hi) in (("alpha", self.alpha), ("noise_mix", self.noise_mix)):
            if not 0.0 <= lo <= hi <= 1.0:
                raise ConfigError(f"{name}={(lo, hi)} is not a range in [0, 1].")
        if self.soft_edge < 0 or self.min_size_px < 1:
            raise ConfigError("soft_edge must be >= 0 and min_size_px >= 1.")
        if self.self_mode not in ("any", "flip"):
            raise ConfigError(f"self_mode={self.self_mode!r} is not known.", fix="use any or flip")


PRESETS: dict[str, CorruptionConfig] = {
    "ssl_ae": CorruptionConfig(),
    "isstad": CorruptionConfig(
        n_shapes=(1, 3),
        shape_area=(0.005, 0.2),
        shapes={"rectangle": 1.0, "ellipse": 1.0, "polygon": 1.0, "blob": 0.0},
        fills={"color": 1.0, "self": 1.0, "noise": 1.0},
        alpha=(1.0, 1.0),
        area_limitation=True,
        ensure_visible=False,
        self_mode="flip",
        noise_mix=(0.5, 0.5),
    ),
    "validation": CorruptionConfig(
        n_shapes=(1, 3),
        shape_area=(0.005, 0.15),
        shapes={k: 1.0 for k in SHAPE_KINDS},
        fills={k: 1.0 for k in FILL_KINDS},
        alpha=(0.5, 1.0),
    ),
}


def get_preset(name: str) -> CorruptionConfig:
    """A copy of ``PRESETS[name]`` that may be changed freely."""
    if name not in PRESETS:
        raise ConfigError(f"corruption preset {name!r} is not known.", fix=f"use one of {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def _pick(rng: np.random.Generator, weights: dict[str, float]) -> str:
    keys = [k for k, v in weights.items() if v > 0]
    p = np.array([weights[k] for k in keys], dtype=np.float64)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


class _Ctx:
    """Per-image state shared by the fill functions."""

    h: int  # image height, width, channels
    w: int
    c: int

    def __init__(self, image: np.ndarray, cfg: CorruptionConfig, pool: np.ndarray | None):
        self.u8, self.img, self.cfg, self.pool = image, image.astype(np.float32), cfg, pool
        self.h, self.w, self.c = image.shape
        if cfg.remove_dark:  # mean grey level, mean colour of the pixels at or above it (never empty)
            sub = self.img[::2, ::2]
            grey = sub.mean(axis=2)
            self.level = float(grey.mean())
            self.colour = sub[grey >= self.level].mean(axis=0)

    def src(self, t: int, b: int, left: int, r: int) -> np.ndarray:
        """Region of the image that image-derived fills start from (dark pixels removed when configured)."""
        region = self.img[t:b, left:r]
        if not self.cfg.remove_dark:
            return region
        return np.where(region.mean(axis=2, keepdims=True) < self.level, self.colour, region).astype(
            np.float32
        )


def _fill(kind: str, ctx: _Ctx, box: Box, rng: np.random.Generator) -> np.ndarray:
    """Fill material (h, w, C) float32 for the box ``(t, b, l, r)``."""
    t, b, left, r = box
    h, w, c = b - t, r - left, ctx.c
    if kind == "other":
        pool = ctx.pool
        assert pool is not None
        n = len(pool)
        j = int(rng.integers(n))
        if n > 1 and np.array_equal(pool[j], ctx.u8):
            j = (j + int(rng.integers(1, n))) % n
        oy, ox = int(rng.integers(0, ctx.h - h + 1)), int(rng.integers(0, ctx.w - w + 1))
        patch = pool[j, oy : oy + h, ox : ox + w].astype(np.float32)
        return patch[:, ::-1] if rng.random() < 0.5 else patch
    if kind == "self":
        flips = ((slice(None), slice(None, None, -1)), slice(None, None, -1), (slice(None, None, -1),) * 2)
        op = int(rng.integers(3 if ctx.cfg.self_mode == "flip" or h != w else 4))
        if ctx.cfg.self_mode == "flip":  # the flipped image at the same place
            fy, fx = op > 0, op != 1
            ys = (ctx.h - b, ctx.h - t) if fy else (t, b)
            xs = (ctx.w - r, ctx.w - left) if fx else (left, r)
            return ctx.src(*ys, *xs)[flips[op]]
        oy, ox = int(rng.integers(0, ctx.h - h + 1)), int(rng.integers(0, ctx.w - w + 1))
        patch = ctx.src(oy, oy + h, ox, ox + w)
        return patch[flips[op]] if op < 3 else np.rot90(patch, int(rng.integers(1, 4)))
    if kind == "noise":
        m = rng.uniform(*ctx.cfg.noise_mix)
        noise = rng.uniform(0, 255, (h, w, c)).astype(np.float32)
        return noise if m >= 1.0 else m * noise + (1 - m) * ctx.src(t, b, left, r)
    if kind == "const":
        colour = rng.uniform(0, 255, c).astype(np.float32)
        mean = ctx.img[t:b, left:r].reshape(-1, c).mean(axis=0)
        if np.abs(colour - mean).mean() < 40:
            colour = (colour + 128.0) % 256.0
        return np.broadcast_to(colour, (h, w, c))
    if kind == "blur":
        sigma = max(2.0, 0.02 * min(ctx.h, ctx.w)) * rng.uniform(1.0, 2.0)
        p = math.ceil(3 * sigma)
        t2, b2, l2, r2 = max(0, t - p), min(ctx.h, b + p), max(0, left - p), min(ctx.w, r + p)
        region = np.clip(ctx.src(t2, b2, l2, r2), 0, 255).astype(np.uint8)
        pil = Image.fromarray(region[..., 0] if c == 1 else region).filter(ImageFilter.GaussianBlur(sigma))
        return np.asarray(pil, dtype=np.float32).reshape(region.shape)[t - t2 : b - t2, left - l2 : r - l2]
    if kind == "color":
        patch = ctx.src(t, b, left, r)
        mean = patch.reshape(-1, c).mean(axis=0)
        if c == 3 and rng.random() < 0.25:
            grey = patch.mean(axis=2, keepdims=True)
            out = np.repeat(grey, 3, axis=2) * rng.uniform(0.6, 1.4)
        else:
            con = rng.uniform(1.4, 2.0) if rng.random() < 0.5 else rng.uniform(0.3, 0.7)
            gain = rng.uniform(0.6, 1.4, c) if c == 3 else np.ones(1)
            out = ((patch - mean) * con + mean) * gain.astype(np.float32)
        bright = rng.uniform(25, 70) * (1 if rng.random() < 0.5 else -1)
        if mean.mean() + bright > 245 or mean.mean() + bright < 10:
            bright = -bright
        return np.clip(out + bright, 0, 255)
    # texture: stripes, checker or smoothed noise between two contrasting colours
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    th = rng.uniform(0, math.pi)
    period = rng.uniform(4, 16)
    style = int(rng.integers(3))
    if style == 0:
        v = 0.5 + 0.5 * np.sin(2 * math.pi * (xx * math.cos(th) + yy * math.sin(th)) / period)
    elif style == 1:
        u, q = xx * math.cos(th) + yy * math.sin(th), -xx * math.sin(th) + yy * math.cos(th)
        v = ((np.floor(u / period) + np.floor(q / period)) % 2).astype(np.float32)
    else:
        v = np.zeros((h, w), np.float32)
        for octave, amp in ((4, 1.0), (12, 0.5)):
            g = rng.standard_normal((octave, octave)).astype(np.float32)
            v += amp * np.asarray(Image.fromarray(g, mode="F").resize((w, h), Image.Resampling.BICUBIC))
        v = np.clip(0.5 + 0.35 * v, 0, 1)
    c1 = rng.uniform(0, 255, c).astype(np.float32)
    c2 = np.where(c1 > 127, c1 - rng.uniform(80, 127, c), c1 + rng.uniform(80, 127, c)).astype(np.float32)
    return c1 + (c2 - c1) * np.broadcast_to(v, (h, w))[..., None]


def _distinct(fill: np.ndarray, orig: np.ndarray) -> bool:
    """Whether (n, C) fill pixels differ visibly from the original ones in mean colour or contrast."""
    dm = float(np.abs(fill.mean(axis=0) - orig.mean(axis=0)).mean())
    ds = abs(float(fill.mean(axis=1).std()) - float(orig.mean(axis=1).std()))
    return dm >= 12.0 or ds >= 0.35 * float(orig.mean(axis=1).std()) + 4.0


def _jitter(fill: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random brightness shift (away from clipping) and contrast change of a fill."""
    mean = fill.reshape(-1, fill.shape[-1]).mean(axis=0)
    shift = rng.uniform(25, 60) * (1 if mean.mean() < 128 else -1)
    con = rng.uniform(0.5, 1.5)
    return np.clip((fill - mean) * con + mean + shift, 0, 255)


def corrupt(
    image: np.ndarray, rng: np.random.Generator, cfg: CorruptionConfig, pool: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Paste random shapes of synthetic anomaly into an image.

    Args:
        image: uint8 (H, W, C), C in {1, 3}.
        rng: source of randomness; the result is a function of its state.
        cfg: what to draw.
        pool: uint8 (N, H, W, C) material for "other" fills (the image itself may be in it: it is never
            picked when another one exists). None, or only the image itself: "other" acts as "self".

    Returns:
        (corrupted uint8 (H, W, C), mask float32 (H, W) in {0, 1}); see the module docstring.
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ImageError(f"image must be uint8 (H, W, C), C in {{1, 3}}, got {image.dtype} {image.shape}.")
    if pool is not None:
        if pool.ndim != 4 or pool.shape[1:] != image.shape or pool.dtype != np.uint8 or len(pool) == 0:
            raise ImageError(f"pool must be uint8 (N, {', '.join(map(str, image.shape))}), got {pool.shape}.")
        if len(pool) == 1 and np.array_equal(pool[0], image):
            pool = None
    ctx = _Ctx(image, cfg, pool)
    h, w = image.shape[:2]
    out = ctx.img.copy()
    mask = np.zeros((h, w), dtype=bool)
    rt, rb, rl, rr = foreground_box(image) if cfg.area_limitation else (0, h, 0, w)
    sigma = cfg.soft_edge
    pad = math.ceil(3 * sigma) if sigma > 0 else 0
    for _ in range(int(rng.integers(cfg.n_shapes[0], cfg.n_shapes[1] + 1))):
        area = rng.uniform(*cfg.shape_area) * h * w
        local = random_shape(_pick(rng, cfg.shapes), area, rng, cfg.min_size_px, h, w)
        cy, cx = int(rng.integers(rt, rb)), int(rng.integers(rl, rr))
        soft = local.astype(np.float32)
        if pad:
            soft = ndimage.gaussian_filter(np.pad(soft, pad), sigma, truncate=3.0)
        sh, sw = soft.shape
        t0, l0 = cy - sh // 2, cx - sw // 2
        t, b, left, r = max(0, t0), min(h, t0 + sh), max(0, l0), min(w, l0 + sw)
        if b <= t or r <= left:
            continue
        soft = soft[t - t0 : b - t0, left - l0 : r - l0]
        inside = (soft >= 0.5) | np.pad(local, pad)[t - t0 : b - t0, left - l0 : r - l0]
        if not inside.any():
            continue
        box = (t, b, left, r)
        kind = _pick(rng, cfg.fills)
        if kind == "other" and pool is None:
            kind = "self"
        orig = ctx.img[t:b, left:r]
        opacity = rng.uniform(*cfg.alpha)
        for attempt in range(4):
            fill = _fill(kind if attempt < 3 else "const", ctx, box, rng)
            if cfg.ensure_visible and not _distinct(fill[inside], orig[inside]):
                fill = _jitter(fill, rng)
            if opacity * np.abs(fill - orig)[inside].mean() >= MIN_FILL_DIFF:
                break
        a = (soft * opacity)[..., None]
        out[t:b, left:r] += a * (fill - out[t:b, left:r])
        mask[t:b, left:r] |= inside
    result = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return result, mask.astype(np.float32)


def corrupt_batch(
    images: np.ndarray, rng: np.random.Generator, cfg: CorruptionConfig, pool: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``corrupt`` for every image of a uint8 (B, H, W, C) batch.

    When ``pool`` is None and the batch has more than one image, the batch itself is the pool.

    Returns:
        (corrupted uint8 (B, H, W, C), masks float32 (B, H, W)).
    """
    if images.ndim != 4:
        raise ImageError(f"images must be uint8 (B, H, W, C), got shape {images.shape}.")
    if pool is None and len(images) > 1:
        pool = images
    out = np.empty_like(images)
    masks = np.empty(images.shape[:3], dtype=np.float32)
    for i in range(len(images)):
        out[i], masks[i] = corrupt(images[i], rng, cfg, pool)
    return out, masks


def make_grid(images: list[np.ndarray], ncol: int, pad: int = 2) -> np.ndarray:
    """Tile images row by row (``ncol`` per row, ``pad`` px white gaps) into one RGB uint8 image.

    Images may be (H, W), (H, W, 1) or (H, W, 3), uint8 or float in [0, 1] (masks), of differing sizes.
    """
    if not images or ncol < 1:
        raise ValueError("make_grid needs at least one image and ncol >= 1")
    tiles = []
    for im in images:
        a = np.asarray(im)
        if a.dtype != np.uint8:
            a = np.clip(np.rint(a.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
        if a.ndim == 2:
            a = a[..., None]
        tiles.append(np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a[..., :3])
    th, tw = max(t.shape[0] for t in tiles), max(t.shape[1] for t in tiles)
    nrow = (len(tiles) + ncol - 1) // ncol
    grid = np.full((nrow * (th + pad) + pad, ncol * (tw + pad) + pad, 3), 255, dtype=np.uint8)
    for i, t in enumerate(tiles):
        y, x = pad + (i // ncol) * (th + pad), pad + (i % ncol) * (tw + pad)
        grid[y : y + t.shape[0], x : x + t.shape[1]] = t
    return grid
