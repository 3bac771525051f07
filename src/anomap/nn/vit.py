"""Vision Transformer pieces for masked autoencoding (pure modules, no training logic).

Contents: ``patchify``/``unpatchify``, fixed 2-D sin-cos position embeddings, a pre-norm Transformer
block (qkv bias, LayerNorm eps 1e-6), a ViT encoder with optional random masking (per-sample argsort
of uniform noise) and an MAE-style decoder that also returns every block's hidden tokens.

Parameter names follow the usual ViT/MAE layout (``patch_embed.proj``, ``blocks.N.attn.qkv``, ...) so
that a user's MAE checkpoint can be mapped onto these modules key by key (see ``anomap.methods.isstad``).
Patch vectors are ordered (row in patch, column in patch, channel), as in MAE checkpoints.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LN_EPS = 1e-6


def patchify(images: Tensor, patch: int) -> Tensor:
    """(B, C, H, W) -> (B, L, patch*patch*C), patches in row-major grid order."""
    b, c, h, w = images.shape
    gh, gw = h // patch, w // patch
    x = images.reshape(b, c, gh, patch, gw, patch)
    x = x.permute(0, 2, 4, 3, 5, 1)  # b, gh, gw, p, q, c
    return x.reshape(b, gh * gw, patch * patch * c)


def unpatchify(tokens: Tensor, patch: int, channels: int) -> Tensor:
    """(B, L, patch*patch*C) -> (B, C, H, W) for a square grid of L patches (inverse of ``patchify``)."""
    b, n, _ = tokens.shape
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"unpatchify needs a square number of patches, got {n}")
    x = tokens.reshape(b, g, g, patch, patch, channels)
    x = x.permute(0, 5, 1, 3, 2, 4)  # b, c, gh, p, gw, q
    return x.reshape(b, channels, g * patch, g * patch)


def sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """(N,) positions -> (N, dim) with sin in the first half and cos in the second, frequencies 1/10000^k."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding dimension must be even, got {dim}")
    freq = 1.0 / 10000.0 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = pos.to(torch.float64)[:, None] * freq[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid: int, cls_token: bool = True) -> Tensor:
    """Fixed 2-D position embeddings (1, [1 +] grid*grid, dim): x-coordinate half, then y-coordinate half.

    The CLS token (first row, when requested) gets zeros.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding dimension must be a multiple of 4, got {dim}")
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, xs.flatten()), sincos_1d(dim // 2, ys.flatten())], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float().unsqueeze(0)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (with bias)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """Linear -> GELU -> Linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def init_weights(module: nn.Module) -> None:
    """Xavier-uniform linear weights with zero bias; LayerNorm 1/0 (apply with ``Module.apply``)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens with one strided convolution."""

    def __init__(self, patch: int, channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, L, D)


def random_masking(x: Tensor, ratio: float, shuffle: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Keep a random subset of tokens per sample (argsort of uniform noise).

    Args:
        x: (B, L, D) tokens.
        ratio: share of tokens to drop.
        shuffle: with ``ratio == 0`` and ``shuffle`` False the order is left as it is (no randomness).

    Returns:
        (kept tokens (B, L_keep, D), mask (B, L) with 1 = dropped, ids_restore (B, L)).
    """
    b, n, d = x.shape
    keep = int(n * (1.0 - ratio))
    if ratio == 0 and not shuffle:
        ids = torch.arange(n, device=x.device).expand(b, n)
        return x, torch.zeros(b, n, device=x.device), ids
    noise = torch.rand(b, n, device=x.device)
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    ids_keep = ids_shuffle[:, :keep]
    kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
    mask = torch.ones(b, n, device=x.device)
    mask[:, :keep] = 0
    return kept, torch.gather(mask, 1, ids_restore), ids_restore


class ViTEncoder(nn.Module):
    """ViT encoder with a CLS token, fixed sin-cos positions and optional random masking.

    Args:
        image_size: square input size.
        patch: patch size.
        channels: input channels.
        dim, depth, heads: Transformer width, number of blocks and heads.
        mlp_ratio: MLP hidden size / dim.
    """

    pos_embed: Tensor  # registered buffer (1, 1 + grid**2, dim), CLS position first

    def __init__(self, image_size: int, patch: int, channels: int, dim: int, depth: int, heads: int,
                 mlp_ratio: float = 4.0):
        super().__init__()
        self.patch, self.grid = patch, image_size // patch
        self.patch_embed = PatchEmbed(patch, channels, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_2d(dim, self.grid))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.apply(init_weights)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)

    def forward(self, x: Tensor, mask_ratio: float = 0.0,
                shuffle: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """Encode images (B, C, H, W).

        Returns:
            (latent (B, 1 + L_keep, dim) after the final norm, mask (B, L) with 1 = dropped,
            ids_restore (B, L)); see ``random_masking``.
        """
        tokens = self.patch_embed(x) + self.pos_embed[:, 1:]
        tokens, mask, ids_restore = random_masking(tokens, mask_ratio, shuffle)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        h = torch.cat([cls, tokens], dim=1)
        for blk in self.blocks:
            h = blk(h)
        return self.norm(h), mask, ids_restore


class MaeDecoder(nn.Module):
    """MAE decoder: project, fill dropped positions with a mask token, add positions, blocks, pixels.

    Args:
        grid: patches per side.
        patch: patch size.
        channels: output channels.
        enc_dim: encoder width (input).
        dim, depth, heads: decoder width, blocks, heads.
        mlp_ratio: MLP hidden size / dim.
    """

    pos_embed: Tensor  # registered buffer (1, 1 + grid**2, dim), CLS position first

    def __init__(self, grid: int, patch: int, channels: int, enc_dim: int, dim: int, depth: int, heads: int,
                 mlp_ratio: float = 4.0):
        super().__init__()
        self.embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_2d(dim, grid))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.pred = nn.Linear(dim, patch * patch * channels)
        self.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: Tensor, ids_restore: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        """Decode latent tokens (B, 1 + L_keep, enc_dim) of an encoder.

        Args:
            latent: encoder output, CLS first.
            ids_restore: (B, L) from the encoder's masking; None = the tokens are already in grid
                order (or, to reproduce ISSTAD's stage 2, in a random order that is not undone).

        Returns:
            (pixel predictions (B, L, patch*patch*channels), hidden tokens (B, L, dim) after every block,
            before the final norm, CLS removed).
        """
        x = self.embed(latent)
        cls, tokens = x[:, :1], x[:, 1:]
        if ids_restore is not None:
            b, n = ids_restore.shape
            fill = self.mask_token.expand(b, n - tokens.shape[1], -1)
            tokens = torch.cat([tokens, fill], dim=1)
            tokens = torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        h = torch.cat([cls, tokens], dim=1) + self.pos_embed
        hidden = []
        for blk in self.blocks:
            h = blk(h)
            hidden.append(h[:, 1:])
        return self.pred(self.norm(h))[:, 1:], hidden
