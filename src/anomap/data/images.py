"""Decoding images and masks into uint8 numpy arrays with clear, one-line errors.

Every image anomap reads goes through :func:`load_image`, so all modes Pillow can produce end up as
``uint8`` arrays of shape (H, W, C) with C = 1 (grey) or 3 (colour). Masks go through :func:`load_mask`.

Bad files never crash or hang a caller: a missing, empty, truncated or corrupt file, a file in another
format with an image extension, and an image over :data:`MAX_PIXELS` (checked from the header, before
any pixel is decoded: decompression bombs) all raise one :class:`~anomap.errors.ImageError` that names
the file. Only the raster formats in :data:`DECODERS` are tried (never, e.g., EPS, which would run
Ghostscript). Pillow's warnings about damaged metadata are silenced; a broken EXIF block is ignored.
Mode conversions work in bands of rows, so their temporaries stay small for huge images.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from anomap.errors import DataError, ImageError

# Pillow logs some damaged-file findings (e.g. TIFF "More samples per pixel than can be decoded") at
# ERROR level before raising; without a handler they would reach stderr through logging's last resort.
# The same finding reaches the user as the ImageError below, so give Pillow's logger a NullHandler.
logging.getLogger("PIL").addHandler(logging.NullHandler())

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MAX_PIXELS = 100_000_000  # width x height; read at call time, so it can be changed (tests, services)
# Pillow decoders tried on a file, whatever its extension (MPO: multi-picture JPEG from cameras).
DECODERS = ("PNG", "JPEG", "MPO", "BMP", "DIB", "TIFF", "GIF", "WEBP")
_ROW_BAND = 1024  # rows per band in mode conversions

GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"})
_EXIF_ORIENTATION = 0x0112
_FIX_CORRUPT = "re-export the file or remove it from the folder"


def is_image_file(path: str | Path) -> bool:
    """Whether ``path`` has one of the accepted image extensions (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _open(path: str | Path) -> Image.Image:
    """Open an image lazily (header only), turning every failure into an :class:`ImageError`."""
    p = Path(path)
    if not p.exists():
        raise ImageError("file not found.", path=p, fix="check the path or remove the entry that names it")
    if not p.is_file():
        raise ImageError("is not a file.", path=p, fix="give the path of an image file")
    limit = int(MAX_PIXELS)
    try:
        if p.stat().st_size == 0:
            raise ImageError("is an empty file (0 bytes), not an image.", path=p, fix=_FIX_CORRUPT)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning, damaged-metadata warnings
            img = Image.open(p, formats=_decoders())
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(
            f"image is too large to decode safely ({exc}).",
            path=p,
            fix=f"downscale the image below {limit:,} pixels",
        ) from None
    except UnidentifiedImageError:
        kind = _signature(p)
        if kind is not None:
            raise ImageError(f"starts like a {kind} file but its header cannot be read (truncated or corrupt).",
                             path=p, fix=_FIX_CORRUPT) from None
        raise ImageError(
            "is not a readable image (not a PNG, JPEG, BMP or TIFF file).",
            path=p,
            fix=f"convert it to PNG or JPEG, or remove it from the folder (accepted: {', '.join(IMAGE_EXTENSIONS)})",
        ) from None
    except Exception as exc:  # noqa: BLE001 - a broken header of a known format: any error means the same
        raise ImageError(f"cannot be opened as an image ({_short(exc)}).", path=p, fix=_FIX_CORRUPT) from None
    w, h = img.size
    if w * h > limit:
        img.close()
        raise ImageError(
            f"image is too large ({w}x{h} = {w * h:,} pixels, limit {limit:,}).",
            path=p,
            fix="downscale the image before giving it to anomap",
        )
    if w < 1 or h < 1:
        img.close()
        raise ImageError(f"image has an empty size ({w}x{h}).", path=p, fix=_FIX_CORRUPT)
    return img


_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"II*\0", "TIFF"),
               (b"MM\0*", "TIFF"), (b"GIF8", "GIF"), (b"BM", "BMP"))


def _signature(path: Path) -> str | None:
    """The format a file's first bytes announce, if it is one anomap reads."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return None
    return next((name for magic, name in _SIGNATURES if head.startswith(magic)), None)


@functools.cache
def _decoders() -> tuple[str, ...]:
    """:data:`DECODERS` that this Pillow has (all plugins registered first)."""
    Image.init()
    return tuple(f for f in DECODERS if f in Image.OPEN)


def _short(exc: object, limit: int = 160) -> str:
    """One line of at most ``limit`` characters describing an exception."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "..."


def _bands(arr: np.ndarray, out_channels: int, fn) -> np.ndarray:
    """Apply ``fn`` (an array band -> uint8 band) to bands of rows into a new (H, W, out_channels) array."""
    out = np.empty((arr.shape[0], arr.shape[1], out_channels), dtype=np.uint8)
    for top in range(0, arr.shape[0], _ROW_BAND):
        band = fn(arr[top : top + _ROW_BAND])
        out[top : top + _ROW_BAND] = band.reshape(band.shape[0], band.shape[1], out_channels)
    return out


def _composite_black(arr: np.ndarray) -> np.ndarray:
    """Drop the last (alpha) channel of a uint8 array by compositing over black."""

    def band(a: np.ndarray) -> np.ndarray:
        colour = a[..., :-1].astype(np.uint16)
        alpha = a[..., -1:].astype(np.uint16)
        return ((colour * alpha + 127) // 255).astype(np.uint8)

    return _bands(arr, arr.shape[-1] - 1, band)


def _wide_to_u8(arr: np.ndarray) -> np.ndarray:
    """16-bit (or 32-bit integer) grey: clip to 0..65535, then divide by 257, rounded (exact integers)."""

    def band(a: np.ndarray) -> np.ndarray:
        v = np.clip(a.astype(np.int64), 0, 65535)
        return ((v + 128) // 257).astype(np.uint8)  # == rint(v / 257): v / 257 is never exactly x.5

    return _bands(arr if arr.ndim == 3 else arr[:, :, None], 1, band)


def _float_to_u8(arr: np.ndarray) -> np.ndarray:
    """Map float values to uint8: NaN and -inf -> 0, +inf -> 255; then data in [0, 1] is scaled by 255,
    anything else is clipped to 0..255."""
    arr = np.asarray(arr)
    finite = np.isfinite(arr)
    lo = float(np.min(arr, where=finite, initial=np.inf))
    hi = float(np.max(arr, where=finite, initial=-np.inf))
    unit = not bool(np.isposinf(arr).any()) and lo >= 0.0 and hi <= 1.0
    del finite

    def band(a: np.ndarray) -> np.ndarray:
        v = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        return np.clip(np.rint(v * 255.0 if unit else v), 0, 255).astype(np.uint8)

    return _bands(arr if arr.ndim == 3 else arr[:, :, None], 1, band)


def _pil_to_array(img: Image.Image) -> np.ndarray:
    """Convert a decoded Pillow image of any supported mode to uint8 (H, W, 1) or (H, W, 3)."""
    mode = img.mode
    if mode == "1":
        arr = np.asarray(img.convert("L"))
    elif mode == "L":
        arr = np.asarray(img)
    elif mode in ("LA", "La"):
        arr = _composite_black(np.asarray(img.convert("LA")))
    elif mode.startswith("I;16") or mode == "I":
        arr = _wide_to_u8(np.asarray(img))
    elif mode == "F":
        arr = _float_to_u8(np.asarray(img))
    elif mode == "RGB":
        arr = np.asarray(img)
    elif mode in ("RGBA", "PA") or (mode == "P" and "transparency" in img.info):
        arr = _composite_black(np.asarray(img.convert("RGBA")))
    else:  # P without transparency, CMYK, YCbCr, LAB, HSV, RGBX, ...
        arr = np.asarray(img.convert("RGB"))
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.ascontiguousarray(arr, dtype=np.uint8)


def _exif_upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a damaged EXIF block is ignored (as :func:`image_size` does)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ImageOps.exif_transpose(img) or img
    except Exception:  # noqa: BLE001 - orientation is optional information
        return img


def _array_to_u8(arr: np.ndarray) -> np.ndarray:
    """Validate a numpy image given through the API and convert it to uint8 (H, W, 1|3)."""
    arr = np.asarray(arr)
    fix = "pass an (H, W) or (H, W, C) array with C in 1, 3 or 4, dtype uint8, uint16 or float in [0, 1]"
    if arr.ndim == 3 and arr.shape[2] in (1, 3, 4):
        pass
    elif arr.ndim == 2:
        arr = arr[:, :, None]
    else:
        raise ImageError(f"array image has shape {tuple(arr.shape)}, which is not an image.", fix=fix)
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageError(f"array image has an empty size {tuple(arr.shape)}.", fix=fix)
    if arr.dtype == np.uint8:
        out = arr
    elif arr.dtype == np.bool_:
        out = arr.astype(np.uint8) * 255
    elif arr.dtype == np.uint16:
        out = np.rint(arr.astype(np.float64) / 257.0).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or arr.min() < 0.0 or arr.max() > 1.0:
            raise ImageError(
                f"float array image has values outside [0, 1] (min {np.nanmin(arr):.4g}, "
                f"max {np.nanmax(arr):.4g}).",
                fix="scale float images to [0, 1] or pass uint8",
            )
        out = np.rint(arr.astype(np.float64) * 255.0).astype(np.uint8)
    else:
        raise ImageError(f"array image has unsupported dtype {arr.dtype}.", fix=fix)
    if out.shape[2] == 4:
        out = _composite_black(out)
    return np.ascontiguousarray(out, dtype=np.uint8)


def _set_channels(arr: np.ndarray, channels: int | None) -> np.ndarray:
    if channels is None or arr.shape[2] == channels:
        return arr
    if channels == 3:
        return np.repeat(arr, 3, axis=2)
    if channels == 1:
        return np.asarray(Image.fromarray(arr).convert("L"))[:, :, None]
    raise ImageError(f"channels must be None, 1 or 3, not {channels!r}.", fix="use channels=1 or channels=3")


def load_image(source: str | Path | Image.Image | np.ndarray, channels: int | None = None) -> np.ndarray:
    """Decode an image file (or accept an in-memory image) as a uint8 (H, W, C) array.

    EXIF orientation is applied. Alpha is composited over black. 16-bit data ("I;16*", "I") is scaled
    0..65535 -> 0..255 (divide by 257, rounded). Float data ("F") in [0, 1] is scaled by 255, otherwise
    it is clipped to 0..255. Palette images are treated as colour.

    Args:
        source: a file path, a Pillow image, or a numpy array (H, W) / (H, W, C) with C in 1, 3, 4 of
            dtype uint8, uint16, bool or float in [0, 1].
        channels: None keeps the natural channel count (1 for grey modes, 3 otherwise); 1 converts
            colour to grey (ITU-R 601 luma, as Pillow "L"); 3 repeats grey.

    Returns:
        A C-contiguous uint8 array of shape (H, W, C).

    Raises:
        ImageError: the file is missing, not an image, truncated/corrupt, too large, or the array
            has an unusable shape or dtype.
    """
    if isinstance(source, np.ndarray):
        return _set_channels(_array_to_u8(source), channels)
    if isinstance(source, Image.Image):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                source.load()
        except Exception as exc:  # noqa: BLE001 - any decoder failure becomes one clear message
            raise ImageError(f"in-memory image cannot be decoded ({_short(exc)}).", fix="pass a valid image") from None
        return _set_channels(_to_array(source, None), channels)
    if not isinstance(source, (str, os.PathLike)):
        raise ImageError(f"cannot read an image from a {type(source).__name__}.",
                         fix="pass a file path, a PIL image or a numpy array")
    path = Path(source)
    with _open(path) as img:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img.load()
        except MemoryError:
            raise ImageError("image is too large to decode in the memory available.", path=path,
                             fix="downscale the image, or lower anomap.data.images.MAX_PIXELS") from None
        except Exception as exc:  # noqa: BLE001 - truncated data raises OSError, others SyntaxError etc.
            raise ImageError(
                f"image is truncated or corrupt (decoder said: {_short(exc)}).", path=path, fix=_FIX_CORRUPT
            ) from None
        arr = _to_array(img, path)
    return _set_channels(arr, channels)


def _to_array(img: Image.Image, path: Path | None) -> np.ndarray:
    """EXIF orientation + mode conversion of a decoded image, failures as one ImageError."""
    img = _exif_upright(img)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _pil_to_array(img)
    except MemoryError:
        raise ImageError("image is too large to convert in the memory available.", path=path,
                         fix="downscale the image") from None
    except Exception as exc:  # noqa: BLE001 - e.g. a mode Pillow cannot convert to RGB
        raise ImageError(f"image mode {img.mode} cannot be converted to grey or RGB ({_short(exc)}).",
                         path=path, fix="convert it to an 8-bit RGB or greyscale PNG") from None


def is_grey_file(path: str | Path) -> bool:
    """Whether a file is single-channel according to its header mode (no pixel decoding).

    True for modes "1", "L", "LA", "I;16*", "I" and "F"; palette ("P") counts as colour.
    """
    with _open(path) as img:
        return img.mode in GREY_MODES or img.mode.startswith("I;16")


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image as :func:`load_image` will return it, read from the header.

    An EXIF orientation of 5-8 (a quarter turn) swaps width and height, matching the decoded array.
    """
    with _open(path) as img:
        w, h = img.size
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
        except Exception:  # noqa: BLE001 - a broken EXIF block is ignored, as exif_transpose would
            orientation = 1
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    return int(w), int(h)


def load_mask(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """Load a ground-truth mask as a bool (H, W) array (True = defect).

    Any image mode is accepted; after grey conversion, values > 127 are defect. Masks coded 0/1
    (maximum value exactly 1) are accepted too: there, every non-zero pixel is defect.

    Args:
        path: the mask file.
        size: optional (width, height) of the image the mask belongs to.

    Raises:
        ImageError: the mask cannot be decoded.
        DataError: ``size`` is given and the mask has another size.
    """
    grey = load_image(path, channels=1)[:, :, 0]
    h, w = grey.shape
    if size is not None and (int(size[0]), int(size[1])) != (w, h):
        raise DataError(
            f"mask is {w}x{h} pixels but its image is {int(size[0])}x{int(size[1])} (width x height).",
            path=path,
            fix="masks must have the same size as their image; re-export the mask at the image size",
        )
    if grey.max(initial=0) == 1:
        return grey > 0
    return grey > 127


def save_png_atomic(path: str | Path, array_uint8: np.ndarray) -> None:
    """Write a uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array as PNG, atomically.

    The data goes to a temporary file in the same directory, which then replaces ``path``; readers
    never see a half-written file. Missing parent folders are created.
    """
    arr = np.asarray(array_uint8)
    if arr.dtype != np.uint8:
        raise ImageError(
            f"cannot save dtype {arr.dtype} as PNG.", path=path, fix="convert the array to uint8"
        )
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise ImageError(
            f"cannot save an array of shape {tuple(arr.shape)} as PNG.",
            path=path,
            fix="pass an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array",
        )
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            Image.fromarray(np.ascontiguousarray(arr)).save(fh, format="PNG")
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
