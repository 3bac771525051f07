"""Fit and held-out images in bounded memory, for ``Detector.fit`` and ``Detector.calibrate``.

:func:`load_fit_images` keeps a small fit set in RAM and streams a large one from a disk cache
(:class:`anomap.data.store.ImageStore`) that the processes of a torchrun job on one machine share;
:class:`anomap.data.tensors.TensorBatches` shows either as float tensors, slice by slice, to a
method's ``calibrate`` (docs/scale.md).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from anomap.data.store import ImageStore, build_store
from anomap.data.transforms import load_stack
from anomap.errors import ConfigError, DataError
from anomap.train.distributed import SINGLE, DistContext, any_rank

# Fit sets that decode to at least this many bytes (x processes on the machine) stream from a disk cache
# instead of RAM; the environment variable overrides it (0: always stream).
STREAM_MIN_BYTES = 32 << 20
STREAM_ENV = "ANOMAP_STREAM_MIN_BYTES"


def _stream_min_bytes() -> int:
    raw = os.environ.get(STREAM_ENV, "")
    try:
        return int(raw) if raw else STREAM_MIN_BYTES
    except ValueError:
        raise ConfigError(f"{STREAM_ENV}={raw!r} is not a number of bytes.", fix="use an integer, e.g. 0") from None


def load_fit_images(fit: list[Path], heldout: list[Path], size: tuple[int, int], channels: int,
                    out: str | Path | None,
                    progress: bool, ctx: DistContext = SINGLE,
                    device: torch.device | None = None) -> tuple[Any, Any, Path | None]:
    """Fit and held-out images: in RAM when small, else rows of one disk cache (streamed).

    ``size`` is the working (height, width). Returns (fit images, held-out images, cache folder or None).
    The cache goes to ``<out>.cache``, where the node's first process builds it while the others wait;
    without ``out`` each process builds its own in a temporary folder.
    """
    decoded = (len(fit) + len(heldout)) * size[0] * size[1] * channels
    if decoded * ctx.local_world_size < _stream_min_bytes():
        return (load_stack(fit, size, channels, progress=progress, desc="loading fit images"),
                load_stack(heldout, size, channels, progress=False), None)
    shared = out is not None
    cache = Path(str(out) + ".cache") if shared else Path(tempfile.mkdtemp(prefix="anomap-cache-"))
    paths = [*fit, *heldout]
    store: ImageStore | None = None
    error: Exception | None = None
    try:
        if ctx.is_local_main or not shared:
            try:
                store = build_store(paths, size, channels, cache, progress=progress,
                                    desc="caching fit images")
            except Exception as e:  # noqa: BLE001 - re-raised below, once every process knows
                error = e
        # a collective: the other processes wait here for the cache (and learn about a failure)
        if any_rank(error is not None, ctx, device or torch.device("cpu")):
            raise error or DataError("building the image cache failed in another process.", path=cache,
                                     fix="see the error of the first process of this machine")
        if store is None:
            store = build_store(paths, size, channels, cache)  # finished by another process: opens it
    except BaseException:
        if not shared:
            shutil.rmtree(cache, ignore_errors=True)
        raise
    return store.rows(0, len(fit)), store.rows(len(fit), len(store)), cache
