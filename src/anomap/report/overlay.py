"""Heat-map rendering helpers: a turbo-like colormap, overlays with mask contours, PNG data URIs.

Everything here works on plain numpy arrays (uint8 RGB images, float maps) and uses Pillow only for
resizing and PNG encoding, so reports can be produced without any plotting library.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

# Piecewise-linear anchors approximating Google's "turbo" colormap (Mikhail, 2019): dark blue -> blue ->
# cyan -> green -> yellow -> orange -> dark red, at t = 0, 0.1, ..., 1. Expanded once into a 256-entry LUT.
_TURBO_ANCHORS = np.array(
    [
        [48, 18, 59],
        [71, 96, 223],
        [47, 158, 245],
        [39, 216, 194],
        [78, 249, 131],
        [152, 250, 79],
        [223, 220, 50],
        [255, 161, 34],
        [244, 92, 23],
        [183, 31, 8],
        [122, 4, 3],
    ],
    dtype=np.float64,
)


def _build_lut(n: int = 256) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)
    knots = np.linspace(0.0, 1.0, len(_TURBO_ANCHORS))
    rgb = np.stack([np.interp(t, knots, _TURBO_ANCHORS[:, c]) for c in range(3)], axis=1)
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


_LUT = _build_lut()

# Ground-truth mask outline: a white line just inside the mask border with a dark halo just outside, so it
# stays visible over every turbo colour (a green line would vanish over the green middle of the scale).
CONTOUR_RGB = (255, 255, 255)
HALO_RGB = (0, 0, 0)


def colormap(values: np.ndarray) -> np.ndarray:
    """Map normalised values to turbo-like RGB colours.

    Args:
        values: float array of any shape (typically (H, W)) with values in [0, 1]. Values outside are
            clipped; NaNs are treated as 0.

    Returns:
        uint8 array of shape ``values.shape + (3,)``: dark blue at 0, through cyan, green and yellow,
        to dark red at 1.
    """
    v = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0, posinf=1.0, neginf=0.0)
    idx = np.clip(np.round(v * (len(_LUT) - 1)), 0, len(_LUT) - 1).astype(np.intp)
    return _LUT[idx]


def _to_rgb(image: np.ndarray) -> np.ndarray:
    """Return a uint8 (H, W, 3) copy of a (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) image."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        if np.issubdtype(img.dtype, np.floating) and img.size and float(np.nanmax(img)) <= 1.0:
            img = img * 255.0
        img = np.clip(np.nan_to_num(img.astype(np.float64)), 0, 255).round().astype(np.uint8)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an image of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {img.shape}")
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    elif img.shape[2] == 4:
        img = img[:, :, :3]
    return np.ascontiguousarray(img)


def _resize_float(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinearly resize a float (h, w) map to (height, width)."""
    pil = Image.fromarray(np.asarray(arr, dtype=np.float32), mode="F")
    return np.asarray(pil.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float64)


def _resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a boolean (h, w) mask to (height, width)."""
    m = np.asarray(mask).astype(bool)
    if m.ndim == 3:
        m = np.any(m, axis=2)
    if m.shape == (height, width):
        return m
    pil = Image.fromarray(m.astype(np.uint8) * 255)
    return np.asarray(pil.resize((width, height), Image.Resampling.NEAREST)) > 127


def _shift_or(m: np.ndarray) -> np.ndarray:
    """3x3 binary dilation with numpy shifts (no scipy needed)."""
    out = m.copy()
    out[1:, :] |= m[:-1, :]
    out[:-1, :] |= m[1:, :]
    out[:, 1:] |= m[:, :-1]
    out[:, :-1] |= m[:, 1:]
    out[1:, 1:] |= m[:-1, :-1]
    out[:-1, :-1] |= m[1:, 1:]
    out[1:, :-1] |= m[:-1, 1:]
    out[:-1, 1:] |= m[1:, :-1]
    return out


def mask_contour(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split the border of a boolean mask into a 1 px inner line and a 1 px outer line.

    Args:
        mask: boolean (H, W) mask.

    Returns:
        ``(inner, outer)`` boolean (H, W) arrays: mask pixels with a non-mask 8-neighbour, and non-mask
        pixels with a mask 8-neighbour. The image frame does not count as outside the mask.
    """
    m = np.asarray(mask, dtype=bool)
    inner = m & _shift_or(~m)
    outer = _shift_or(m) & ~m
    return inner, outer


def heatmap_overlay(
    image: np.ndarray,
    amap: np.ndarray,
    vmin: float,
    vmax: float,
    alpha: float = 0.5,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Blend a colour-mapped anomaly map over an image, optionally outlining the ground-truth mask.

    Args:
        image: uint8 image (H, W), (H, W, 1) or (H, W, 3).
        amap: float anomaly map (h, w); bilinearly resized to (H, W) when the size differs.
        vmin: map value shown as the lowest colour.
        vmax: map value shown as the highest colour.
        alpha: weight of the heat map in the blend (0 = image only, 1 = heat map only).
        mask: optional boolean defect mask (any size; nearest-resized to (H, W)); its contour is drawn
            on top as a 1 px white line inside the border plus a 1 px dark halo outside it.

    Returns:
        uint8 RGB array of shape (H, W, 3).
    """
    rgb = _to_rgb(image)
    h, w = rgb.shape[:2]
    amap = np.asarray(amap, dtype=np.float64)
    if amap.ndim == 3 and amap.shape[0] == 1:
        amap = amap[0]
    if amap.ndim != 2:
        raise ValueError(f"expected an anomaly map of shape (H, W), got {amap.shape}")
    if amap.shape != (h, w):
        amap = _resize_float(np.nan_to_num(amap), h, w)
    span = float(vmax) - float(vmin)
    if not np.isfinite(span) or span <= 0:
        span = 1e-12
    norm = np.clip((amap - float(vmin)) / span, 0.0, 1.0)
    heat = colormap(norm).astype(np.float64)
    a = float(np.clip(alpha, 0.0, 1.0))
    out = np.round((1.0 - a) * rgb.astype(np.float64) + a * heat).astype(np.uint8)
    if mask is not None:
        inner, outer = mask_contour(_resize_mask(mask, h, w))
        out[outer] = HALO_RGB
        out[inner] = CONTOUR_RGB
    return out


def _resize_rgb(img: np.ndarray, height: int, width: int) -> np.ndarray:
    if img.shape[:2] == (height, width):
        return img
    return np.asarray(Image.fromarray(img).resize((width, height), Image.Resampling.BILINEAR))


def side_by_side(panels: list[np.ndarray], gap: int = 4) -> np.ndarray:
    """Concatenate images horizontally with a white gap, resizing all to the tallest panel's height.

    Args:
        panels: images accepted by ``heatmap_overlay`` (grey or RGB, uint8).
        gap: width in pixels of the white separator between panels.

    Returns:
        uint8 RGB array (H, sum of widths + gaps, 3).
    """
    if not panels:
        raise ValueError("side_by_side needs at least one panel")
    rgbs = [_to_rgb(p) for p in panels]
    height = max(p.shape[0] for p in rgbs)
    resized = []
    for p in rgbs:
        width = max(1, round(p.shape[1] * height / max(p.shape[0], 1)))
        resized.append(_resize_rgb(p, height, width))
    sep = np.full((height, max(int(gap), 0), 3), 255, dtype=np.uint8)
    parts: list[np.ndarray] = []
    for i, p in enumerate(resized):
        if i:
            parts.append(sep)
        parts.append(p)
    return np.concatenate(parts, axis=1)


def downscale(img: np.ndarray, max_side: int) -> np.ndarray:
    """Return ``img`` as uint8 RGB, shrunk (antialiased, aspect kept) so its long side is <= max_side."""
    rgb = _to_rgb(img)
    h, w = rgb.shape[:2]
    if max_side <= 0 or max(h, w) <= max_side:
        return rgb
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.LANCZOS))


def png_data_uri(img: np.ndarray, max_side: int = 256) -> str:
    """Encode an image as a ``data:image/png;base64,...`` URI, downscaled so its long side <= max_side.

    Args:
        img: uint8 image (H, W), (H, W, 1), (H, W, 3) or (H, W, 4).
        max_side: largest allowed width or height in pixels (aspect ratio is kept).

    Returns:
        The data URI string.
    """
    rgb = _to_rgb(img)
    h, w = rgb.shape[:2]
    pil = Image.fromarray(rgb)
    long_side = max(h, w)
    if max_side > 0 and long_side > max_side:
        scale = max_side / long_side
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        pil = pil.resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    pil.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
