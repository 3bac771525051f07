"""Turn uploaded bytes into images, with one clear HTTP error per kind of bad upload.

Bytes are opened from memory (never from a path: an upload's file name is only a label) with Pillow,
restricted to the formats anomap documents; the pixel limit is checked from the header before any pixel
is decoded, and Pillow's own decompression-bomb guard stays on. Decoding itself is
:func:`anomap.data.images.load_image`, the decoder every other input path of anomap uses.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from anomap.data.images import load_image
from anomap.errors import ImageError

ACCEPTED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")
ACCEPTED_TEXT = "PNG, JPEG, BMP or TIFF"
MAX_LABEL = 200


class UploadError(Exception):
    """An upload the service refuses: ``status`` (400, 413, 415) and a one-line ``message``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def clean_label(name: str | None, index: int) -> str:
    """A display label for an upload: its client-side file name without control characters, or
    ``image-N``. Only ever echoed back as text; never used to build a path."""
    text = "".join(ch for ch in (name or "") if ch.isprintable()).strip()
    return text[:MAX_LABEL] or f"image-{index + 1}"


def decode_upload(data: bytes, label: str, max_pixels: int) -> np.ndarray:
    """Decode one uploaded image to uint8 (H, W, C) (C = 1 grey or 3 colour, EXIF rotation applied).

    Args:
        data: the uploaded bytes.
        label: the upload's display label, used in messages only.
        max_pixels: largest accepted width x height.

    Raises:
        UploadError: 400 empty/truncated/corrupt, 413 too many pixels, 415 not a PNG/JPEG/BMP/TIFF image.
    """
    name = repr(label)
    if not data:
        raise UploadError(400, f"{name} is empty (0 bytes); send the image file's contents.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError:
        raise UploadError(413, f"{name} has too many pixels to decode safely (Pillow's decompression-bomb "
                               f"guard); the limit is {max_pixels:,} pixels: downscale it.") from None
    except UnidentifiedImageError:
        raise UploadError(415, f"{name} is not a {ACCEPTED_TEXT} image.") from None
    except Exception as exc:  # noqa: BLE001 - a broken header of a known format: any error is "corrupt"
        raise UploadError(400, f"{name} cannot be read as an image: the file is corrupt ({_short(exc)}).") from None
    with img:
        w, h = img.size
        if w < 1 or h < 1:
            raise UploadError(400, f"{name} has an empty size ({w}x{h}).")
        if w * h > max_pixels:
            raise UploadError(413, f"{name} is {w}x{h} = {w * h:,} pixels, over this server's limit of "
                                   f"{max_pixels:,} pixels; downscale it.")
        try:
            img.load()  # decode the pixels here, so the message can quote the decoder
        except Exception as exc:  # noqa: BLE001 - truncated data raises OSError, others SyntaxError etc.
            raise UploadError(400, f"{name} cannot be decoded: the file is truncated or corrupt "
                                   f"(decoder said: {_short(exc)}).") from None
        try:
            return load_image(img)  # EXIF rotation and mode conversion, as for every image anomap reads
        except ImageError as exc:
            raise UploadError(400, f"{name} cannot be decoded: {_short(exc.problem)}") from None


def _short(exc: object, limit: int = 160) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit - 1] + "…"
