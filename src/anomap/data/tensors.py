"""uint8 images as the float tensors methods compute on.

:func:`to_tensor` converts a batch at once; :class:`TensorBatches` shows a whole image set (an array or
an :class:`anomap.data.store.ImageStore`) as float tensors converted slice by slice, which is what
``Method.calibrate`` receives (an :class:`anomap.types.TensorLike`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from anomap.data.store import ImageStore


def to_tensor(images: np.ndarray, device: torch.device | str) -> Tensor:
    """uint8 (B, H, W, C) -> float32 (B, C, H, W) in [0, 1] on ``device``."""
    arr = np.ascontiguousarray(images)
    if not arr.flags.writeable:
        arr = arr.copy()
    t = torch.from_numpy(arr).to(device)
    return t.permute(0, 3, 1, 2).float().div_(255.0)


class TensorBatches:
    """uint8 images (N, S, S, C) seen as float tensors (N, C, S, S) in [0, 1], converted slice by slice.

    ``len(x)``, ``x.shape`` and ``x[i:j]`` (a tensor on the device) work without holding all images as
    floats; ``x.to(device)`` converts all of them at once.
    """

    def __init__(self, images: np.ndarray | ImageStore, device: torch.device):
        self.images = images
        self.device = device

    def __len__(self) -> int:
        return len(self.images)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        n, h, w, c = self.images.shape
        return (n, c, h, w)

    def __getitem__(self, key: Any) -> Tensor:
        rows = self.images[key]
        return to_tensor(rows if rows.ndim == 4 else rows[None], self.device)

    def to(self, device: torch.device | str) -> Tensor:
        return to_tensor(self.images[:], device)
