"""Turn uploaded bytes into images, with one clear HTTP error per kind of bad upload.

Bytes are opened from memory (never from a path: an upload's file name is only a label) with Pillow,
restricted to the formats anomap documents; the pixel limit is checked from the header before any pixel
is decoded, and Pillow's own decompression-bomb guard stays on. Decoding itself is
:func:`anomap.data.images.load_image`, the decoder every other input path of anomap uses.
"""

from __future__ import annotations

import io
import json
import urllib.parse
import warnings
from typing import Any

import numpy as np
from fastapi import HTTPException, Request
from PIL import Image, UnidentifiedImageError
from starlette.datastructures import UploadFile

from anomap.data.images import load_image
from anomap.errors import ImageError
from anomap.serve.limits import Limits

ACCEPTED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")
ACCEPTED_TEXT = "PNG, JPEG, BMP or TIFF"
MAX_LABEL = 200
MULTIPART_HINT = "send images as multipart/form-data, e.g. curl -F file=@part.png http://HOST:PORT/v1/predict"


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


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``max_bytes``."""
    too_big = f"request body is over this server's limit of {max_bytes:,} bytes; send fewer or smaller images."
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise HTTPException(400, "the Content-Length header is not a number.") from None
        if size > max_bytes:
            raise HTTPException(413, too_big)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise HTTPException(413, too_big)
    return bytes(body)


async def read_form(request: Request, limits: Limits, hint: str = MULTIPART_HINT,
                    files_required: bool = True) -> tuple[list[tuple[str, bytes]], dict[str, str]]:
    """(label, bytes) for every file part of a multipart request, in order, and its text fields (the
    first value of each name, at most 1,000 characters). With ``files_required=False`` a URL-encoded
    form or a JSON object of text fields is read too."""
    ctype = request.headers.get("content-type", "")
    kind = ctype.lower().split(";")[0].strip()
    if not files_required and kind in ("application/x-www-form-urlencoded", "application/json"):
        return [], await _text_fields(request, limits, kind == "application/json", hint)
    if kind != "multipart/form-data":
        raise HTTPException(415, f"expected a multipart/form-data upload, got {ctype[:80] or 'no Content-Type'}; "
                                 f"{hint}.")
    body = await read_body(request, limits.max_bytes)

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    uploads: list[tuple[str, bytes]] = []
    fields: dict[str, str] = {}
    async with Request(request.scope, replay).form(max_files=limits.max_files, max_fields=64) as form:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                uploads.append((clean_label(value.filename, len(uploads)), await value.read()))
            else:
                fields.setdefault(name, str(value)[:1000])
    if files_required and not uploads:
        raise HTTPException(400, f"the request holds no file; {hint}.")
    return uploads, fields


async def _text_fields(request: Request, limits: Limits, is_json: bool, hint: str) -> dict[str, str]:
    """Text fields of a URL-encoded form or a flat JSON object (values as strings)."""
    body = await read_body(request, min(limits.max_bytes, 64 * 1024))
    if is_json:
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            raise HTTPException(400, f"the body is not valid JSON; {hint}.") from None
        if not isinstance(data, dict):
            raise HTTPException(400, f"the JSON body must be an object; {hint}.")
    else:
        data = dict(urllib.parse.parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
    return {str(k): str(v)[:1000] for k, v in data.items() if isinstance(v, str | int | float)}
