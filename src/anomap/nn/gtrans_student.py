"""GTrans's student ("Trans"): a CNN stem plus a Transformer over tokens of several resolutions.

METHODS.md §4.2. The stem is Conv-BN-ReLU 3x3 stages ``32 s2 -> 64 s2 -> 96 s2 -> 128 s2 -> 192 s2``
(strides 2 .. 32), with one extra stride-1 convolution in every stage from the first tapped one on;
the stages at the teacher's strides are tapped (8/16/32 for EfficientNet, 4/8/16 for ResNets).

- *Feature heads*: 1x1 conv per tapped stage -> the teacher's channels (a direct CNN regression).
- *Token mixer*: 1x1 conv per tapped stage -> ``dim``; the finest grid is average-pooled 2x (so at
  224 px with EfficientNet the grids are 14x14, 14x14, 7x7 = 441 tokens) or, with ``fine_tokens="shuffle"``,
  folded 2x by space-to-depth (each token gets its 2x2 cells' features side by side, 1x1 conv 4F -> ``dim``,
  the same token count); all tokens are concatenated,
  each gets a fixed 2-D sin-cos embedding of its cell centre in units of the finest token grid (so the
  grids are aligned in the image) plus a learned embedding of its scale; a pre-norm Transformer
  (:class:`anomap.nn.vit.Block`) relates them across resolutions.
- *Token heads*: tokens split back per scale (the pooled grid upsampled 2x, bilinear), 1x1 conv
  ``dim`` -> the teacher's channels; with ``fine_tokens="shuffle"`` the finest grid's head predicts its
  2x2 cells instead (1x1 conv ``dim`` -> 4C, depth-to-space), so that scale keeps the teacher's resolution.

Pure module: ``forward(x)`` only; losses and scoring live in ``anomap.methods.gtrans``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anomap.nn.vit import LN_EPS, Block, init_weights, sincos_1d

STEM = ((32, 2), (64, 4), (96, 8), (128, 16), (192, 32))  # (channels, stride) of the stem stages
FINE_TOKENS = ("pool", "shuffle")


def conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    """3x3 convolution (padding 1, no bias), BatchNorm, ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def grid_embedding(dim: int, h: int, w: int, ref_h: int, ref_w: int, device: torch.device | str) -> Tensor:
    """(h*w, dim) sin-cos embedding of the cell centres of an h x w grid, in cells of a ref_h x ref_w grid.

    Same layout as :func:`anomap.nn.vit.sincos_2d` (x half, then y half); on the reference grid the
    positions are the integers 0 .. ref-1, a grid half as fine has positions 0.5, 2.5, ...
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding dimension must be a multiple of 4, got {dim}")
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) * (ref_h / h) - 0.5
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) * (ref_w / w) - 0.5
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, xx.flatten()), sincos_1d(dim // 2, yy.flatten())], dim=1)
    return emb.to(device=device, dtype=torch.float32)


class Student(nn.Module):
    """Multi-resolution CNN + Transformer student.

    Args:
        out_channels: teacher channels of each used scale (finest first).
        strides: teacher strides of each used scale, from {2, 4, 8, 16, 32}, increasing.
        dim: token width d.
        depth: Transformer blocks L.
        heads: attention heads h.
        pool_first: halve the first used scale's token grid (the finest teacher scale; METHODS §4.2).
        in_channels: image channels (the method feeds RGB).
        fine_tokens: how the first grid is halved: "pool" (2x average pooling in, bilinear upsampling out,
            METHODS §4.2) or "shuffle" (space-to-depth in, depth-to-space out).
    """

    def __init__(self, out_channels: tuple[int, ...], strides: tuple[int, ...], dim: int = 192, depth: int = 4,
                 heads: int = 3, pool_first: bool = True, in_channels: int = 3, fine_tokens: str = "pool"):
        super().__init__()
        if fine_tokens not in FINE_TOKENS:
            raise ValueError(f"fine_tokens={fine_tokens!r} is not one of {FINE_TOKENS}")
        stem_strides = [s for _, s in STEM]
        if len(out_channels) != len(strides) or not strides or any(s not in stem_strides for s in strides):
            raise ValueError(f"strides {strides} must be 1-3 values from {stem_strides}, one per out channel")
        if list(strides) != sorted(set(strides)):
            raise ValueError(f"strides {strides} must increase")
        self.dim = dim
        self.pool_first = pool_first
        self.shuffle_first = pool_first and fine_tokens == "shuffle"
        stages, cin = [], in_channels
        for ch, s in STEM:
            if s > strides[-1]:
                break
            mods = [conv_bn_relu(cin, ch, 2)]
            if s >= strides[0]:
                mods.append(conv_bn_relu(ch, ch, 1))
            stages.append(nn.Sequential(*mods))
            cin = ch
        self.stem = nn.ModuleList(stages)
        self.tap_index = [stem_strides.index(s) for s in strides]
        feat_ch = [STEM[i][0] for i in self.tap_index]
        self.feat_heads = nn.ModuleList(nn.Conv2d(c, o, 1) for c, o in zip(feat_ch, out_channels, strict=True))
        fold = [4 if s == 0 and self.shuffle_first else 1 for s in range(len(strides))]  # 2x2 cells per token
        self.mixers = nn.ModuleList(nn.Conv2d(c * k, dim, 1) for c, k in zip(feat_ch, fold, strict=True))
        self.scale_embed = nn.Parameter(torch.zeros(len(strides), dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.tok_heads = nn.ModuleList(nn.Conv2d(dim, o * k, 1) for o, k in zip(out_channels, fold, strict=True))
        self.apply(init_weights)
        nn.init.trunc_normal_(self.scale_embed, std=0.02)

    def forward(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Normalised images (B, 3, H, W) -> (feature-head maps, token-head maps), one (B, C_s, h_s, w_s) per scale."""
        maps, h = [], x
        for stage in self.stem:
            h = stage(h)
            maps.append(h)
        feats = [maps[i] for i in self.tap_index]
        feat_preds = [head(f) for head, f in zip(self.feat_heads, feats, strict=True)]

        tokens, grids = [], []
        for s, (mix, f) in enumerate(zip(self.mixers, feats, strict=True)):
            if s == 0 and self.shuffle_first:
                t = mix(F.pixel_unshuffle(f, 2))
            elif s == 0 and self.pool_first:
                t = F.avg_pool2d(mix(f), 2, ceil_mode=True)
            else:
                t = mix(f)
            grids.append((t.shape[-2], t.shape[-1]))
            tokens.append(t.flatten(2).transpose(1, 2))
        ref_h, ref_w = max(g[0] for g in grids), max(g[1] for g in grids)
        pos = torch.cat([grid_embedding(self.dim, gh, gw, ref_h, ref_w, x.device) + self.scale_embed[s]
                         for s, (gh, gw) in enumerate(grids)], dim=0)
        z = torch.cat(tokens, dim=1) + pos.unsqueeze(0)
        for block in self.blocks:
            z = block(z)
        z = self.norm(z)

        tok_preds, start = [], 0
        for s, (gh, gw) in enumerate(grids):
            t = z[:, start:start + gh * gw].transpose(1, 2).reshape(z.shape[0], self.dim, gh, gw)
            start += gh * gw
            if s == 0 and self.shuffle_first:
                tok_preds.append(F.pixel_shuffle(self.tok_heads[s](t), 2))
                continue
            if s == 0 and self.pool_first:
                t = F.interpolate(t, size=feats[0].shape[-2:], mode="bilinear", align_corners=False)
            tok_preds.append(self.tok_heads[s](t))
        return feat_preds, tok_preds
