"""isstad: ISSTAD of Jin, Guo and Zhu (arXiv 2303.17354), METHODS.md §2.

Stage 1 ("stage1_mae") adapts a ViT masked autoencoder to the normal images. Stage 2 ("stage2_repair")
freezes the encoder, extends the decoder (its first blocks copied from stage 1) and trains it on
synthetically corrupted normal images to output the clean image and, through one head shared by all
decoder blocks, to classify every pixel as corrupted or not. Score: per-pixel anomaly probability
``m`` (mean over the heads) times the reconstruction error ``r``, Gaussian-smoothed (§2.5).

Our choices (METHODS.md §2.7): one normalisation ([-1, 1]) in both stages; the stage-2 target is the
clean image (``recon_target="clean"``; "input" reproduces the published code); tokens keep their order
in stage 2 (``shuffle_tokens_stage2=false``); the generic corruption preset for every category; the
last step of a fixed schedule. Grey images are repeated to three channels inside the method, so the
model (and any MAE checkpoint) is always RGB.

CPU time budget: steps come from the epochs, then, when ``max_train_seconds > 0``, each stage is capped
so that the estimated time (``est_images_per_s``, measured on 2 cores at 128 px) fits 95% of the budget:
each stage may use its share (``stage1_time_share``) and the other stage's unused time.

The hybrid variant (``encoder=efficientnet_lite0``, or ``_lite1`` / ``_lite2``): the encoder is that frozen
pretrained CNN's stride-16 feature map, one token per 16 x 16 patch (:class:`anomap.nn.cnn_tokens.CnnTokens`),
so there is no stage 1 (nothing to adapt, no stage-1 decoder): stage 2 alone, with the whole budget,
trains the decoder from scratch on the CNN's tokens of the corrupted images.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from anomap.data.corruption import PRESETS, corrupt
from anomap.data.tensors import to_tensor
from anomap.methods.base import Method
from anomap.methods.isstad.checkpoint import read_mae_checkpoint
from anomap.methods.isstad.config import STAGE1, STAGE2, IsstadConfig
from anomap.nn.cnn_tokens import CnnTokens
from anomap.nn.filters import gaussian_blur, gaussian_kernel1d, reduce_map
from anomap.nn.vit import MaeDecoder, ViTEncoder, patchify, unpatchify
from anomap.registry import register
from anomap.train.schedule import Stage, cosine_factor, epochs_to_steps, share_budget

log = logging.getLogger(__name__)


def ssim(a: Tensor, b: Tensor, window: int = 11, sigma: float = 1.5, c1: float = 0.01**2,
         c2: float = 0.03**2) -> Tensor:
    """Mean SSIM of (B, C, H, W) tensors with a Gaussian window (zero padding), as in the published code."""
    k1 = gaussian_kernel1d(sigma, device=a.device, dtype=a.dtype)
    r = min((k1.numel() - 1) // 2, window // 2)
    k1 = k1[(k1.numel() - 1) // 2 - r:(k1.numel() - 1) // 2 + r + 1]
    k1 = k1 / k1.sum()
    c = a.shape[1]
    k = (k1[:, None] * k1[None, :]).expand(c, 1, -1, -1).contiguous()

    def blur(x: Tensor) -> Tensor:
        return F.conv2d(x, k, padding=r, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return (num / den).mean()


def random_resized_crop(img: np.ndarray, size: int, scale: tuple[float, float], rng: np.random.Generator,
                        flip: bool = True) -> np.ndarray:
    """RandomResizedCrop (ratio 3/4..4/3, bicubic) and a random horizontal flip of uint8 (H, W, C)."""
    h, w, c = img.shape
    box = (0, 0, w, h)
    for _ in range(10):
        area = h * w * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            box = (left, top, left + cw, top + ch)
            break
    pil = Image.fromarray(img[..., 0] if c == 1 else img)
    out = np.asarray(pil.resize((size, size), Image.Resampling.BICUBIC, box=box)).reshape(size, size, c)
    return out[:, ::-1] if flip and rng.random() < 0.5 else out


def _param_groups(params: list[tuple[str, nn.Parameter]], wd: float) -> list[dict]:
    """AdamW groups: weight decay on matrices only, none on biases, norms and tokens."""
    decay = [p for n, p in params if p.ndim >= 2 and "token" not in n]
    rest = [p for n, p in params if not (p.ndim >= 2 and "token" not in n)]
    return [{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}]


@register("isstad")
class Isstad(Method):
    """Two-stage ViT: MAE adaptation, then corruption repair with per-pixel classification."""

    Config = IsstadConfig
    config: IsstadConfig
    stage2_initialised: Tensor  # registered buffer (1,) uint8: decoder2 was copied from decoder1
    ce_weight: Tensor  # registered buffer (2,): the cross-entropy class weights

    def __init__(self, config: IsstadConfig, channels: int):
        super().__init__(config, channels)
        cfg = config
        p, grid = cfg.patch_size, cfg.image_size // cfg.patch_size
        self.encoder: ViTEncoder | CnnTokens
        self.decoder1: MaeDecoder | None = None  # the MAE's decoder (stage 1); the hybrid has no stage 1
        if cfg.encoder != "vit":
            self.encoder = CnnTokens(cfg.encoder, cfg.image_size)
            enc_dim = self.encoder.dim
        else:
            self.encoder = ViTEncoder(cfg.image_size, p, 3, cfg.enc_dim, cfg.enc_depth, cfg.enc_heads)
            enc_dim = cfg.enc_dim
            self.decoder1 = MaeDecoder(grid, p, 3, enc_dim, cfg.dec_dim, cfg.dec_depth_stage1, cfg.dec_heads)
        self.decoder2 = MaeDecoder(grid, p, 3, enc_dim, cfg.dec_dim, cfg.dec_depth_stage2, cfg.dec_heads)
        self.mask_pred = nn.Linear(cfg.dec_dim, p * p * 2)
        nn.init.xavier_uniform_(self.mask_pred.weight)
        nn.init.zeros_(self.mask_pred.bias)
        # 1 once stage 2's decoder was initialised from stage 1 (saved, so resuming never copies twice)
        self.register_buffer("stage2_initialised", torch.zeros(1, dtype=torch.uint8))
        self.register_buffer("ce_weight", torch.tensor(cfg.ce_class_weights, dtype=torch.float32),
                             persistent=False)
        self.corruption = dataclasses.replace(
            PRESETS["isstad"], n_shapes=(1, cfg.max_shapes), area_limitation=cfg.area_limitation,
            remove_dark=cfg.remove_dark,
        )
        self._warned = False

    # --- schedule ---------------------------------------------------------------------------------
    def plan_steps(self, n_fit: int) -> tuple[int, int]:
        """Steps of both stages: from the epochs, capped by the time budget and by ``max_steps`` (the hybrid:
        0 and stage 2 alone in the whole budget)."""
        cfg = self.config
        if cfg.encoder != "vit":  # one stage: the Method's own one-stage planning
            s2 = self.schedule_steps(cfg.stage2_epochs, n_fit, cfg.stage2_batch_size)
            return 0, self.budget_steps(s2, cfg.stage2_batch_size, cfg.est_images_per_s[1])
        steps = [epochs_to_steps(cfg.stage1_epochs, n_fit, cfg.stage1_batch_size),
                 epochs_to_steps(cfg.stage2_epochs, n_fit, cfg.stage2_batch_size)]
        steps = share_budget(steps, [cfg.stage1_batch_size, cfg.stage2_batch_size], cfg.est_images_per_s,
                             cfg.stage1_time_share, cfg.max_train_seconds)
        if cfg.max_steps > 0:  # the loop's max_steps counts both stages together: split it
            first = max(1, (cfg.max_steps + 1) // 2)
            steps = [min(steps[0], first), min(steps[1], max(1, cfg.max_steps - first))]
        return steps[0], steps[1]

    def stages(self, n_fit: int) -> list[Stage]:
        cfg = self.config
        s1, s2 = self.plan_steps(n_fit)
        warm1 = min(s1 // 2, epochs_to_steps(cfg.stage1_warmup_epochs, n_fit, cfg.stage1_batch_size))
        per_epoch2 = max(1, n_fit // cfg.stage2_batch_size)
        final2 = cfg.stage2_min_lr / cfg.stage2_lr

        def lr2(step: int) -> float:  # CosineAnnealingLR stepped per epoch (periodic past t_max)
            t = (step // per_epoch2) / cfg.stage2_t_max
            return final2 + (1.0 - final2) * 0.5 * (1.0 + math.cos(math.pi * t))

        stage1 = [Stage(STAGE1, s1, cfg.stage1_batch_size, lambda: self._optimizer(STAGE1),
                        cosine_factor(s1, warm1))] if s1 else []  # the hybrid: none
        return stage1 + [
            Stage(STAGE2, s2, cfg.stage2_batch_size, lambda: self._optimizer(STAGE2),
                  lr2 if cfg.stage2_t_max > 0 else cosine_factor(s2, 0, final2)),
        ]

    def _trainable(self, stage: str) -> list[tuple[str, nn.Parameter]]:
        names: tuple[str, ...]
        if stage == STAGE1:
            names = ("encoder.", "decoder1.")
        else:
            names = ("decoder2.", "mask_pred.") + (() if self.config.freeze_encoder_stage2 else ("encoder.",))
        return [(n, p) for n, p in self.named_parameters() if n.startswith(names) and ".teacher." not in n]

    def _optimizer(self, stage: str) -> torch.optim.Optimizer:
        cfg = self.config
        lr = cfg.stage1_lr if stage == STAGE1 else cfg.stage2_lr
        groups = _param_groups(self._trainable(stage), cfg.weight_decay)
        return torch.optim.AdamW(groups, lr=lr, betas=(cfg.betas[0], cfg.betas[1]))

    def set_stage(self, name: str) -> None:
        """Freeze what the stage does not train; entering stage 2 the first time, copy stage 1's decoder."""
        if name not in (STAGE1, STAGE2):
            raise ValueError(f"isstad has no stage {name!r}")
        if name == STAGE1 and self.decoder1 is None:
            raise ValueError(f"isstad with encoder={self.config.encoder} has no stage {name!r}")
        super().set_stage(name)
        if name == STAGE2 and not bool(self.stage2_initialised.item()):
            self.init_stage2_decoder()
        train = {n for n, _ in self._trainable(name)}
        for n, p in self.named_parameters():
            p.requires_grad_(n in train)

    @torch.no_grad()
    def init_stage2_decoder(self) -> None:
        """decoder2 <- decoder1: embedding, mask token, positions, norm, pixel head and the first blocks (the
        hybrid, without decoder1: decoder2 starts from its own initialisation)."""
        d1, d2 = self.decoder1, self.decoder2
        if d1 is None:
            self.stage2_initialised.fill_(1)
            return
        for part in ("embed", "norm", "pred"):
            getattr(d2, part).load_state_dict(getattr(d1, part).state_dict())
        d2.mask_token.copy_(d1.mask_token)
        d2.pos_embed.copy_(d1.pos_embed)  # a user's MAE checkpoint may bring its own
        for i, blk in enumerate(d1.blocks):
            d2.blocks[i].load_state_dict(blk.state_dict())
        self.stage2_initialised.fill_(1)

    # --- data -------------------------------------------------------------------------------------
    def prepare_fit(self, fit_images: np.ndarray) -> None:
        """Load the hybrid's pretrained CNN, or the user's MAE checkpoint (if configured), before training."""
        if isinstance(self.encoder, CnnTokens):
            self.encoder.teacher.load_pretrained()
        elif self.config.mae_checkpoint_path:
            load_mae_checkpoint(self, self.config.mae_checkpoint_path)

    def _norm(self, images: np.ndarray) -> Tensor:
        """uint8 (B, H, W, C) -> float (B, 3, H, W) in [-1, 1]."""
        x = to_tensor(images, "cpu")
        return (x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x).mul(2.0).sub(1.0).contiguous()

    def make_batch(self, images: np.ndarray, rng: np.random.Generator, pool: np.ndarray) -> dict[str, Tensor]:
        """Stage 1: RandomResizedCrop + flip. Otherwise (stage 2): corrupt images with ``corrupt_prob``."""
        cfg = self.config
        if self.stage == STAGE1:
            scale = (cfg.rrc_scale[0], cfg.rrc_scale[1])
            crops = np.stack([random_resized_crop(im, cfg.image_size, scale, rng) for im in images])
            return {"x": self._norm(crops)}
        corrupted = images.copy()
        masks = np.zeros(images.shape[:3], np.float32)
        for i, im in enumerate(images):
            if rng.random() < cfg.corrupt_prob:
                corrupted[i], masks[i] = corrupt(im, rng, self.corruption, pool)
        return {"input": self._norm(corrupted), "clean": self._norm(images), "mask": torch.from_numpy(masks)}

    # --- training ---------------------------------------------------------------------------------
    def _forward2(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Stage-2 model: reconstruction (B, 3, H, W) and K logit maps (B, 2, H, W)."""
        cfg = self.config
        shuffle = cfg.shuffle_tokens_stage2
        frozen = cfg.freeze_encoder_stage2 or not self.training
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            latent, _, ids_restore = self.encoder(x, 0.0, shuffle=shuffle)
        pred, hidden = self.decoder2(latent, None if shuffle else ids_restore)
        p = cfg.patch_size
        return unpatchify(pred, p, 3), [unpatchify(self.mask_pred(h), p, 2) for h in hidden]

    def training_step(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        cfg = self.config
        if "mask" not in batch:  # stage 1: MSE on the masked patches
            assert self.decoder1 is not None
            x = batch["x"]
            latent, mask, ids_restore = self.encoder(x, cfg.mask_ratio)
            pred, _ = self.decoder1(latent, ids_restore)
            err = (pred - patchify(x, cfg.patch_size)).pow(2).mean(dim=-1)
            loss = (err * mask).sum() / mask.sum()
            return {"loss": loss}
        x_in, mask = batch["input"], batch["mask"].long()
        target = batch["clean"] if cfg.recon_target == "clean" else x_in
        recon, logits = self._forward2(x_in)
        ce = torch.stack([F.cross_entropy(z, mask, weight=self.ce_weight) for z in logits]).mean()
        mse = (recon - target).pow(2).mean()
        ssim_loss = 1.0 - ssim(recon, target)
        loss = ce + cfg.w_mse * mse + cfg.w_ssim * ssim_loss
        return {"loss": loss, "ce": ce.detach(), "mse": mse.detach(), "ssim_loss": ssim_loss.detach()}

    # --- scoring ----------------------------------------------------------------------------------
    @torch.no_grad()
    def components(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Anomaly probability m and squared error r, both (B, H, W), for images (B, C, H, W) in [0, 1].

        With ``score_model="stage1"`` (or when stage 2 never ran) m is 1 and r comes from the MAE decoder; the
        hybrid, which has none, always scores with stage 2's.
        """
        x = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        x = x * 2.0 - 1.0
        stage1 = self.decoder1 is not None and (self.config.score_model == "stage1"
                                                or not bool(self.stage2_initialised.item()))  # never the hybrid
        if stage1:
            if self.config.score_model == "stage2" and not self._warned:
                log.warning("isstad: stage 2 was never trained; scoring with stage 1's reconstruction error")
                self._warned = True
            assert self.decoder1 is not None
            latent, _, ids = self.encoder(x, 0.0, shuffle=False)  # no masking, no randomness
            recon = unpatchify(self.decoder1(latent, ids)[0], self.config.patch_size, 3)
            m = torch.ones_like(x[:, 0])
        else:
            recon, logits = self._forward2(x)
            # softmax over two classes, class 1: sigmoid(z1 - z0), the same value without a full softmax
            m = torch.stack([torch.sigmoid(z[:, 1] - z[:, 0]) for z in logits]).mean(dim=0)
        return m, (recon - x).pow(2).mean(dim=1)

    @torch.no_grad()
    def predict(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Image score mean(G(G(m) * G(r))) (or its max, ``image_score``) and the map chosen by
        ``pixel_map`` (§2.5)."""
        cfg = self.config
        sigma = cfg.smoothing_sigma
        m, r = self.components(images)
        if cfg.pixel_map in ("prob", "recon"):  # ablations: one component alone, score from its map
            amap = gaussian_blur(m if cfg.pixel_map == "prob" else r, sigma)
            return reduce_map(amap, cfg.image_score), amap
        product = gaussian_blur(gaussian_blur(m, sigma) * gaussian_blur(r, sigma), sigma)
        score = reduce_map(product, cfg.image_score)
        if cfg.pixel_map == "product":
            return score, product
        lo = r.flatten(1).min(dim=1).values[:, None, None]
        hi = r.flatten(1).max(dim=1).values[:, None, None]
        amap = gaussian_blur(m * (r - lo) / (hi - lo).clamp_min(1e-12), sigma)
        return score, amap


def load_mae_checkpoint(model: Isstad, path: str | Path) -> None:
    """Load a MAE (encoder + decoder) or ViT (encoder only) state_dict into the stage-1 model.

    Every encoder tensor must be in the file with our shape; when the file has decoder tensors, every
    stage-1 decoder tensor must be too (:func:`~anomap.methods.isstad.checkpoint.read_mae_checkpoint`).

    Raises:
        CheckpointError: naming the offending keys and shapes; the model is then unchanged.
    """
    ours = model.state_dict()
    mapped = read_mae_checkpoint(path, ours, model.config)
    with torch.no_grad():
        for k, v in mapped.items():
            ours[k].copy_(v.to(ours[k].dtype))
    log.info("isstad: loaded %d tensors from %s", len(mapped), path)
