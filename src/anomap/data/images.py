"""Decoding images and masks into uint8 numpy arrays with clear, one-line errors.

Every image anomap reads goes through :func:`load_image`, so all modes Pillow can produce end up as
``uint8`` arrays of shape (H, W, C) with C = 1 (grey) or 3 (colour). Masks go through :func:`load_mask`.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from anomap.errors import DataError, ImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MAX_PIXELS = 100_000_000

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
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(p)
    except Image.DecompressionBombError as exc:
        raise ImageError(
            f"image is too large to decode safely ({exc}).",
            path=p,
            fix=f"downscale the image below {MAX_PIXELS:,} pixels",
        ) from None
    except UnidentifiedImageError:
        raise ImageError(
            "is not a readable image (Pillow cannot identify the format).",
            path=p,
            fix=f"convert it to PNG or JPEG, or remove it from the folder (accepted: {', '.join(IMAGE_EXTENSIONS)})",
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"cannot be opened as an image ({exc}).", path=p, fix=_FIX_CORRUPT) from None
    w, h = img.size
    if w * h > MAX_PIXELS:
        img.close()
        raise ImageError(
            f"image is too large ({w}x{h} = {w * h:,} pixels, limit {MAX_PIXELS:,}).",
            path=p,
            fix="downscale the image before giving it to anomap",
        )
    if w < 1 or h < 1:
        img.close()
        raise ImageError(f"image has an empty size ({w}x{h}).", path=p, fix=_FIX_CORRUPT)
    return img


def _composite_black(arr: np.ndarray) -> np.ndarray:
    """Drop the last (alpha) channel of a uint8 array by compositing over black."""
    colour = arr[..., :-1].astype(np.uint16)
    alpha = arr[..., -1:].astype(np.uint16)
    return ((colour * alpha + 127) // 255).astype(np.uint8)


def _float_to_u8(arr: np.ndarray) -> np.ndarray:
    """Map float values to uint8: data in [0, 1] is scaled by 255, anything else is clipped to 0..255."""
    arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
    if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
        arr = arr * 255.0
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def _pil_to_array(img: Image.Image) -> np.ndarray:
    """Convert a decoded Pillow image of any supported mode to uint8 (H, W, 1) or (H, W, 3)."""
    mode = img.mode
    if mode == "1":
        arr = np.asarray(img.convert("L"))
    elif mode == "L":
        arr = np.asarray(img)
    elif mode in ("LA", "La"):
        arr = _composite_black(np.asarray(img.convert("LA")))[..., 0]
    elif mode.startswith("I;16") or mode == "I":
        raw = np.asarray(img).astype(np.float64)
        arr = np.clip(np.rint(np.clip(raw, 0, 65535) / 257.0), 0, 255).astype(np.uint8)
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
            source.load()
            img = ImageOps.exif_transpose(source) or source
            arr = _pil_to_array(img)
        except Exception as exc:  # noqa: BLE001 - any decoder failure becomes one clear message
            raise ImageError(
                f"in-memory image cannot be decoded ({exc}).", fix="pass a valid image"
            ) from None
        return _set_channels(arr, channels)
    path = Path(source)
    with _open(path) as img:
        try:
            img.load()
            img = ImageOps.exif_transpose(img) or img
            arr = _pil_to_array(img)
        except ImageError:
            raise
        except Exception as exc:  # noqa: BLE001 - truncated data raises OSError, others SyntaxError etc.
            raise ImageError(
                f"image is truncated or corrupt (decoder said: {exc}).", path=path, fix=_FIX_CORRUPT
            ) from None
    return _set_channels(arr, channels)


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
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
