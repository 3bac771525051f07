"""Resizing and channel conversion for uint8 images, bool masks and float anomaly maps.

Only numpy, Pillow and torch are used (no torchvision). Sizes given as a tuple are (height, width),
matching numpy array shapes; an int means a square.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from anomap.data.images import load_image
from anomap.errors import ImageError

if TYPE_CHECKING:
    import torch


def _hw(size: int | tuple[int, int] | Sequence[int]) -> tuple[int, int]:
    """Normalise a size argument to (height, width) and validate it."""
    if isinstance(size, (int, np.integer)):
        h = w = int(size)
    else:
        if len(size) != 2:
            raise ValueError(f"size must be an int or (height, width), not {size!r}")
        h, w = int(size[0]), int(size[1])
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive, not {size!r}")
    return h, w


def resize_u8(img: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize a uint8 image with Pillow bilinear filtering (antialiased when downscaling).

    Args:
        img: uint8 array (H, W) or (H, W, C) with C in 1 or 3.
        size: int for a square, or (height, width).

    Returns:
        uint8 array (size_h, size_w, C); a 2-D input gives a 2-D output.
    """
    h, w = _hw(size)
    arr = np.asarray(img)
    if arr.dtype != np.uint8:
        raise ValueError(f"resize_u8 needs a uint8 image, got {arr.dtype}")
    if arr.ndim == 2:
        squeeze = True
        arr = arr[:, :, None]
    elif arr.ndim == 3 and arr.shape[2] in (1, 3):
        squeeze = False
    else:
        raise ValueError(f"resize_u8 needs an (H, W), (H, W, 1) or (H, W, 3) image, got {arr.shape}")
    if arr.shape[:2] == (h, w):
        out = np.ascontiguousarray(arr)
    else:
        pil = Image.fromarray(np.ascontiguousarray(arr[:, :, 0] if arr.shape[2] == 1 else arr))
        out = np.asarray(pil.resize((w, h), Image.Resampling.BILINEAR))
        if out.ndim == 2:
            out = out[:, :, None]
    return out[:, :, 0] if squeeze else out


def to_channels(img: np.ndarray, channels: int) -> np.ndarray:
    """Convert a uint8 (H, W, C) image to 1 (ITU-R 601 luma) or 3 (repeated grey) channels.

    A 2-D input is treated as one channel. The output is always (H, W, channels).
    """
    arr = np.asarray(img)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3):
        raise ValueError(f"to_channels needs an (H, W), (H, W, 1) or (H, W, 3) image, got {arr.shape}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, not {channels!r}")
    if arr.shape[2] == channels:
        return arr
    if channels == 3:
        return np.repeat(arr, 3, axis=2)
    if arr.dtype != np.uint8:
        raise ValueError(f"to_channels needs a uint8 image for colour to grey, got {arr.dtype}")
    return np.asarray(Image.fromarray(np.ascontiguousarray(arr)).convert("L"))[:, :, None]


def resize_mask(mask: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize a (H, W) mask with nearest-neighbour sampling; returns bool (size_h, size_w)."""
    h, w = _hw(size)
    arr = np.asarray(mask)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim != 2:
        raise ValueError(f"resize_mask needs an (H, W) mask, got {arr.shape}")
    binary = (arr > 0).astype(np.uint8) * 255
    if binary.shape == (h, w):
        return binary > 0
    out = Image.fromarray(binary).resize((w, h), Image.Resampling.NEAREST)
    return np.asarray(out) > 127


def resize_maps(maps: np.ndarray | torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Bilinearly resize anomaly maps (align_corners=False) with torch.

    Args:
        maps: (H, W) or (B, H, W) numpy array or tensor (any device, any float dtype).
        size: (height, width) of the output.

    Returns:
        float32 numpy array (size_h, size_w) or (B, size_h, size_w), on the CPU.
    """
    import torch
    import torch.nn.functional as F

    h, w = _hw(size)
    t = (
        maps.detach()
        if isinstance(maps, torch.Tensor)
        else torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))
    )
    if t.ndim not in (2, 3):
        raise ValueError(f"resize_maps needs (H, W) or (B, H, W) maps, got {tuple(t.shape)}")
    single = t.ndim == 2
    t = t.to(torch.float32)
    if single:
        t = t[None]
    if tuple(t.shape[-2:]) != (h, w):
        if t.shape[0] == 0:
            t = t.new_zeros((0, h, w))
        else:
            t = F.interpolate(t[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    out = t.cpu().numpy().astype(np.float32, copy=True)
    return out[0] if single else out


def load_stack(
    paths: Sequence[str | Path],
    size: int | tuple[int, int],
    channels: int,
    progress: bool = False,
    desc: str = "loading",
) -> np.ndarray:
    """Load, convert and resize images into one uint8 array (N, size_h, size_w, channels).

    Args:
        paths: image files.
        size: int for a square, or (height, width).
        channels: 1 or 3.
        progress: show a tqdm progress bar.
        desc: label of the progress bar.

    Raises:
        ImageError: an image cannot be decoded (the message names the file).
    """
    if channels not in (1, 3):
        raise ImageError(f"channels must be 1 or 3, not {channels!r}.", fix="use channels=1 or channels=3")
    h, w = _hw(size)
    paths = list(paths)
    out = np.empty((len(paths), h, w, channels), dtype=np.uint8)
    iterator = paths
    if progress:
        from tqdm import tqdm

        iterator = tqdm(paths, desc=desc, unit="img", leave=False)
    for i, p in enumerate(iterator):
        out[i] = load_resized(p, (h, w), channels)
    return out


def load_resized(path: str | Path, size: int | tuple[int, int], channels: int) -> np.ndarray:
    """One image file -> uint8 (size_h, size_w, channels): what :func:`load_stack` stores per row."""
    return resize_u8(load_image(path, channels=channels), _hw(size))
