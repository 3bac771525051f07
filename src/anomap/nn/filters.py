"""Small image filters in torch (device-agnostic, batched)."""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def gaussian_kernel1d(sigma: float, truncate: float = 4.0, device=None, dtype=torch.float32) -> Tensor:
    """Normalised 1-D Gaussian with radius ``int(truncate*sigma + 0.5)`` (as scipy.ndimage)."""
    radius = max(1, int(truncate * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _blur_kernel(sigma: float, truncate: float, min_side: int, device=None, dtype=torch.float32) -> Tensor:
    """:func:`gaussian_kernel1d`, its radius clamped below ``min_side`` (replicate padding cannot exceed a
    tiny map's size)."""
    k = gaussian_kernel1d(sigma, truncate, device=device, dtype=dtype)
    r = (k.numel() - 1) // 2
    if r >= min_side:
        r = min_side - 1
        k = gaussian_kernel1d(max(r / truncate, 1e-3), truncate, device=device, dtype=dtype)[:2 * r + 1]
        k = k / k.sum()
    return k


def gaussian_blur(maps: Tensor, sigma: float, truncate: float = 4.0) -> Tensor:
    """Separable Gaussian blur of (B, H, W) maps with edge-replicating padding; sigma <= 0 = identity."""
    if sigma <= 0:
        return maps
    x = maps.unsqueeze(1)
    k = _blur_kernel(sigma, truncate, min(x.shape[-2:]), device=maps.device, dtype=maps.dtype)
    r = (k.numel() - 1) // 2
    x = F.pad(x, (r, r, 0, 0), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, r, r), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, -1, 1))
    return x.squeeze(1)


@functools.lru_cache(maxsize=32)
def _axis_matrix(n_in: int, n_out: int, sigma: float, truncate: float, min_side: int) -> Tensor:
    """(n_out, n_in) float32: linear upsampling (``align_corners=False``, torch's source indices) from ``n_in``
    to ``n_out`` samples, then :func:`gaussian_blur`'s 1-D pass along that axis (``min_side``: the blurred
    map's smaller side). Built in NumPy, float64: a traced or exported graph sees a constant."""
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    lo = src.astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    up = np.zeros((n_out, n_in))
    np.add.at(up, (np.arange(n_out), lo), 1.0 - (src - lo))
    np.add.at(up, (np.arange(n_out), hi), src - lo)
    if sigma <= 0:
        return torch.from_numpy(up).float()
    k = _blur_kernel(sigma, truncate, min_side, dtype=torch.float64).numpy()
    r = (len(k) - 1) // 2
    blur = np.zeros((n_out, n_out))
    for t, weight in enumerate(k):  # out[j] = sum_t k[t] x[clamp(j + t - r)]: replicate padding
        np.add.at(blur, (np.arange(n_out), np.clip(np.arange(n_out) + t - r, 0, n_out - 1)), weight)
    return torch.from_numpy(blur @ up).float()


def upsample_blur(maps: Tensor, size: tuple[int, int], sigma: float, truncate: float = 4.0) -> Tensor:
    """``gaussian_blur(bilinear upsampling of (B, h, w) maps to size, sigma)`` as two small matmuls.

    Both steps are linear and act on each axis alone, so together they are one (out, in) matrix per axis:
    ``M_y @ maps @ M_x.T``. The same maps up to float rounding, at a fraction of the cost (a 40 x 40 grid
    to 320 x 320 at sigma 4: two matmuls instead of a resize and two 33-tap convolutions of the large map).
    """
    h, w, out_h, out_w = int(maps.shape[-2]), int(maps.shape[-1]), int(size[0]), int(size[1])  # fixed when traced
    side = min(out_h, out_w)
    my = _axis_matrix(h, out_h, float(sigma), truncate, side).to(maps)
    mx = _axis_matrix(w, out_w, float(sigma), truncate, side).to(maps)
    return my @ maps @ mx.T


def topk_mean(maps: Tensor, fraction: float) -> Tensor:
    """Mean of the top ``fraction`` of pixels of each (B, H, W) map."""
    flat = maps.flatten(1)
    k = max(1, math.ceil(fraction * flat.shape[1]))
    return flat.topk(k, dim=1).values.mean(dim=1)


def reduce_map(maps: Tensor, kind: str, fraction: float = 0.01) -> Tensor:
    """Image scores (B,) from (B, H, W) maps: their ``max``, ``mean``, or ``topk_mean`` (top ``fraction``)."""
    if kind == "max":
        return maps.flatten(1).max(dim=1).values
    if kind == "mean":
        return maps.flatten(1).mean(dim=1)
    if kind == "topk_mean":
        return topk_mean(maps, fraction)
    raise ValueError(f"unknown image score {kind!r}")


def location_ratio(maps: Tensor, mean: Tensor, prior: float) -> Tensor:
    """Each location's mean over ``maps`` (B, h, w) relative to ``mean``, shrunk toward 1 as if ``prior`` more
    maps had given exactly ``mean`` there; (h, w), at least 1e-3 (the per-location normalisation of held-out maps)."""
    at = (maps.sum(dim=0) + prior * mean) / (len(maps) + prior)
    return (at / mean).clamp_min(1e-3)
