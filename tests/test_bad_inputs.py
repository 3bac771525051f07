"""Malformed and unusual image files everywhere images enter: load_image, dataset loading, predict, evaluate.

Every case gives either a correct array or one ImageError/DataError whose one-line message names the
file; never another exception and never a hang. The corpus is generated here; a hypothesis fuzz test
feeds random and mutated bytes to the decoder.
"""

from __future__ import annotations

import io
import shutil
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import anomap
from anomap import cli
from anomap.data import dataset as ds
from anomap.data import images as im
from anomap.errors import AnomapError, ImageError
from anomap.registry import get_method_class
from conftest import TINY, make_category

W, H = 40, 30


def _rgb(seed: int = 0, w: int = W, h: int = H) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png_bytes(w: int, h: int, bit_depth: int, colour_type: int, idat: bytes) -> bytes:
    """A PNG written by hand (to claim any size, or to use 48-bit colour)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _exif_jpeg(orientation: int) -> bytes:
    arr = np.zeros((H, W, 3), np.uint8)
    arr[:, : W // 2] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(Image.fromarray(arr), "JPEG", exif=exif, quality=95)


def _rgb48() -> bytes:
    a = (np.arange(H * W * 3, dtype=np.uint32).reshape(H, W, 3) * 50 % 65536).astype(">u2")
    rows = b"".join(b"\x00" + a[i].tobytes() for i in range(H))
    return _png_bytes(W, H, 16, 2, zlib.compress(rows))


def _multi_tiff() -> bytes:
    frames = [Image.fromarray(_rgb(i)) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="TIFF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def _palette_transparent() -> bytes:
    p = Image.fromarray(_rgb()).convert("P")
    return _encode(p, "PNG", transparency=0)


GOOD_PNG = _encode(Image.fromarray(_rgb()), "PNG")
GOOD_JPEG = _encode(Image.fromarray(_rgb()), "JPEG")

# name -> (bytes, expected (h, w, c) or None for an error, words the error message must contain)
Case = tuple[Callable[[], bytes], tuple[int, int, int] | None, str]
CASES: dict[str, Case] = {
    "truncated.png": (lambda: GOOD_PNG[: len(GOOD_PNG) // 2], None, "truncated"),
    "truncated.jpg": (lambda: GOOD_JPEG[: len(GOOD_JPEG) // 2], None, "truncated"),
    "header_only.png": (lambda: GOOD_PNG[:40], None, "truncated"),
    "zero.png": (lambda: b"", None, "empty file"),
    "text.jpg": (lambda: b"hello, this is not an image\n" * 10, None, "not a readable image"),
    "html.png": (lambda: b"<!DOCTYPE html><html><body>x</body></html>", None, "not a readable image"),
    "eps.png": (lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", None,
                "not a readable image"),
    "random.tif": (lambda: np.random.default_rng(1).bytes(3000), None, "not a readable image"),
    "bad_crc.png": (lambda: GOOD_PNG[:-20] + bytes(8) + GOOD_PNG[-12:], None, "corrupt"),
    "bomb_pillow.png": (lambda: _png_bytes(40000, 40000, 8, 0, zlib.compress(b"\0" * 40001)), None, "too large"),
    "bomb_limit.png": (lambda: _png_bytes(12000, 9000, 8, 0, zlib.compress(b"\0" * 12001)), None, "too large"),
    "one_by_one.png": (lambda: _encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), (1, 1, 3), ""),
    "thin.png": (lambda: _encode(Image.new("L", (3000, 1), 5), "PNG"), (1, 3000, 1), ""),
    "huge.png": (lambda: _encode(Image.new("L", (4000, 3000), 7), "PNG", compress_level=1), (3000, 4000, 1), ""),
    "grey16.png": (lambda: _encode(Image.fromarray(np.full((H, W), 51400, np.uint16)), "PNG"), (H, W, 1), ""),
    "rgb48.png": (_rgb48, (H, W, 3), ""),
    "grey16.tif": (lambda: _encode(Image.fromarray(np.full((H, W), 300, np.uint16)), "TIFF"), (H, W, 1), ""),
    "int32.tif": (lambda: _encode(Image.fromarray(np.full((H, W), 70000, np.int32)), "TIFF"), (H, W, 1), ""),
    "float.tif": (lambda: _encode(Image.fromarray(np.full((H, W), np.nan, np.float32)), "TIFF"), (H, W, 1), ""),
    "bilevel.png": (lambda: _encode(Image.new("1", (W, H), 1), "PNG"), (H, W, 1), ""),
    "palette.png": (lambda: _encode(Image.fromarray(_rgb()).convert("P"), "PNG"), (H, W, 3), ""),
    "palette_transparent.png": (_palette_transparent, (H, W, 3), ""),
    "cmyk.jpg": (lambda: _encode(Image.fromarray(_rgb()).convert("CMYK"), "JPEG"), (H, W, 3), ""),
    "cmyk.tif": (lambda: _encode(Image.fromarray(_rgb()).convert("CMYK"), "TIFF"), (H, W, 3), ""),
    "la.png": (lambda: _encode(Image.new("LA", (W, H), (200, 128)), "PNG"), (H, W, 1), ""),
    "rgba.png": (lambda: _encode(Image.new("RGBA", (W, H), (200, 100, 50, 0)), "PNG"), (H, W, 3), ""),
    "exif_rot6.jpg": (lambda: _exif_jpeg(6), (W, H, 3), ""),
    "exif_rot8.jpg": (lambda: _exif_jpeg(8), (W, H, 3), ""),
    "exif_rot3.jpg": (lambda: _exif_jpeg(3), (H, W, 3), ""),
    "exif_garbage.jpg": (lambda: _encode(Image.fromarray(_rgb()), "JPEG", exif=b"Exif\0\0" + b"\xff" * 64),
                         (H, W, 3), ""),
    "gif_named.png": (lambda: _encode(Image.fromarray(_rgb()).convert("P"), "GIF"), (H, W, 3), ""),
    "multipage.tif": (_multi_tiff, (H, W, 3), ""),
    "upper_case.PNG": (lambda: GOOD_PNG, (H, W, 3), ""),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    for name, (make, _, _) in CASES.items():
        (folder / name).write_bytes(make())
    (folder / "folder.png").mkdir()
    return folder


def _one_line_naming(exc: BaseException, path: Path, *words: str) -> None:
    msg = str(exc)
    assert isinstance(exc, AnomapError), repr(exc)
    assert "\n" not in msg and str(path) in msg and "Fix:" in msg, msg
    for w in words:
        assert w in msg, msg


@pytest.mark.parametrize("name", list(CASES))
def test_load_image_corpus(corpus, name) -> None:
    _, expected, words = CASES[name]
    path = corpus / name
    t0 = time.process_time()
    if expected is None:
        for fn in (im.load_image, im.image_size, im.is_grey_file):
            if fn is not im.load_image and name.startswith(("truncated", "bad_crc")):
                continue  # the header is intact: only decoding the pixels finds the damage
            with pytest.raises(ImageError) as info:
                fn(path)
            _one_line_naming(info.value, path, words)
    else:
        arr = im.load_image(path)
        assert arr.dtype == np.uint8 and arr.shape == expected and arr.flags.c_contiguous
        assert im.image_size(path) == (expected[1], expected[0])
        assert im.is_grey_file(path) == (expected[2] == 1) or name.startswith(("palette", "gif"))
        for channels in (1, 3) if name != "huge.png" else ():
            assert im.load_image(path, channels=channels).shape == (*expected[:2], channels)
    if name.startswith("bomb"):
        assert time.process_time() - t0 < 2  # refused from the header, nothing decoded


def test_mode_values(corpus) -> None:
    assert (im.load_image(corpus / "grey16.png") == 200).all()  # 51400 / 257
    assert (im.load_image(corpus / "int32.tif") == 255).all()  # clipped to 65535 first
    assert (im.load_image(corpus / "float.tif") == 0).all()  # NaN -> 0
    assert (im.load_image(corpus / "rgba.png") == 0).all()  # fully transparent over black
    assert (im.load_image(corpus / "la.png") == 100).all()  # 200 at alpha 128/255, rounded
    top = im.load_image(corpus / "exif_rot6.jpg")[2, W // 2 - 3 : W // 2 + 3]
    assert top[:, 0].min() > 200  # the red left half is on top after the quarter turn
    pa = Image.new("RGBA", (4, 4), (255, 0, 0, 255)).convert("PA")
    assert im.load_image(pa).shape == (4, 4, 3)
    with pytest.raises(ImageError, match="is not a file"):
        im.load_image(corpus / "folder.png")
    with pytest.raises(ImageError, match="cannot read an image from a bytes"):
        im.load_image(GOOD_PNG)  # type: ignore[arg-type]


def test_dataset_loading_names_the_bad_file(tmp_path) -> None:
    for name, (make, expected, words) in CASES.items():
        root = make_category(tmp_path / name, n_train=8, n_good=1, n_defect=1, size=32)
        bad = root / "train/good" / name
        bad.write_bytes(make())
        paths = ds.train_images(root)
        assert bad in paths
        if expected is None and name.startswith(("truncated", "bad_crc")):
            ds.check_min_size(paths, 16)  # the header is intact: fit's image loader reports it (below)
        elif expected is None:
            with pytest.raises(ImageError) as info:
                ds.check_min_size(paths, 16)  # fit reads every header before any work
            _one_line_naming(info.value, bad, words)
        elif min(expected[:2]) < 16:
            with pytest.raises(AnomapError) as info:
                ds.check_min_size(paths, 16)
            _one_line_naming(info.value, bad, "smaller than")
        else:
            ds.check_min_size(paths, 16)
        if name in ("truncated.png", "zero.png"):
            with pytest.raises(ImageError) as info:
                anomap.create("ssl_ae", **TINY).fit(root, progress=False)
            _one_line_naming(info.value, bad, words)
        shutil.rmtree(root)
    # A bad mask or defect image in test/ is named by test_samples.
    root = make_category(tmp_path / "masks", n_train=8, n_good=1, n_defect=2, size=32)
    mask = root / "ground_truth/spot/000_mask.png"
    mask.write_bytes(b"")
    with pytest.raises(ImageError) as info:
        ds.test_samples(root)
    _one_line_naming(info.value, mask, "empty file")
    img = root / "test/spot/001.png"
    img.write_bytes(b"GIF89a garbage")
    mask.write_bytes(GOOD_PNG)
    with pytest.raises(AnomapError) as info:
        ds.test_samples(root)
    assert str(root / "test/spot") in str(info.value)


@pytest.fixture(scope="module")
def detectors(tmp_path_factory):
    """A tiny trained colour ssl_ae, and an untrained grey one (shapes and errors are what is checked)."""
    import torch

    torch.set_num_threads(1)
    data = make_category(tmp_path_factory.mktemp("det") / "cat", n_train=10, n_good=2, n_defect=2, size=32)
    colour = anomap.create("ssl_ae", **TINY).fit(data, progress=False)
    grey = anomap.create("ssl_ae", **TINY)
    grey.model = get_method_class("ssl_ae")(grey.config, 1).eval()
    grey.channels = 1
    return colour, grey, data


@pytest.mark.parametrize("name", list(CASES))
def test_predict_corpus(corpus, detectors, name) -> None:
    colour, grey, _ = detectors
    _, expected, words = CASES[name]
    path = corpus / name
    for det in (colour, grey):
        if expected is None:
            with pytest.raises(ImageError) as info:
                det.predict(path)
            _one_line_naming(info.value, path, words)
        else:
            res = det.predict(path)
            assert res.anomaly_map.shape == expected[:2] and np.isfinite(res.score)
            assert np.isfinite(res.anomaly_map).all()


def test_evaluate_and_cli_name_the_bad_file(detectors, tmp_path, capsys) -> None:
    colour, _, data = detectors
    root = tmp_path / "cat"
    shutil.copytree(data, root)
    bad = root / "test/good/zz_truncated.png"
    bad.write_bytes(GOOD_PNG[:100])
    with pytest.raises(ImageError) as info:
        anomap.evaluate(colour, root, progress=False)
    _one_line_naming(info.value, bad, "truncated")
    model = colour.save(tmp_path / "m.safetensors")
    assert cli.main(["predict", "--model", str(model), str(root / "test/good"), "-q"]) != 0
    err = capsys.readouterr().err.strip()
    assert str(bad) in err and "truncated" in err and "Traceback" not in err  # the others are still scored


# ------------------------------------------------------------------------------------------- fuzzing

SEEDS = [GOOD_PNG, GOOD_JPEG, _encode(Image.fromarray(_rgb()), "BMP"), _encode(Image.fromarray(_rgb()), "TIFF"),
         _encode(Image.fromarray(_rgb()).convert("P"), "GIF"), _rgb48(), _exif_jpeg(6)]
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _check_decoder(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    try:
        arr = im.load_image(path)
    except ImageError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)
        return
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] in (1, 3) and min(arr.shape[:2]) >= 1


@FUZZ
@given(data=st.binary(max_size=600), ext=st.sampled_from(im.IMAGE_EXTENSIONS))
def test_fuzz_random_bytes(tmp_path, data, ext) -> None:
    _check_decoder(tmp_path / f"fuzz{ext}", data)


@FUZZ
@given(seed=st.sampled_from(SEEDS), edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
                                                  max_size=8),
       cut=st.one_of(st.none(), st.integers(0, 10**6)), insert=st.binary(max_size=32))
def test_fuzz_mutated_images(tmp_path, seed, edits, cut, insert) -> None:
    data = bytearray(seed)
    for pos, value in edits:
        data[pos % len(data)] = value
    if insert:
        at = (edits[0][0] if edits else 0) % len(data)
        data[at:at] = insert
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    _check_decoder(tmp_path / "fuzz.png", bytes(data))
