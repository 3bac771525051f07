"""ssl_ae: self-supervised autoencoder of Bauer, Nakajima and Müller (arXiv 2206.11723).

A dilated-convolution autoencoder learns to map normal images with pasted foreign content back to
the clean image, i.e. to project onto the manifold of normal images. Anomaly map = Gaussian-smoothed
squared reconstruction error averaged over channels; image score = its maximum. See docs/methods.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from anomap.config import MethodConfig, check_image_score
from anomap.data.corruption import PRESETS, corrupt_batch
from anomap.data.tensors import to_tensor
from anomap.errors import ConfigError
from anomap.methods.base import Method
from anomap.nn.conv_ae import DilatedConvAE
from anomap.nn.filters import gaussian_blur, reduce_map
from anomap.registry import register
from anomap.train.schedule import Stage, cosine_factor


@dataclass
class SslAeConfig(MethodConfig):
    """ssl_ae knobs (METHODS.md §3, §5). CPU defaults; ``preset=paper`` switches to the paper's scale."""

    image_size: int = 128
    smoothing_sigma: float = 2.0
    width: int = 32
    dilations: list[int] = field(default_factory=lambda: [2, 4, 8, 16])
    full_middle: bool = False
    n_shapes: list[int] = field(default_factory=lambda: [1, 4])
    shape_area: list[float] = field(default_factory=lambda: [0.01, 0.15])
    fill_probs: dict = field(default_factory=lambda: {"other": 0.4, "self": 0.2, "noise": 0.2, "const": 0.2})
    alpha_range: list[float] = field(default_factory=lambda: [0.5, 1.0])
    input_noise_std: float = 0.0
    lambda_normal: float = 0.5
    epochs: int = 30
    min_steps: int = 1000  # small categories: train at least this many steps (CPU: ~12 min at 128 px)
    batch_size: int = 16
    lr: float = 1e-3
    image_score: str = "max"
    topk_fraction: float = 0.01

    SCORING_KEYS: ClassVar[tuple[str, ...]] = MethodConfig.SCORING_KEYS + (
        "smoothing_sigma", "image_score", "topk_fraction")
    PRESETS: ClassVar[dict[str, dict]] = {
        "paper": {
            "image_size": 256,
            "smoothing_sigma": 4.0,
            "width": 64,
            "full_middle": True,
            "shape_area": [0.005, 0.15],
            "epochs": 300,
            "min_steps": 0,
            "lr": 2e-4,
            "max_train_seconds": 0.0,
        }
    }

    def validate(self) -> None:
        super().validate()
        check_image_score(self.image_score, self.topk_fraction, ("max", "topk_mean"))
        if not 0.0 <= self.lambda_normal <= 1.0:
            raise ConfigError(f"lambda_normal={self.lambda_normal} must be in [0, 1].")
        if self.width < 8:
            raise ConfigError(f"width={self.width} is too small.", fix="use width >= 8")
        if self.batch_size < 1 or self.epochs < 1 or self.lr <= 0:
            raise ConfigError("batch_size, epochs and lr must be positive.")


@register("ssl_ae")
class SslAe(Method):
    """Structured-noise denoising autoencoder; see module docstring."""

    Config = SslAeConfig
    config: SslAeConfig

    def __init__(self, config: SslAeConfig, channels: int):
        super().__init__(config, channels)
        self.net = DilatedConvAE(channels, config.width, tuple(config.dilations), full=config.full_middle)
        self.corruption = dataclasses.replace(
            PRESETS["ssl_ae"],
            n_shapes=(config.n_shapes[0], config.n_shapes[1]),
            shape_area=(config.shape_area[0], config.shape_area[1]),
            fills=dict(config.fill_probs),
            alpha=(config.alpha_range[0], config.alpha_range[1]),
        )

    def stages(self, n_fit: int) -> list[Stage]:
        cfg = self.config
        steps = self.schedule_steps(cfg.epochs, n_fit, cfg.batch_size, cfg.min_steps)
        return [
            Stage(
                name="ssl_ae",
                steps=steps,
                batch_size=cfg.batch_size,
                make_optimizer=lambda: torch.optim.Adam(self.net.parameters(), lr=cfg.lr, betas=(0.9, 0.999)),
                lr_factor=cosine_factor(steps),
            )
        ]

    def make_batch(self, images: np.ndarray, rng: np.random.Generator, pool: np.ndarray) -> dict[str, Tensor]:
        corrupted, masks = corrupt_batch(images, rng, self.corruption, pool=pool)
        x_in = to_tensor(corrupted, "cpu")
        if self.config.input_noise_std > 0:
            noise = rng.standard_normal(x_in.shape).astype(np.float32) * self.config.input_noise_std
            x_in = (x_in + torch.from_numpy(noise)).clamp_(0, 1)
        return {"input": x_in, "target": to_tensor(images, "cpu"), "mask": torch.from_numpy(masks)}

    def training_step(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        out = self.net(batch["input"])
        err = (out - batch["target"]).pow(2).mean(dim=1)  # (B, H, W)
        m = batch["mask"].to(err.dtype)
        lam = self.config.lambda_normal
        normal = (err * (1 - m)).flatten(1).sum(1) / (1 - m).flatten(1).sum(1).clamp_min(1.0)
        m_sum = m.flatten(1).sum(1)
        anomal = (err * m).flatten(1).sum(1) / m_sum.clamp_min(1.0)
        # images without corruption contribute only the normal term (second term 0 when M = 0)
        per_image = torch.where(m_sum > 0, lam * normal + (1 - lam) * anomal, normal)
        loss = per_image.mean()
        return {"loss": loss, "loss_normal": normal.mean().detach(), "loss_anomal": anomal.mean().detach()}

    @torch.no_grad()
    def predict(self, images: Tensor) -> tuple[Tensor, Tensor]:
        out = self.net(images)
        diff = (images - out).pow(2).mean(dim=1)
        amap = gaussian_blur(diff, self.config.smoothing_sigma)
        return reduce_map(amap, self.config.image_score, self.config.topk_fraction), amap
