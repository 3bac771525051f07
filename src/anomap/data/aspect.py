"""The working shape of ``aspect=fit``: the fit images' own aspect ratio instead of a square.

Resizing every image to image_size x image_size squeezes a wide or tall image: a 512 x 208 spindle photo
becomes 0.63x as wide and 1.5x as tall, and its texture's scale differs along the two axes. When the fit
images share one aspect ratio, the model can see them at that ratio instead, with about as many pixels
as the square (image_size**2), so its speed is about the same. When their ratios differ (one photo per
part, cropped by hand), no single shape keeps all of them, and the square stays: it squeezes each of
them, but none more than the others. Only the fit images decide (per-category, from normal images).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

ASPECT_TOLERANCE = 1.1  # an image whose aspect ratio is within this factor of the median shares it ...
ASPECT_SHARE = 0.9  # ... and at least this share of the fit images must share it


def shape_label(h: int, w: int) -> str:
    """A working shape as tables show it: "320" for a square, "192x512" (height x width) otherwise."""
    return str(h) if h == w else f"{h}x{w}"


def fit_shape(sizes: Iterable[tuple[int, int]], side: int, multiple: int) -> tuple[tuple[int, int], str]:
    """The working (height, width) for images of (width, height) ``sizes``, and why, in a few words.

    The median aspect ratio r = width / height at about ``side**2`` pixels: height ``side / sqrt(r)`` and
    width ``side * sqrt(r)``, each rounded to a multiple of ``multiple`` (at least ``2 * multiple``); the
    square (side, side) when fewer than ``ASPECT_SHARE`` of the images are within ``ASPECT_TOLERANCE`` of
    that median, or when there are no sizes.
    """
    ratios = np.array([w / h for w, h in sizes], dtype=np.float64)
    if not len(ratios):
        return (side, side), "no images: square"
    median = float(np.median(ratios))
    share = float(np.mean(np.abs(np.log(ratios / median)) <= math.log(ASPECT_TOLERANCE)))
    if share < ASPECT_SHARE:
        return (side, side), (f"aspect ratios vary (only {share:.0%} within {ASPECT_TOLERANCE:g}x of the median "
                              f"{median:.2f}): square")
    root = math.sqrt(median)

    def snap(x: float) -> int:
        return max(2 * multiple, int(round(x / multiple)) * multiple)

    hw = (snap(side / root), snap(side * root))
    return hw, f"aspect ratio {median:.2f} ({share:.0%} of the fit images within {ASPECT_TOLERANCE:g}x)"


def choose_work_shape(cfg: Any, fit_sizes: Iterable[tuple[int, int]]) -> str:
    """With ``cfg.aspect == "fit"``, set ``cfg.work_shape`` (a method config) from the fit images' (width,
    height) ``fit_sizes`` ([] when that is the square), and say why: "HxW: reason". "" for
    ``aspect=square``."""
    if cfg.aspect != "fit":
        return ""
    hw, why = fit_shape(fit_sizes, cfg.image_size, cfg.SIZE_MULTIPLE)
    cfg.work_shape = [] if hw == (cfg.image_size, cfg.image_size) else list(hw)
    return f"{hw[0]}x{hw[1]}: {why}"
