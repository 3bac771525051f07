"""Tests for anomap.data: image decoding, transforms and dataset discovery (tiny files made on the fly)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomap.data import dataset as ds
from anomap.data import images as im
from anomap.data import transforms as tf
from anomap.errors import DataError, ImageError


def _save(path: Path, img: Image.Image, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def _rgb(w: int = 8, h: int = 6, seed: int = 0) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr)


def _assert_msg(exc: pytest.ExceptionInfo, path: Path | str, *words: str) -> None:
    msg = str(exc.value)
    assert str(path) in msg
    assert "Fix:" in msg
    for w in words:
        assert w in msg, msg


# ---------------------------------------------------------------- images.py


@pytest.mark.parametrize(
    ("name", "make", "channels"),
    [
        ("one.png", lambda: Image.new("1", (8, 6), 1), 1),
        ("l.png", lambda: Image.new("L", (8, 6), 77), 1),
        ("la.png", lambda: Image.new("LA", (8, 6), (200, 255)), 1),
        ("p.png", lambda: _rgb().convert("P"), 3),
        ("rgb.bmp", lambda: _rgb(), 3),
        ("rgb.jpg", lambda: _rgb(), 3),
        ("rgba.png", lambda: Image.new("RGBA", (8, 6), (10, 20, 30, 255)), 3),
        ("cmyk.tif", lambda: Image.new("CMYK", (8, 6), (0, 0, 0, 0)), 3),
        ("rgb.TIFF", lambda: _rgb(), 3),
        ("i16.png", lambda: Image.fromarray(np.full((6, 8), 25700, np.uint16)), 1),
        ("i32.tif", lambda: Image.fromarray(np.full((6, 8), 514, np.int32)), 1),
        ("f.tif", lambda: Image.fromarray(np.full((6, 8), 0.5, np.float32)), 1),
    ],
)
def test_load_image_modes(tmp_path, name, make, channels):
    p = _save(tmp_path / name, make())
    arr = im.load_image(p)
    assert arr.dtype == np.uint8 and arr.shape == (6, 8, channels)
    assert im.is_grey_file(p) == (channels == 1)
    assert im.image_size(p) == (8, 6)
    assert im.load_image(p, channels=1).shape == (6, 8, 1)
    assert im.load_image(p, channels=3).shape == (6, 8, 3)


def test_mode_values(tmp_path):
    p16 = _save(tmp_path / "a.png", Image.fromarray(np.array([[0, 128, 129, 25700, 65535]], np.uint16)))
    assert Image.open(p16).mode == "I;16"
    assert im.load_image(p16)[0, :, 0].tolist() == [0, 0, 1, 100, 255]
    assert (
        im.load_image(_save(tmp_path / "b.tif", Image.fromarray(np.full((2, 2), 771, np.int32))))[0, 0, 0]
        == 3
    )
    assert (
        im.load_image(_save(tmp_path / "c.tif", Image.fromarray(np.full((2, 2), 0.5, np.float32))))[0, 0, 0]
        == 128
    )
    fimg = Image.fromarray(np.array([[-3.0, 7.0, 300.0]], np.float32))
    assert im.load_image(fimg)[0, :, 0].tolist() == [0, 7, 255]
    assert im.load_image(_save(tmp_path / "d.png", Image.new("1", (2, 2), 1)))[0, 0, 0] == 255
    # alpha is composited over black
    rgba = _save(tmp_path / "e.png", Image.new("RGBA", (2, 2), (200, 100, 50, 128)))
    assert im.load_image(rgba)[0, 0].tolist() == [100, 50, 25]
    assert im.load_image(_save(tmp_path / "f.png", Image.new("LA", (2, 2), (200, 0))))[0, 0, 0] == 0
    # palette with a transparent index
    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((1, 0), 1)
    pp = _save(tmp_path / "g.png", pal, transparency=1)
    assert not im.is_grey_file(pp)
    assert im.load_image(pp)[0].tolist() == [[255, 0, 0], [0, 0, 0]]
    # colour to grey uses Pillow's ITU-R 601 luma; grey to colour repeats
    rgb = _rgb()
    p = _save(tmp_path / "h.png", rgb)
    assert np.array_equal(im.load_image(p, channels=1)[..., 0], np.asarray(rgb.convert("L")))
    g3 = im.load_image(_save(tmp_path / "i.png", Image.new("L", (3, 3), 9)), channels=3)
    assert g3.shape == (3, 3, 3) and (g3 == 9).all()


def test_exif_orientation(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    p = _save(tmp_path / "rot.jpg", Image.fromarray(arr), exif=exif, quality=95)
    out = im.load_image(p)
    assert out.shape == (40, 20, 3)
    assert im.image_size(p) == (20, 40)
    top, bottom = out[5, 10].astype(int), out[35, 10].astype(int)
    assert top[0] > 200 and top[2] < 60  # the left (red) half is on top after a 90 degree clockwise turn
    assert bottom[2] > 200 and bottom[0] < 60


def test_image_errors(tmp_path, monkeypatch):
    good = _save(tmp_path / "ok.png", _rgb(64, 64))
    data = good.read_bytes()
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError) as e:
        im.load_image(trunc)
    _assert_msg(e, trunc, "truncated")

    txt = tmp_path / "notes.png"
    txt.write_text("hello, not an image")
    for fn in (im.load_image, im.is_grey_file, im.image_size):
        with pytest.raises(ImageError) as e:
            fn(txt)
        _assert_msg(e, txt, "not a readable image")

    missing = tmp_path / "nope.png"
    with pytest.raises(ImageError) as e:
        im.load_image(missing)
    _assert_msg(e, missing, "file not found")

    monkeypatch.setattr(im, "MAX_PIXELS", 1000)
    with pytest.raises(ImageError) as e:
        im.load_image(good)
    _assert_msg(e, good, "too large")


def test_array_and_pil_inputs():
    assert im.load_image(np.zeros((4, 5), np.uint8)).shape == (4, 5, 1)
    assert im.load_image(np.full((4, 5, 3), 1.0, np.float32))[0, 0].tolist() == [255, 255, 255]
    assert im.load_image(np.full((2, 2), 65535, np.uint16))[0, 0, 0] == 255
    assert im.load_image(np.full((2, 2, 4), 255, np.uint8)).shape == (2, 2, 3)
    assert im.load_image(Image.new("L", (5, 4)), channels=3).shape == (4, 5, 3)
    with pytest.raises(ImageError, match="shape"):
        im.load_image(np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(ImageError, match=r"outside \[0, 1\]"):
        im.load_image(np.full((2, 2), 3.0))
    with pytest.raises(ImageError, match="dtype"):
        im.load_image(np.zeros((2, 2), np.int64))


def test_load_mask_and_save(tmp_path):
    m = np.zeros((6, 8), np.uint8)
    m[1:3, 2:5] = 200
    m[4, 4] = 100
    p = tmp_path / "sub" / "m.png"
    im.save_png_atomic(p, m)
    assert sorted(x.name for x in p.parent.iterdir()) == ["m.png"]
    mask = im.load_mask(p, size=(8, 6))
    assert mask.dtype == bool and mask.shape == (6, 8) and mask.sum() == 6
    rgb = _save(tmp_path / "rgbmask.png", Image.fromarray(np.stack([m] * 3, -1)))
    assert np.array_equal(im.load_mask(rgb), mask)
    ones = _save(tmp_path / "ones.png", Image.fromarray((m > 150).astype(np.uint8)))
    assert np.array_equal(im.load_mask(ones), mask)
    with pytest.raises(DataError) as e:
        im.load_mask(p, size=(10, 6))
    _assert_msg(e, p, "8x6", "10x6", "same size")
    im.save_png_atomic(p, np.zeros((3, 3, 3), np.uint8))  # replaces the file
    assert im.image_size(p) == (3, 3)
    with pytest.raises(ImageError):
        im.save_png_atomic(p, np.zeros((3, 3), np.float32))


# ---------------------------------------------------------------- transforms.py


def test_transforms(tmp_path):
    rgb = np.asarray(_rgb(40, 30))
    assert tf.resize_u8(rgb, 16).shape == (16, 16, 3)
    assert tf.resize_u8(rgb, (10, 20)).shape == (10, 20, 3)
    grey = np.full((30, 40, 1), 50, np.uint8)
    out = tf.resize_u8(grey, (7, 9))
    assert out.shape == (7, 9, 1) and (out == 50).all()
    assert tf.resize_u8(grey[..., 0], 5).shape == (5, 5)
    assert tf.to_channels(grey, 3).shape == (30, 40, 3)
    assert tf.to_channels(rgb, 1).shape == (30, 40, 1)
    assert tf.to_channels(rgb, 3) is rgb

    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True
    up = tf.resize_mask(mask, 8)
    assert up.dtype == bool and up.sum() == 16 and up[:4, :4].all()

    maps = np.random.default_rng(0).random((2, 5, 6)).astype(np.float64)
    r = tf.resize_maps(maps, (10, 12))
    assert r.dtype == np.float32 and r.shape == (2, 10, 12)
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(maps).float()[:, None], size=(10, 12), mode="bilinear", align_corners=False
    )[:, 0].numpy()
    assert np.allclose(r, ref)
    assert tf.resize_maps(torch.ones(5, 6), (3, 4)).shape == (3, 4)
    assert np.allclose(tf.resize_maps(np.full((5, 6), 2.0), (9, 9)), 2.0)

    paths = [_save(tmp_path / "a.png", _rgb(20, 10)), _save(tmp_path / "b.png", Image.new("L", (12, 12)))]
    stack = tf.load_stack(paths, 8, 3)
    assert stack.shape == (2, 8, 8, 3) and stack.dtype == np.uint8
    assert tf.load_stack(paths, 8, 1, progress=True).shape == (2, 8, 8, 1)


# ---------------------------------------------------------------- dataset.py


def _category(root: Path, n_train: int = 3, defects: tuple[str, ...] = ("crack",)) -> Path:
    for i in range(n_train):
        _save(root / "train" / "good" / f"{i:03d}.png", _rgb(seed=i))
    _save(root / "test" / "good" / "000.png", _rgb())
    for d in defects:
        for i in (1, 0):  # masks created in reverse order with distinct contents
            _save(root / "test" / d / f"{i:03d}.png", _rgb())
            m = np.zeros((6, 8), np.uint8)
            m[i, i] = 255
            _save(root / "ground_truth" / d / f"{i:03d}_mask.png", Image.fromarray(m))
    return root


def test_train_images(tmp_path):
    root = _category(tmp_path / "cat")
    (root / "train" / "good" / ".hidden.png").write_bytes(b"x")
    (root / "train" / "good" / "readme.txt").write_text("x")
    assert ds.is_mvtec_layout(root)
    assert [p.name for p in ds.train_images(root)] == ["000.png", "001.png", "002.png"]

    plain = tmp_path / "plain"
    _save(plain / "b.JPG", _rgb())
    _save(plain / "a.png", _rgb())
    _save(plain / "nested" / "c.png", _rgb())
    assert not ds.is_mvtec_layout(plain)
    assert [p.name for p in ds.train_images(plain)] == ["a.png", "b.JPG"]

    with pytest.raises(DataError) as e:
        ds.train_images(tmp_path / "missing")
    _assert_msg(e, tmp_path / "missing", "folder not found", "train/good")
    with pytest.raises(DataError) as e:
        ds.train_images(plain / "a.png")
    _assert_msg(e, plain / "a.png", "not a folder")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.txt").write_text("x")
    with pytest.raises(DataError) as e:
        ds.train_images(tmp_path / "empty")
    _assert_msg(e, tmp_path / "empty", "no training images", ".png", ".tiff")


def test_test_samples_pairing(tmp_path):
    root = _category(tmp_path / "cat", defects=("scratch", "crack"))
    samples = ds.test_samples(root)
    assert [(s.defect_type, s.path.name, s.label) for s in samples] == [
        ("crack", "000.png", 1),
        ("crack", "001.png", 1),
        ("good", "000.png", 0),
        ("scratch", "000.png", 1),
        ("scratch", "001.png", 1),
    ]
    assert samples[2].mask_path is None
    for s in samples:
        if s.label:
            assert s.mask_path.name == f"{s.path.stem}_mask.png"
            i = int(s.path.stem)
            assert np.argwhere(im.load_mask(s.mask_path, im.image_size(s.path))).tolist() == [[i, i]]
    # <stem>.png is accepted when no _mask file exists
    (root / "ground_truth" / "crack" / "001_mask.png").rename(root / "ground_truth" / "crack" / "001.png")
    assert ds.test_samples(root)[1].mask_path.name == "001.png"


def test_test_samples_errors(tmp_path):
    root = _category(tmp_path / "cat")
    _save(root / "test" / "crack" / "005.png", _rgb())
    with pytest.raises(DataError) as e:
        ds.test_samples(root)
    _assert_msg(e, root / "test" / "crack" / "005.png", "no mask", "005_mask.png")

    (root / "test" / "crack" / "005.png").unlink()
    _save(root / "ground_truth" / "crack" / "001_mask.png", Image.new("L", (9, 6)))
    with pytest.raises(DataError) as e:
        ds.test_samples(root)
    _assert_msg(e, root / "ground_truth" / "crack" / "001_mask.png", "9x6", "8x6", "same size")

    root2 = _category(tmp_path / "cat2")
    (root2 / "test" / "stain").mkdir()
    with pytest.raises(DataError) as e:
        ds.test_samples(root2)
    _assert_msg(e, root2 / "test" / "stain", "no images")

    root3 = _category(tmp_path / "cat3", defects=())
    with pytest.raises(DataError) as e:
        ds.test_samples(root3)
    _assert_msg(e, root3 / "test", "no defect class")
    for f in (root3 / "test" / "good").iterdir():
        f.rename(root3 / "test" / f.name)
    (root3 / "test" / "good").rename(root3 / "test" / "dent")
    with pytest.raises(DataError) as e:
        ds.test_samples(root3)
    _assert_msg(e, root3 / "test", "no good/")

    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError) as e:
        ds.test_samples(tmp_path / "plain")
    _assert_msg(e, tmp_path / "plain", "no test folder", "ground_truth/<defect>/<stem>_mask.png")


def test_split_train():
    paths = [Path(f"/d/{i:03d}.png") for i in range(30)]
    a = ds.split_train(paths, seed=3)
    b = ds.split_train(list(reversed(paths)), seed=3)
    assert a == b
    assert len(a.heldout) == 5 and len(a.fit) == 25 and a.seed == 3
    assert sorted(a.fit + a.heldout) == paths and a.fit == sorted(a.fit) and a.heldout == sorted(a.heldout)
    assert ds.split_train(paths, seed=4).heldout != a.heldout
    assert len(ds.split_train(paths * 4, val_fraction=0.25).heldout) == 30
    assert len(ds.split_train(paths[:7]).fit) == 2
    with pytest.raises(DataError) as e:
        ds.split_train(paths[:6])
    _assert_msg(e, "/d", "too few training images (6)", "at least 7")


def test_channels_and_min_size(tmp_path):
    grey = [_save(tmp_path / f"g{i}.png", Image.new("L", (40, 30))) for i in range(2)]
    g16 = _save(tmp_path / "g16.png", Image.fromarray(np.zeros((30, 40), np.uint16)))
    colour = _save(tmp_path / "c.png", _rgb(40, 30))
    pal = _save(tmp_path / "p.png", Image.new("L", (40, 30)).convert("P"))
    assert ds.detect_channels(grey + [g16]) == 1
    assert ds.detect_channels(grey + [colour]) == 3
    assert ds.detect_channels([pal]) == 3
    ds.check_min_size(grey + [colour], 30)
    small = _save(tmp_path / "small.png", Image.new("L", (40, 12)))
    with pytest.raises(DataError) as e:
        ds.check_min_size(grey + [small, colour], 16)
    _assert_msg(e, small, "40x12", "16 px", "at least 16 px")
