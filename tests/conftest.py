"""Shared fixtures: tiny datasets built on the fly (never the real data)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from anomap.data.images import load_image
from anomap.types import Calibration

TINY = {"image_size": 32, "max_steps": 6, "width": 8, "batch_size": 4, "checkpoint_every": 3,
        "device": "cpu", "min_heldout": 3, "num_threads": 1}


def _normal(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    phase = rng.uniform(0, 0.3)
    base = 120 + 60 * np.sin(xx / 5.0 + phase) * np.cos(yy / 7.0)
    img = base[..., None] + rng.normal(0, 4, (size, size, 3))
    img[..., 1] *= 0.9
    return np.clip(img, 0, 255).astype(np.uint8)


def make_category(root: Path, n_train: int = 12, n_good: int = 4, n_defect: int = 4, size: int = 48,
                  seed: int = 0) -> Path:
    """Write a tiny MVTec-layout category: smooth stripes as normal, bright squares as defects."""
    rng = np.random.default_rng(seed)
    for sub in ("train/good", "test/good", "test/spot", "ground_truth/spot"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        Image.fromarray(_normal(rng, size)).save(root / "train/good" / f"{i:03d}.png")
    for i in range(n_good):
        Image.fromarray(_normal(rng, size)).save(root / "test/good" / f"{i:03d}.png")
    for i in range(n_defect):
        img = _normal(rng, size)
        mask = np.zeros((size, size), np.uint8)
        y, x = rng.integers(4, size - 16, 2)
        img[y:y + 10, x:x + 10] = 255
        mask[y:y + 10, x:x + 10] = 255
        Image.fromarray(img).save(root / "test/spot" / f"{i:03d}.png")
        Image.fromarray(mask).save(root / "ground_truth/spot" / f"{i:03d}_mask.png")
    return root


def defect_masks(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """(n, size, size) bool masks: 1-3 random rectangles in each of the first n // 2 images, none after."""
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n // 2):
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, size - size // 6, 2)
            h, w = rng.integers(2, size // 6, 2)
            masks[i, y:y + h, x:x + w] = True
    return masks


class StandInDetector:
    """What anomap.types.EvaluableDetector lists, on grey 48-px images; a subclass supplies predict_raw."""

    method_name = "stand-in"
    config = SimpleNamespace(image_size=48, eval_size=48, work_hw=(48, 48))
    calibration = Calibration(threshold=0.9, target_fpr=0.05, n_heldout=3)

    def prepare(self, image: Path) -> tuple[np.ndarray, tuple[int, int]]:
        arr = load_image(image, channels=1)
        return arr, arr.shape[:2]


def tiny_ssl_ae_with_onnx(root: Path, **export_kw) -> tuple[Path, Path, Path]:
    """A tiny category under ``root``, a 3-step ssl_ae fitted on it on one thread, saved and exported to
    ONNX: (data, model.safetensors, model.onnx)."""
    from anomap import create
    from anomap.export.onnx import export_onnx

    data = make_category(root / "cat")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        det = create("ssl_ae", **{**TINY, "max_steps": 3}).fit(data, progress=False)
        model = det.save(root / "m.safetensors")
        export_onnx(det, root / "m.onnx", **export_kw)
    finally:
        torch.set_num_threads(before)
    return data, model, root / "m.onnx"


@pytest.fixture(scope="session")
def tiny_category(tmp_path_factory) -> Path:
    return make_category(tmp_path_factory.mktemp("data") / "tiny")


@pytest.fixture
def tiny_cfg() -> dict:
    return dict(TINY)


@pytest.fixture
def one_thread():
    """Tiny models run fastest (and never oversubscribe a busy machine) on one thread; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
