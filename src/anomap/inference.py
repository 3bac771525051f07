"""The one prepare-and-score path: every front door scores images through :func:`score_images`.

The Python API (``Detector.predict``), ``anomap predict`` (:func:`anomap.runtime.batch.predict_stream`),
the backends (:class:`anomap.runtime.backend.TorchBackend` and ``OnnxBackend``) and the service
(``anomap serve``) all go the same way:

1. decode: :func:`anomap.data.images.load_image` with the model's channel count (1 grey, 3 colour);
2. resize to the working shape (h, w) (:func:`anomap.data.transforms.resize_u8`): image_size square, or
   the fit images' aspect ratio (``aspect=fit``, ``MethodConfig.work_hw``);
3. score batches of prepared images with a :data:`Scorer`;
4. resize each raw map back to its image's own (H, W) (:func:`anomap.data.transforms.resize_maps`);
5. verdict: ``score > threshold``.

Only the scorer differs between runtimes. It takes the prepared uint8 batch (B, h, w, C), which is also
the input of an exported ONNX graph, so that PyTorch (``Detector.predict_raw``: to float (B, C, h, w) in
[0, 1], then ``Method.predict``, eager or compiled) and onnxruntime are fed the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor

from anomap.data.images import load_image
from anomap.data.transforms import resize_maps, resize_u8
from anomap.errors import ImageError

ImageInput = str | Path | Image.Image | np.ndarray
"""One image as callers have it: a file path, a Pillow image or an (H, W[, C]) array (see ``load_image``)."""

Scorer = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
"""uint8 (B, h, w, C) prepared images -> raw scores float32 (B,) and raw maps float32 (B, h, w)."""


@dataclass(frozen=True)
class Scored:
    """Raw scores, maps and verdicts of a sequence of images, in input order.

    Attributes:
        scores: float32 (N,) raw image scores (higher = more anomalous).
        maps: one float32 (H, W) raw map per image, at that image's own size; empty when maps were
            not asked for.
        is_anomalous: ``score > threshold`` per image (compared as Python floats); all None without a
            threshold.
        threshold: the threshold the verdicts used.
    """

    scores: np.ndarray
    maps: list[np.ndarray]
    is_anomalous: list[bool | None]
    threshold: float | None


def prepare_image(image: ImageInput, channels: int, size: int | tuple[int, int]
                  ) -> tuple[np.ndarray, tuple[int, int]]:
    """One image -> uint8 (h, w, C) at the working shape ``size`` ((h, w), or an int for a square), and its
    original (H, W).

    Raises:
        ImageError: the image cannot be decoded (the message names the file).
    """
    img = load_image(image, channels=channels)
    return resize_u8(img, size), (int(img.shape[0]), int(img.shape[1]))


def score_images(images: Sequence[ImageInput], scorer: Scorer, *, channels: int, size: int | tuple[int, int],
                 threshold: float | None = None, batch_size: int = 16, maps: bool = True) -> Scored:
    """Prepare, score and map back ``images``, ``batch_size`` images per scorer call.

    Args:
        images: the images (anything :func:`prepare_image` takes), of any sizes.
        scorer: the model (see :data:`Scorer`).
        channels: what the model reads, 1 or 3.
        size: the model's working shape (h, w) (an int: a square).
        threshold: gives the verdicts (None: no verdicts).
        batch_size: images per scorer call (at least 1).
        maps: False skips resizing the maps (``Scored.maps`` is then empty).

    Raises:
        ImageError: an image cannot be decoded; nothing is returned for the others.
    """
    step = max(1, int(batch_size))
    score_parts: list[np.ndarray] = []
    out_maps: list[np.ndarray] = []
    for i in range(0, len(images), step):
        prepared = [prepare_image(im, channels, size) for im in images[i:i + step]]
        scores, raw_maps = scorer(np.stack([img for img, _ in prepared]))
        score_parts.append(np.asarray(scores, dtype=np.float32))
        if maps:
            out_maps.extend(resize_maps(m, hw) for m, (_, hw) in zip(raw_maps, prepared, strict=True))
    all_scores = np.concatenate(score_parts) if score_parts else np.zeros(0, np.float32)
    flags: list[bool | None] = [None if threshold is None else bool(float(s) > threshold) for s in all_scores]
    return Scored(all_scores, out_maps, flags, threshold)


def u8_batch(images: np.ndarray | Tensor) -> np.ndarray:
    """A float tensor (B, C, H, W) in [0, 1] or a uint8 array (B, H, W, C) -> uint8 array (B, H, W, C).

    Tensor values are clamped to [0, 1] and rounded to the nearest of 0..255.

    Raises:
        ImageError: a tensor that is not 4-D, or an array that is not uint8.
    """
    if isinstance(images, Tensor):
        if images.ndim != 4:
            raise ImageError(f"a tensor batch must be (B, C, H, W); got shape {tuple(images.shape)}.")
        return (images.detach().float().clamp(0, 1) * 255 + 0.5).byte().permute(0, 2, 3, 1).cpu().numpy()
    if images.dtype != np.uint8:
        raise ImageError(f"an array batch must be uint8 (B, H, W, C); got {images.dtype}.",
                         fix="convert with (x * 255).astype(np.uint8) or pass a float tensor")
    return images
