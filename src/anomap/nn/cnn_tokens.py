"""A frozen pretrained CNN as a ViT-style token encoder (isstad's hybrid variant, ``encoder=efficientnet_lite0``).

The EfficientNet-Lite teacher's stride-16 feature map of an image is its grid of tokens, one per 16 x 16
patch, as a ViT with patch 16 would have them; each token is layer-normalised (no learned scale), and a
constant zero CLS token comes first. Nothing here is trained: the decoder that reads the tokens learns
their projection (its ``embed``). The interface is :class:`anomap.nn.vit.ViTEncoder`'s, masking included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anomap.nn.efficientnet import Teacher
from anomap.nn.vit import random_masking

STRIDE = 16  # the tap read: the teacher's second (stride 16)


class CnnTokens(nn.Module):
    """Tokens (B, 1 + L, dim) of images in [-1, 1] from a frozen pretrained EfficientNet-Lite.

    Args:
        arch: an EfficientNet-Lite teacher (``efficientnet_lite0`` / ``_lite1`` / ``_lite2``).
        image_size: the working size (a multiple of 16): ``(image_size / 16) ** 2`` tokens.

    ``dim`` is the tap's channel count (112 for Lite0). The weights are random until
    ``teacher.load_pretrained()``; they are saved with the model like any buffer of it.
    """

    def __init__(self, arch: str, image_size: int):
        super().__init__()
        self.teacher = Teacher(arch, image_size)
        if self.teacher.strides[1] != STRIDE:
            raise ValueError(f"{arch}: its second tap has stride {self.teacher.strides[1]}, not {STRIDE}")
        self.dim = int(self.teacher.channels[1])
        self.grid = image_size // STRIDE

    def forward(self, x: Tensor, mask_ratio: float = 0.0, shuffle: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """(latent (B, 1 + L_keep, dim), mask (B, L) with 1 = dropped, ids_restore (B, L)), as ViTEncoder."""
        with torch.no_grad():
            feats = self.teacher((x + 1.0) * 0.5, 2)[1]  # the teacher takes [0, 1]
        tokens = F.layer_norm(feats.flatten(2).transpose(1, 2), (self.dim,))
        tokens, mask, ids_restore = random_masking(tokens, mask_ratio, shuffle)
        cls = tokens.new_zeros(tokens.shape[0], 1, self.dim)
        return torch.cat([cls, tokens], dim=1), mask, ids_restore
