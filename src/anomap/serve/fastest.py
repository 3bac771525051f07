"""The fastest backend a model file has, for ``anomap serve`` (``--backend auto``, the default).

On a CPU, onnxruntime scores anomap's models 1.3-1.65x faster than eager PyTorch (docs/benchmarks.md),
except a model with a kNN memory on a CPU that multiplies bfloat16 natively: PyTorch's bfloat16 search
(``anomap.nn.memory.nearest_distance``) made eager PyTorch 1.03-1.21x faster than onnxruntime's float32
product for ``gtrans_memory`` (docs/experiments/2026-12-faster-memory.md), so PyTorch serves those. Any
other ``.safetensors`` model is exported to ONNX at start-up (and again on every reload) into a private
temporary folder, its parity with PyTorch is checked as ``anomap export`` checks it (on the held-out
normal images when the training folder is still there, else on generated images), and onnxruntime
serves it. When onnxruntime is not installed, the model is on a GPU, ``--compile`` was asked for, or the
export or its parity check fails, PyTorch serves the model and one line says why. ``/healthz`` names what
serves (``backend``). An ``.onnx`` file is served by onnxruntime as it is.
"""

from __future__ import annotations

import atexit
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from anomap.detector import Detector
from anomap.errors import AnomapError
from anomap.export.onnx import export_onnx, heldout_images
from anomap.nn.memory import uses_bf16_search
from anomap.runtime.backend import Backend, OnnxBackend, load_backend

log = logging.getLogger("anomap.serve")
PARITY_IMAGES = 4
_WORK: list[Path] = []  # this process's export folder, made once


def _work_dir() -> Path:
    if not _WORK:
        d = Path(tempfile.mkdtemp(prefix="anomap-serve-"))
        atexit.register(shutil.rmtree, d, True)
        _WORK.append(d)
    return _WORK[0]


def _generated_images(det: Detector, folder: Path) -> list[Path]:
    """A few smooth random images at the working shape, for a parity check without real images."""
    rng = np.random.default_rng(0)
    h, w = det.config.work_hw
    out = []
    for k in range(PARITY_IMAGES):
        base = rng.integers(40, 215, (h // 8 + 1, w // 8 + 1, 3)).astype(np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC)
        path = folder / f"parity-{k}.png"
        img.save(path)
        out.append(path)
    return out


def open_fastest(model: str | Path, backend: str | None, *, device: str | None, threads: int,
                 batch_size: int, compile: bool) -> Backend:
    """``load_backend`` with ``backend=None`` turned into "onnx via a start-up export" where that works."""
    path = Path(model)
    onnx_file = path.suffix.lower() == ".onnx"
    if backend is not None or onnx_file or compile or device not in (None, "cpu"):
        return load_backend(path, backend, device=device, threads=threads, batch_size=batch_size, compile=compile)

    def torch_backend() -> Backend:
        return load_backend(path, "torch", device=device, threads=threads, batch_size=batch_size)

    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        log.warning("serving with PyTorch eager: onnxruntime is not installed (pip install 'anomap[deploy]' "
                    "serves faster)")
        return torch_backend()
    det = Detector.load(path, device="cpu")
    if uses_bf16_search(det.require_model()):
        log.info("serving with PyTorch eager: its bfloat16 kNN search is faster on this CPU than onnxruntime")
        return torch_backend()
    folder = Path(tempfile.mkdtemp(prefix="export-", dir=_work_dir()))
    try:
        images = heldout_images(det) or _generated_images(det, folder)
        export_onnx(det, folder / "model.onnx", parity_images=images, threads=threads)
        be = OnnxBackend(folder / "model.onnx", threads=threads, batch_size=batch_size)
    except (AnomapError, OSError) as e:
        log.warning("serving with PyTorch eager: the ONNX export at start-up failed (%s)", str(e).splitlines()[0])
        shutil.rmtree(folder, ignore_errors=True)
        return torch_backend()
    for old in _work_dir().iterdir():  # earlier exports (reloads): their sessions are already in memory
        if old != folder:
            shutil.rmtree(old, ignore_errors=True)
    be.source = path
    return be
