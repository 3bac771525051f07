"""isstad configuration (METHODS.md §2.8 and §5)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from anomap.config import MethodConfig
from anomap.errors import ConfigError

STAGE1, STAGE2 = "stage1_mae", "stage2_repair"
PIXEL_MAPS = ("mix_minmax", "product", "prob", "recon")
IMAGE_SCORES = ("mean", "max")
ENCODERS = ("vit", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")

@dataclass
class IsstadConfig(MethodConfig):
    """isstad knobs (METHODS.md §2.8, §5): CPU defaults; ``preset=paper`` = the published ViT-L/16 scale."""

    image_size: int = 128
    # "vit": the published ViT MAE, trained from scratch (stage 1). An EfficientNet-Lite name: the hybrid
    # variant, whose encoder is that frozen pretrained CNN's stride-16 tokens (no stage 1; docs/methods.md)
    encoder: str = "vit"
    smoothing_sigma: float = 1.2  # METHODS.md: 2.3 at 128 px; 1.2 by a held-out rule (docs/methods.md)
    patch_size: int = 16
    enc_dim: int = 192
    enc_depth: int = 6
    enc_heads: int = 3
    dec_dim: int = 128
    dec_heads: int = 4
    dec_depth_stage1: int = 2
    dec_depth_stage2: int = 4
    mask_ratio: float = 0.75
    stage1_epochs: int = 305  # the published schedules; the CPU time budget cuts them for larger categories
    stage1_warmup_epochs: int = 40
    stage1_lr: float = 5e-4
    stage1_batch_size: int = 32
    rrc_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    stage2_epochs: int = 200
    stage2_batch_size: int = 16
    stage2_lr: float = 1e-3
    stage2_min_lr: float = 1e-6
    stage2_t_max: int = 0  # epochs of one cosine half-period; 0 = one cosine over the whole stage
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    freeze_encoder_stage2: bool = True
    shuffle_tokens_stage2: bool = False
    recon_target: str = "clean"
    corrupt_prob: float = 0.667
    max_shapes: int = 3
    area_limitation: bool = True
    remove_dark: bool = False
    ce_class_weights: list[float] = field(default_factory=lambda: [3.0, 1.0])
    w_mse: float = 0.5
    w_ssim: float = 0.1
    pixel_map: str = "mix_minmax"
    image_score: str = "mean"  # reduction of the score map over the image: mean (published) or max
    score_model: str = "stage2"  # "stage1": the MAE's reconstruction error alone (ablation)
    mae_checkpoint_path: str | None = None
    est_images_per_s: list[float] = field(default_factory=lambda: [200.0, 65.0])  # stage 1, 2 (CPU, 128 px)
    stage1_time_share: float = 0.55

    SCORING_KEYS: ClassVar[tuple[str, ...]] = MethodConfig.SCORING_KEYS + (
        "smoothing_sigma", "pixel_map", "score_model", "image_score")
    PRESETS: ClassVar[dict[str, dict]] = {
        "paper": {
            "image_size": 224,
            "smoothing_sigma": 4.0,
            "enc_dim": 1024,
            "enc_depth": 24,
            "enc_heads": 16,
            "dec_dim": 512,
            "dec_heads": 16,
            "dec_depth_stage1": 6,
            "dec_depth_stage2": 12,
            "stage1_lr": 7.8e-5,
            "stage1_batch_size": 20,
            "stage2_t_max": 30,
            "max_train_seconds": 0.0,
        }
    }

    def validate(self) -> None:
        super().validate()
        bad = []
        bad += self._encoder_problems()
        if self.image_size % self.patch_size:
            bad.append(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        if self.enc_dim % self.enc_heads or self.dec_dim % self.dec_heads:
            bad.append("enc_dim/dec_dim must be divisible by enc_heads/dec_heads")
        if self.enc_dim % 4 or self.dec_dim % 4:
            bad.append("enc_dim and dec_dim must be multiples of 4 (2-D sin-cos embeddings)")
        if not 1 <= self.dec_depth_stage1 <= self.dec_depth_stage2:
            bad.append("need 1 <= dec_depth_stage1 <= dec_depth_stage2")
        if not 0.0 < self.mask_ratio < 1.0:
            bad.append(f"mask_ratio={self.mask_ratio} must be in (0, 1)")
        for key, allowed in (("recon_target", ("clean", "input")), ("pixel_map", PIXEL_MAPS),
                             ("image_score", IMAGE_SCORES), ("score_model", ("stage1", "stage2"))):
            if getattr(self, key) not in allowed:
                bad.append(f"{key}={getattr(self, key)!r} must be one of {', '.join(allowed)}")
        if not 0.0 <= self.corrupt_prob <= 1.0 or self.max_shapes < 1:
            bad.append("corrupt_prob must be in [0, 1] and max_shapes >= 1")
        if len(self.rrc_scale) != 2 or not 0.0 < self.rrc_scale[0] <= self.rrc_scale[1] <= 1.0:
            bad.append(f"rrc_scale={self.rrc_scale} must be [lo, hi] in (0, 1]")
        if len(self.betas) != 2 or len(self.ce_class_weights) != 2 or len(self.est_images_per_s) != 2:
            bad.append("betas, ce_class_weights and est_images_per_s need two values each")
        elif min(self.est_images_per_s) <= 0:
            bad.append("est_images_per_s must be positive")
        if min(self.stage1_batch_size, self.stage2_batch_size, self.stage1_epochs, self.stage2_epochs) < 1:
            bad.append("epochs and batch sizes must be >= 1")
        if self.stage1_lr <= 0 or self.stage2_lr <= 0 or not 0.0 < self.stage1_time_share < 1.0:
            bad.append("learning rates must be positive and stage1_time_share in (0, 1)")
        if bad:
            raise ConfigError("isstad: " + "; ".join(bad) + ".")

    def _encoder_problems(self) -> list[str]:
        """What the hybrid encoder (an EfficientNet-Lite name) cannot do, or an unknown ``encoder``."""
        if self.encoder not in ENCODERS:
            return [f"encoder={self.encoder!r} must be one of {', '.join(ENCODERS)}"]
        bad = []
        if self.encoder != "vit" and self.patch_size != 16:
            bad.append(f"encoder={self.encoder} makes one token per 16 x 16 patch: patch_size must be 16")
        if self.encoder != "vit" and (self.mae_checkpoint_path or self.score_model == "stage1"):
            bad.append(f"encoder={self.encoder} has no MAE stage: mae_checkpoint_path and score_model=stage1 "
                       "need encoder=vit")
        return bad
