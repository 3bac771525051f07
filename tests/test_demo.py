"""Tests of the embedded demo category."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomap.data.demo import DEFECT_TYPES, MARKER, build_demo
from anomap.errors import DataError

SMALL = {"size": 96, "n_train": 4, "n_test_good": 2, "n_per_defect": 2}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_build_is_deterministic_and_fast(tmp_path):
    t0 = time.perf_counter()
    a = build_demo(tmp_path / "a", seed=3, **SMALL)
    elapsed = time.perf_counter() - t0
    b = build_demo(tmp_path / "b", seed=3, **SMALL)
    c = build_demo(tmp_path / "c", seed=4, **SMALL)
    assert a == tmp_path / "a"
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert fa == fb
    assert fa.keys() == fc.keys() and fa != fc
    assert elapsed < 10.0


def test_layout_counts_and_masks(tmp_path):
    root = build_demo(tmp_path / "demo", **SMALL)
    size = SMALL["size"]
    train = sorted((root / "train" / "good").glob("*.png"))
    assert [p.name for p in train] == [f"{i:03d}.png" for i in range(SMALL["n_train"])]
    assert len(list((root / "test" / "good").glob("*.png"))) == SMALL["n_test_good"]
    assert not (root / "ground_truth" / "good").exists()
    for p in train:
        im = Image.open(p)
        assert im.mode == "RGB" and im.size == (size, size)
    for defect in DEFECT_TYPES:
        images = sorted((root / "test" / defect).glob("*.png"))
        assert len(images) == SMALL["n_per_defect"]
        for p in images:
            mask_path = root / "ground_truth" / defect / f"{p.stem}_mask.png"
            mask = Image.open(mask_path)
            assert mask.mode == "L" and mask.size == Image.open(p).size
            m = np.asarray(mask)
            assert set(np.unique(m)) <= {0, 255}
            assert 0.003 <= (m > 0).mean() <= 0.05, (defect, p.name, (m > 0).mean())


def test_defects_differ_from_good_parts_inside_the_mask(tmp_path):
    root = build_demo(tmp_path / "demo", **SMALL)
    good = np.stack([np.asarray(Image.open(p), dtype=float) for p in (root / "train" / "good").glob("*.png")])
    mean_good = good.mean(axis=0)
    for defect in DEFECT_TYPES:
        for p in (root / "test" / defect).glob("*.png"):
            img = np.asarray(Image.open(p), dtype=float)
            m = np.asarray(Image.open(root / "ground_truth" / defect / f"{p.stem}_mask.png")) > 0
            dev = np.abs(img - mean_good).mean(axis=2)
            assert dev[m].mean() > dev[~m].mean() + 10, (defect, p.name)


def test_second_call_does_not_rebuild_and_other_params_do(tmp_path):
    root = build_demo(tmp_path / "demo", **SMALL)
    first = root / "train" / "good" / "000.png"
    stamp = first.stat().st_mtime_ns
    time.sleep(0.01)
    build_demo(root, **SMALL)
    assert first.stat().st_mtime_ns == stamp
    build_demo(root, **{**SMALL, "n_train": 2})
    assert len(list((root / "train" / "good").glob("*.png"))) == 2
    assert (root / MARKER).is_file()


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError):
        build_demo(tmp_path / "mine", **SMALL)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (build_demo(empty, **SMALL) / MARKER).is_file()
    with pytest.raises(DataError):
        build_demo(tmp_path / "x", size=16)
