"""gtrans: GTrans (arXiv 2305.14880), a pretrained CNN teacher guiding a multi-resolution Transformer student.

METHODS.md §4. A frozen ImageNet CNN (the paper's AGN; here EfficientNet-Lite0 from the installed
package, or a user's ResNet-18 / Wide-ResNet-50-2 file) gives feature maps at three resolutions,
standardised per channel with the mean/std over the fit images. The student (:mod:`anomap.nn.gtrans_student`)
regresses them twice: directly from its CNN stem (feature heads) and after a Transformer that relates
tokens of all resolutions (token heads). Trained on normal images only, it follows the teacher there
and diverges on anomalies.

Loss (§4.3): ``sum_s w_tok * mean(d(t_s, p_tok_s)) + w_feat * mean(d(t_s, p_feat_s))`` with
``d = mean_c (t - p)^2 + (1 - cos(t, p))`` per location (``distance`` picks one term for ablations;
it applies to the loss and the map alike). By default each ``mean`` is over the hardest 10% of the
batch's locations (``hard_fraction``, EfficientAD's hard-feature loss; 0 gives METHODS.md's plain mean).
Map (§4.4): per scale ``d(t_s, p_tok_s)`` divided by its mean over held-out normals (stored by
``calibrate``), upsampled bilinearly to the input size, averaged over scales, Gaussian-blurred; by
default (``map_heads=fine_feature``) the finest scale, whose tokens are pooled 2x, uses its feature
head's ``d(t_0, p_feat_0)`` at the full stride-8 grid instead;
image score = its maximum (``image_score=topk_mean``: the mean of its top 1%).
One teacher and one student pass per image.

The AGN's memory (``memory``, :mod:`anomap.methods.gtrans.memory`): the teacher also remembers the fit
images' patch features as a greedy coreset, built in ``prepare_fit`` from the teacher features computed
there anyway. Its map (each cell's distance to the nearest remembered patch, divided by its held-out
mean) replaces the student's map (``only``: the student is then not built, trained or run) or is
averaged with it before the blur (``fused``: ``(1 - memory_weight) * student + memory_weight * memory``).
``memory_image_norm`` may give the image score a second map from the same distances, normalised per cell;
``memory_fine_weight`` adds a fine memory's excess to the anomaly map (not to the image score).
``add_normals`` adds patches of new normal images to it without retraining.

The teacher's weights are part of the method's ``state_dict``: a saved detector is self-contained
(no user weight file is needed where it is loaded, and it keeps working if the weight package
changes); the price is ~13 MB per file for Lite0. Pretrained weights are loaded by ``prepare_fit``;
before that the teacher is random (``Detector.load`` restores it from the file).
"""

from __future__ import annotations

import functools
import hashlib
import math
import operator
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from anomap.data.tensors import to_tensor
from anomap.errors import ConfigError
from anomap.methods.base import Method
from anomap.methods.gtrans import cross_fit
from anomap.methods.gtrans.config import GTransConfig
from anomap.methods.gtrans.memory import GTransMemory
from anomap.nn.efficientnet import Teacher
from anomap.nn.filters import gaussian_blur, location_ratio, reduce_map, upsample_blur
from anomap.nn.gtrans_student import Student
from anomap.registry import register
from anomap.train.schedule import Stage, cosine_factor
from anomap.types import TensorLike

LOCATION_PRIOR = 5.0  # map_norm=location: the held-out mean at a location is shrunk toward the scale's mean
# as if that many more images had given exactly the scale's mean there (fixed a priori, not tuned)
QUANTILES = (0.9, 0.995)  # map_norm=quantile: EfficientAD's q_a and q_b of the held-out distances
STAT_BATCH = 16
CACHE_BYTES = 1 << 30  # teacher features of the fit images are kept when they fit in this much memory


@register("gtrans")
class GTrans(Method):
    """Teacher-student feature regression across resolutions; see module docstring."""

    Config = GTransConfig
    config: GTransConfig
    map_mean: Tensor  # registered buffers (the per-scale feat_mean{k}, feat_std{k}, map_loc{h}_{k} are named)
    map_mean_feat: Tensor
    map_quant: Tensor

    def __init__(self, config: GTransConfig, channels: int):
        super().__init__(config, channels)
        self.scales = sorted(config.scales)
        self.teacher = Teacher(config.teacher_arch, config.image_size)
        out_ch = tuple(self.teacher.channels[s] for s in self.scales)
        strides = tuple(self.teacher.strides[s] for s in self.scales)
        self.student: Student | None = None  # memory=only: no student (nothing trained, nothing saved)
        if config.memory != "only":
            self.student = Student(out_ch, strides, config.tr_dim, config.tr_depth, config.tr_heads,
                                   pool_first=self.scales[0] == 0, fine_tokens=config.fine_tokens)
        for i, c in enumerate(out_ch):
            self.register_buffer(f"feat_mean{i}", torch.zeros(1, c, 1, 1))
            self.register_buffer(f"feat_std{i}", torch.ones(1, c, 1, 1))
        self.register_buffer("map_mean", torch.ones(len(self.scales)))
        self.register_buffer("map_mean_feat", torch.ones(len(self.scales)))  # the same for the feature heads
        # map_norm=quantile: held-out QUANTILES per head (0 token, 1 feature) and scale: [..., 0] q_a, [..., 1] q_b
        self.register_buffer("map_quant", torch.tensor([0.0, 1.0]).repeat(2, len(self.scales), 1))
        # map_norm=location: held-out mean per location / the scale's mean, per head (0 token, 1 feature)
        for k, stride in enumerate(strides):
            g = config.image_size // stride
            for h in range(2):
                self.register_buffer(f"map_loc{h}_{k}", torch.ones(g, g))
        # raw teacher features of the fit images (not saved): the teacher is frozen and the fit images
        # are not augmented, so each image's targets never change; keyed by a hash of the image bytes
        self._cache_feats: list[Tensor] = []
        self._cache_index: dict[bytes, int] = {}
        self.memory: GTransMemory | None = None
        if config.memory != "off":
            index = [self.scales.index(s) for s in config.memory_scales_used]
            (h, w), stride = config.work_hw, strides[index[0]]
            grid = (h // stride, w // stride)
            self.memory = GTransMemory(index, [out_ch[k] for k in index], config.memory_pool, grid,
                                       config.memory_pool_pad, config.memory_metric, config.memory_balance,
                                       config.memory_fine_weight > 0)

    # --- training -------------------------------------------------------------------------------
    def stages(self, n_fit: int) -> list[Stage]:
        cfg = self.config
        if cfg.memory == "only":
            return []  # the map is the memory's alone: nothing to train
        student = self.student
        assert student is not None
        steps = self.schedule_steps(cfg.epochs, n_fit, cfg.batch_size)
        steps = self.budget_steps(steps, cfg.batch_size, cfg.est_images_per_s)
        return [
            Stage(
                name="gtrans",
                steps=steps,
                batch_size=cfg.batch_size,
                make_optimizer=lambda: torch.optim.AdamW(student.parameters(), lr=cfg.lr,
                                                         weight_decay=cfg.weight_decay),
                lr_factor=cosine_factor(steps, warmup=round(cfg.warmup_frac * steps), final=cfg.min_lr / cfg.lr),
            )
        ]

    @torch.no_grad()
    def prepare_fit(self, fit_images: np.ndarray) -> None:
        """Load the pretrained teacher, then per-channel mean/std of its features over the fit images, and
        the memory's bank (a coreset of their patch features) when ``memory`` is on.

        The features are also kept (when they fit in ``CACHE_BYTES`` and the student is trained) so that
        training runs the teacher only once per image.
        """
        self.teacher.load_pretrained(self.config.teacher_weights)
        device = self.map_mean.device
        n = len(self.scales)
        s1 = [torch.zeros((), dtype=torch.float64, device=device) for _ in range(n)]
        s2 = [torch.zeros((), dtype=torch.float64, device=device) for _ in range(n)]
        count = [0] * n
        self._cache_feats, self._cache_index = [], {}
        chunks: list[list[Tensor]] = [[] for _ in range(n)]
        rows: list[Tensor] = []  # the memory's patch features, standardised once the statistics are known
        keep = self.config.memory != "only"
        for i in range(0, len(fit_images), STAT_BATCH):
            feats = self._teacher(to_tensor(fit_images[i:i + STAT_BATCH], device))
            if i == 0:
                per_image = sum(f[0].numel() for f in feats) * 4
                keep = keep and per_image * len(fit_images) <= CACHE_BYTES
            if self.memory is not None:
                rows.append(self.memory.rows(feats)[0])
            for k, f in enumerate(feats):
                if keep:
                    chunks[k].append(f)
                f = f.double()
                s1[k] = s1[k] + f.sum(dim=(0, 2, 3))
                s2[k] = s2[k] + f.pow(2).sum(dim=(0, 2, 3))
                count[k] += f.shape[0] * f.shape[2] * f.shape[3]
        for k in range(len(feats)):  # memory=only: the scales the memory reads (the others stay 0 / 1)
            mean = s1[k] / max(count[k], 1)
            std = (s2[k] / max(count[k], 1) - mean.pow(2)).clamp_min(0).sqrt()
            # floor: a channel (almost) constant on normal images must not explode on a test image
            std = std.clamp_min(max(1e-6, 0.01 * float(std.median())))
            getattr(self, f"feat_mean{k}").copy_(mean.view(1, -1, 1, 1))
            getattr(self, f"feat_std{k}").copy_(std.view(1, -1, 1, 1))
        if keep:
            self._cache_feats = [torch.cat(c) for c in chunks]
            self._cache_index = {_image_key(img): j for j, img in enumerate(fit_images)}
        if self.memory is not None:
            cfg = self.config
            self.memory.fit(torch.cat(rows), *self._feat_stats(), cfg.memory_ratio, cfg.memory_max,
                            cfg.memory_fine_max, cfg.seed)

    @torch.no_grad()
    def add_normals(self, images: Tensor) -> None:
        """Add the patch features of normal images (float (B, C, H, W) in [0, 1]) to the memory
        (:meth:`GTransMemory.add`: covered as tightly as the fit images, within ``memory_max`` rows).
        The student is not retrained: with ``memory=fused`` its part of the map does not change."""
        if self.memory is None:
            raise ConfigError("this gtrans model has no memory (memory=off), so it cannot add normal images "
                              "without retraining.", fix="retrain with --set memory=fused (or only), or add the "
                              "images to train/good and retrain")
        if not len(images):
            return
        device = self.map_mean.device
        rows = [self.memory.rows(self._teacher(images[i:i + STAT_BATCH].to(device)))[0]
                for i in range(0, len(images), STAT_BATCH)]
        cfg = self.config
        self.memory.add_rows(torch.cat(rows), *self._feat_stats(), cfg.memory_max, cfg.memory_fine_max, cfg.seed)

    def group_scores(self, fit_images: TensorLike, groups: int, progress: bool = False) -> np.ndarray:
        """``memory=only``: :func:`anomap.methods.gtrans.cross_fit.group_scores` (the base's refusal otherwise)."""
        if self.memory is None or self.config.memory != "only":
            return super().group_scores(fit_images, groups, progress)
        return cross_fit.group_scores(self, fit_images, groups, STAT_BATCH, progress)

    def make_batch(self, images: np.ndarray, rng: np.random.Generator, pool: np.ndarray) -> dict[str, Tensor]:
        batch = {"image": to_tensor(images, "cpu")}
        if self._cache_index:
            idx = [self._cache_index.get(_image_key(img), -1) for img in images]
            if min(idx) >= 0:
                batch["cached"] = torch.tensor(idx, dtype=torch.long)
        return batch

    def training_step(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        raw = None
        if "cached" in batch and self._cache_feats:
            idx = batch["cached"].to(self._cache_feats[0].device)
            raw = [f[idx].to(self.map_mean.device) for f in self._cache_feats]
        targets, feat_preds, tok_preds = self._forward(batch["image"], raw)
        loss_tok = _total(self._loss_term(self.distance(t, p)) for t, p in zip(targets, tok_preds, strict=True))
        loss_feat = _total(self._loss_term(self.distance(t, p)) for t, p in zip(targets, feat_preds, strict=True))
        loss = self.config.w_tok * loss_tok + self.config.w_feat * loss_feat
        return {"loss": loss, "loss_tok": loss_tok.detach(), "loss_feat": loss_feat.detach()}

    def _loss_term(self, d: Tensor) -> Tensor:
        """One scale's loss from its per-location distances (B, h, w): their mean, or with ``hard_fraction``
        the mean of the hardest fraction of them (at least one location)."""
        frac = self.config.hard_fraction
        if not frac or frac >= 1.0:
            return d.mean()
        flat = d.flatten()
        k = max(1, math.ceil(frac * flat.numel()))
        return flat.topk(k, sorted=False).values.mean()

    # --- shared -------------------------------------------------------------------------------
    @torch.no_grad()
    def _teacher(self, x: Tensor) -> list[Tensor]:
        """The teacher's features at ``scales`` (with ``memory=only``: those up to the memory's coarsest)."""
        upto = max(self.config.memory_scales_used) if self.config.memory == "only" else max(self.scales)
        all_feats = self.teacher(x, upto + 1)
        feats = [all_feats[s] for s in self.scales if s <= upto]
        k = self.config.teacher_pool
        if k > 1:
            feats = [F.avg_pool2d(f, k, 1, k // 2, count_include_pad=False) for f in feats]
        return feats

    def _feat_stats(self) -> tuple[list[Tensor], list[Tensor]]:
        """The per-scale ``feat_mean{k}`` and ``feat_std{k}`` buffers."""
        n = len(self.scales)
        return [getattr(self, f"feat_mean{k}") for k in range(n)], [getattr(self, f"feat_std{k}") for k in range(n)]

    def _forward(self, x: Tensor, raw: list[Tensor] | None = None
                 ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Standardised teacher features, feature-head and token-head predictions for images in [0, 1].

        ``raw``: the teacher's features of ``x`` when already known (the training cache).
        """
        if raw is None:
            raw = self._teacher(x)
        targets = [(f - getattr(self, f"feat_mean{k}")) / getattr(self, f"feat_std{k}") for k, f in enumerate(raw)]
        assert self.student is not None, "memory=only has no student"
        feat_preds, tok_preds = self.student(self.teacher.normalise(x))
        feat_preds = [_fit(p, t) for p, t in zip(feat_preds, targets, strict=True)]
        tok_preds = [_fit(p, t) for p, t in zip(tok_preds, targets, strict=True)]
        return targets, feat_preds, tok_preds

    def distance(self, t: Tensor, p: Tensor) -> Tensor:
        """Per-location distance (B, h, w): mean squared difference over channels and/or 1 - cosine."""
        mode = self.config.distance
        out = torch.zeros_like(t[:, 0])
        if mode in ("both", "l2"):
            out = out + (t - p).pow(2).mean(dim=1)
        if mode in ("both", "cos"):
            out = out + 1.0 - F.cosine_similarity(t, p, dim=1, eps=1e-8)
        return out

    # --- scoring --------------------------------------------------------------------------------
    @torch.no_grad()
    def calibrate(self, heldout: TensorLike) -> None:
        """Mean per-scale distance over held-out normals (token and feature heads), so that every scale
        and head weighs the same in the map; for ``map_norm=location``, its held-out mean at each
        location relative to that (shrunk toward 1 by ``LOCATION_PRIOR`` images); for ``map_norm=quantile``,
        its ``QUANTILES`` over all locations of the held-out images. With a memory, its mean distance
        over the held-out images' cells (``memory.mean_dist``). One teacher pass feeds both."""
        if not len(heldout):
            return
        n = len(self.scales)
        student = self.config.memory != "only"
        dists: list[list[list[Tensor]]] = [[[] for _ in range(n)] for _ in range(2)]  # per head, scale: (B, h, w)
        mem: list[list[Tensor]] = []  # per batch: the memory's held-out distance maps (and the fine memory's)
        for i in range(0, len(heldout), STAT_BATCH):
            x = heldout[i:i + STAT_BATCH].to(self.map_mean.device)
            raw = self._teacher(x)
            if self.memory is not None:
                mem.append([d.double() for d in self.memory.distance_maps(raw, *self._feat_stats())])
            if student:
                targets, feat_preds, tok_preds = self._forward(x, raw)
                for h, preds in enumerate((tok_preds, feat_preds)):
                    for k, (t, p) in enumerate(zip(targets, preds, strict=True)):
                        dists[h][k].append(self.distance(t, p).double())
        if self.memory is not None:
            self.memory.calibrate_all([torch.cat(d) for d in zip(*mem, strict=True)], LOCATION_PRIOR)
        if student:
            self._calibrate_student(dists)

    def _calibrate_student(self, dists: list[list[list[Tensor]]]) -> None:
        """The student map's buffers from the held-out distances per head and scale (see ``calibrate``)."""
        for h, mean_buf in enumerate((self.map_mean, self.map_mean_feat)):
            for k in range(len(self.scales)):
                d = torch.cat(dists[h][k])
                m = d.mean().clamp_min(1e-12)
                mean_buf[k] = m.float()
                q_a, q_b = np.quantile(d.flatten().cpu().numpy(), QUANTILES)
                self.map_quant[h, k, 0] = float(q_a)
                self.map_quant[h, k, 1] = float(max(q_b, q_a + 1e-12 * max(abs(q_a), 1.0)))
                buf = getattr(self, f"map_loc{h}_{k}")
                ratio = location_ratio(d, m, LOCATION_PRIOR)
                buf.copy_(_fit(ratio[None, None], buf[None, None])[0, 0].clamp_min(1e-3).float())

    @torch.no_grad()
    def predict(self, images: Tensor) -> tuple[Tensor, Tensor]:
        size = (int(images.shape[-2]), int(images.shape[-1]))
        raw = self._teacher(images)
        cfg = self.config
        mode, w = cfg.memory, cfg.memory_weight
        if mode == "off":
            amap = for_image = gaussian_blur(self._student_map(images, raw, size), cfg.smoothing_sigma)
        else:
            amap, for_image = self._memory_maps(raw, size)  # blurred; the same tensor when they do not differ
            if mode == "fused":  # the blur is linear: blurring the parts is blurring their weighted mean
                student = gaussian_blur(self._student_map(images, raw, size), cfg.smoothing_sigma)
                same = for_image is amap
                amap = (1.0 - w) * student + w * amap
                for_image = amap if same else (1.0 - w) * student + w * for_image
        return reduce_map(for_image, cfg.image_score, cfg.topk_fraction), amap

    def _memory_maps(self, raw: list[Tensor], size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """The memory's part of the anomaly map and of the image score's map (the same tensor when they do
        not differ), upsampled to ``size`` (B, H, W) and blurred (``GTransMemory.normalised_maps``). With the
        fine memory, the anomaly map adds ``memory_fine_weight`` times the fine map's excess over 1 (its
        held-out mean); the image score's map has none of it."""
        assert self.memory is not None
        cfg = self.config
        main, for_image, fine = self.memory.normalised_maps(raw, *self._feat_stats(), cfg.memory_norm,
                                                            cfg.memory_image_norm)
        amap = upsample_blur(main, size, cfg.smoothing_sigma)
        image_map = amap if for_image is main else upsample_blur(for_image, size, cfg.smoothing_sigma)
        if fine is not None:
            amap = amap + cfg.memory_fine_weight * (upsample_blur(fine, size, cfg.smoothing_sigma) - 1.0).clamp_min(0)
        return amap, image_map

    def _student_map(self, images: Tensor, raw: list[Tensor], size: tuple[int, int]) -> Tensor:
        """The student's normalised discrepancy, averaged over the map's scales and heads (B, H, W); not blurred."""
        targets, feat_preds, tok_preds = self._forward(images, raw)
        preds, means = (tok_preds, feat_preds), (self.map_mean, self.map_mean_feat)  # head 0 token, 1 feature
        norm = self.config.map_norm
        use = [k for k, s in enumerate(self.scales) if not self.config.map_scales or s in self.config.map_scales]
        pairs = [(h, k) for k in use for h in self._map_heads(k)]
        amap = torch.zeros(images.shape[0], *size, device=images.device, dtype=images.dtype)
        for h, k in pairs:
            d = self.distance(targets[k], preds[h][k])
            if norm == "quantile":  # EfficientAD: q_a -> 0, q_b -> 1 (offsets change no ranking, spreads weigh)
                q_a, q_b = self.map_quant[h, k]
                a = ((d - q_a) / (q_b - q_a)).unsqueeze(1)
            else:
                a = (d / means[h][k]).unsqueeze(1)
            if norm == "location":
                a = a / _fit(getattr(self, f"map_loc{h}_{k}")[None, None], a)
            amap += F.interpolate(a, size=size, mode="bilinear", align_corners=False)[:, 0]
        return amap / len(pairs)

    def _map_heads(self, k: int) -> tuple[int, ...]:
        """The heads (0 token, 1 feature) whose distances make scale ``k``'s part of the map."""
        mode = self.config.map_heads
        if mode == "fine_feature":
            return (1,) if k == 0 and self.student is not None and self.student.pool_first else (0,)
        return {"token": (0,), "feature": (1,), "both": (0, 1)}[mode]


def _total(terms: Iterable[Tensor]) -> Tensor:
    """The sum of the terms, left to right (as builtin ``sum``, whose ``0`` start types the result as int)."""
    return functools.reduce(operator.add, terms)


def _image_key(img: np.ndarray) -> bytes:
    """A content key for one uint8 image (B2b-128 of its bytes and shape)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(str(img.shape).encode())
    h.update(np.ascontiguousarray(img).tobytes())
    return h.digest()


def _fit(p: Tensor, t: Tensor) -> Tensor:
    """Student map resized to the teacher's grid when odd input sizes round differently (normally a no-op)."""
    if p.shape[-2:] == t.shape[-2:]:
        return p
    return F.interpolate(p, size=t.shape[-2:], mode="bilinear", align_corners=False)
