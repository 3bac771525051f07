"""Small image filters in torch (device-agnostic, batched)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def gaussian_kernel1d(sigma: float, truncate: float = 4.0, device=None, dtype=torch.float32) -> Tensor:
    """Normalised 1-D Gaussian with radius ``int(truncate*sigma + 0.5)`` (as scipy.ndimage)."""
    radius = max(1, int(truncate * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(maps: Tensor, sigma: float, truncate: float = 4.0) -> Tensor:
    """Separable Gaussian blur of (B, H, W) maps with edge-replicating padding; sigma <= 0 = identity."""
    if sigma <= 0:
        return maps
    k = gaussian_kernel1d(sigma, truncate, device=maps.device, dtype=maps.dtype)
    r = (k.numel() - 1) // 2
    x = maps.unsqueeze(1)
    h, w = x.shape[-2:]
    # replicate padding cannot exceed the size on tiny maps; clamp the radius there
    if r >= min(h, w):
        r = min(h, w) - 1
        k = gaussian_kernel1d(max(r / truncate, 1e-3), truncate, device=maps.device, dtype=maps.dtype)[:2 * r + 1]
        k = k / k.sum()
    x = F.pad(x, (r, r, 0, 0), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, r, r), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, -1, 1))
    return x.squeeze(1)


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
