"""Detector: a Method plus its preprocessing, calibration and persistence. What ``anomap.create`` returns."""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from anomap._version import __version__
from anomap.compiled import CompiledPredict
from anomap.config import LEGACY_KEYS, build_config, config_to_dict, fields_of
from anomap.data.aspect import choose_work_shape
from anomap.data.dataset import (
    check_min_size,
    detect_channels,
    file_fingerprint,
    find_heldout,
    split_train,
    train_images,
)
from anomap.data.store import ImageStore
from anomap.data.tensors import TensorBatches, to_tensor
from anomap.data.transforms import load_stack
from anomap.errors import AnomapError, CheckpointError, ConfigError, DataError, NotFittedError
from anomap.inference import ImageInput, Scored, prepare_image, score_images, u8_batch
from anomap.methods.base import Method
from anomap.metrics.threshold import CalibrationWarning, calibrated_threshold
from anomap.registry import DEFAULT_METHOD, get_method_class
from anomap.train.checkpoint import load_checkpoint, save_checkpoint
from anomap.train.distributed import DistContext, session, threads_per_process
from anomap.train.fit_images import load_fit_images
from anomap.train.loop import TrainResult, train
from anomap.train.runtime import resolve_device, set_threads
from anomap.train.validation import val_loss_fn
from anomap.types import AnomalyResult, Calibration

PREDICT_BATCH = 16
# Calibration keeps at most this many map values for its quantiles (a regular pixel grid beyond it).
MAP_SAMPLE_CAP = 1 << 22  # 16 MB of float32; e.g. 256 held-out maps of 128x128 are used whole


class Detector:
    """One trained (or to-be-trained) anomaly detector for one category of images.

    Args:
        method: a name from ``anomap.list_methods()``.
        config: config values (``image_size``, ``max_steps``, ``seed``, ``device``, method keys ...).
    """

    def __init__(self, method: str, config: dict[str, Any] | None = None):
        cls = get_method_class(method)
        self.method_name = method
        self.config = build_config(cls.Config, config or {})
        self.model: Method | None = None
        self.channels: int | None = None
        self.calibration = Calibration(target_fpr=self.config.target_fpr)
        self.info: dict[str, Any] = {}
        self.device = torch.device("cpu")
        self._compiled: CompiledPredict | None = None  # set by compile(); dropped whenever the model changes

    # ------------------------------------------------------------------------------------ training
    def fit(self, path: str | Path, *, out: str | Path | None = None, resume: bool = False,
            progress: bool = True) -> Detector:
        """Train on the normal images of ``path`` (MVTec category or a plain folder), then calibrate.

        Started by ``torchrun`` (several processes), every process calls ``fit`` with the same
        arguments and trains its shard of each global batch; rank 0 alone writes the checkpoint and the
        model, shows progress and calibrates (docs/scale.md). Large fit sets are decoded once into
        ``<out>.cache/`` (a temporary folder without ``out``) and streamed from there; it is removed at
        the end, and reused by ``resume`` after a crash.

        Args:
            path: category folder with ``train/good``, or a folder of normal images.
            out: where to save the trained detector; a resumable ``<out>.partial`` checkpoint is kept
                next to it while training and removed at the end.
            resume: continue from ``<out>.partial`` if it exists.
            progress: show progress bars.
        """
        with session(self.config.device) as (ctx, device):
            return self._fit(path, out=out, resume=resume, progress=progress, ctx=ctx, device=device)

    def _fit(self, path: str | Path, *, out: str | Path | None, resume: bool, progress: bool,
             ctx: DistContext, device: torch.device) -> Detector:
        cfg = self.config
        t0 = time.perf_counter()
        set_threads(threads_per_process(cfg.num_threads, ctx))
        self.device = device
        progress = progress and ctx.is_main
        paths = train_images(path)
        split = split_train(paths, cfg.val_fraction, cfg.min_heldout, cfg.seed)
        min_side = max(16, cfg.image_size // 4)  # upscaling more than 4x invents the detail the model learns
        sizes = check_min_size(paths, min_side, fix=f"remove the image, or lower image_size (now {cfg.image_size}): "
                               "images need at least image_size/4 and 16 px per side")
        self.channels, shape_note = detect_channels(paths), choose_work_shape(cfg, (sizes[p] for p in split.fit))
        fit_imgs, held_imgs, cache = load_fit_images(split.fit, split.heldout, cfg.work_hw, self.channels,
                                                     out, progress, ctx, device)
        done = False
        try:
            torch.manual_seed(cfg.seed)
            cls = get_method_class(self.method_name)
            self.model = cls(cfg, self.channels).to(self.device)
            self._compiled = None
            self.model.prepare_fit(fit_imgs)

            val_loss = cfg.select_on == "val_loss"
            eval_fn = val_loss_fn(self.model, held_imgs, fit_imgs, cfg.seed, self.device) if val_loss else None
            ckpt = None if out is None else Path(str(out) + ".partial")
            result: TrainResult = train(
                self.model, fit_imgs, seed=cfg.seed, device=self.device, ckpt_path=ckpt, resume=resume,
                checkpoint_every=cfg.checkpoint_every, max_seconds=cfg.max_train_seconds, progress=progress,
                eval_fn=eval_fn, eval_every=max(1, cfg.checkpoint_every // 2) if eval_fn else 0,
                extra_meta={"method": self.method_name, "config": config_to_dict(cfg)}, dist=ctx,
            )
            if not ctx.is_main:  # rank 0 calibrates and saves; this process's weights are the same
                self.info = {"rank": ctx.rank, "processes": ctx.world_size, "steps": result.steps,
                             "train_seconds": round(result.seconds, 2), "device": str(self.device)}
                done = True
                return self
            self.calibrate(held_imgs, fit_imgs, progress)
            done = True
        finally:  # after an error, the cache under <out> is kept for --resume
            if cache is not None and (out is None or (done and ctx.is_local_main)):
                shutil.rmtree(cache, ignore_errors=True)
        self.info = {
            "dataset": str(Path(path).resolve()),
            "n_fit": len(split.fit),
            "n_heldout": len(split.heldout),
            "heldout_files": [p.name for p in split.heldout],
            "heldout_sha256": [file_fingerprint(p) for p in split.heldout],  # see heldout_paths
            "fit_seconds": round(time.perf_counter() - t0, 2),
            "train_seconds": round(result.seconds, 2),
            "steps": result.steps,
            "planned_steps": result.planned,
            "replanned": result.replanned,
            "stopped_by": result.stopped_by,
            "best_step": result.best_step,
            "final_loss": result.history[-1]["loss"] if result.history else None,
            "device": str(self.device),
            **({"aspect": shape_note} if shape_note else {}),
        }
        if ctx.enabled:
            self.info["processes"] = ctx.world_size
        if out is not None:
            self.save(out)
            if ckpt is not None and ckpt.exists():
                ckpt.unlink()
        return self

    def calibrate(self, heldout: np.ndarray | ImageStore, fit: np.ndarray | ImageStore | None = None,
                  progress: bool = False) -> Calibration:
        """Threshold and map statistics from held-out normal images, uint8 (N, S, S, C), in bounded memory;
        with ``calibration_groups`` > 0 the threshold also reads the ``fit`` images' ``Method.group_scores``
        (without ``fit``: the last calibration's). The method's ``calibrate`` gets :class:`TensorBatches`.
        The map quantiles use every pixel while N x S x S <= ``MAP_SAMPLE_CAP``, else every k-th row and
        column of each map (a regular grid of about that many values).
        """
        model, groups = self.require_model().eval(), self.config.calibration_groups
        model.calibrate(TensorBatches(heldout, self.device))
        h, w = self.config.work_hw
        k = max(1, math.ceil(math.sqrt(len(heldout) * h * w / MAP_SAMPLE_CAP)))
        score_parts, value_parts = [np.zeros(0, np.float32)], [np.zeros(0, np.float32)]
        for batch_scores, batch_maps in self._predict_batches(heldout):
            score_parts.append(batch_scores)
            value_parts.append(np.ascontiguousarray(batch_maps[:, ::k, ::k]).ravel())
        scores, values = np.concatenate(score_parts), np.concatenate(value_parts)
        values = values if len(values) else np.zeros(1, np.float32)
        group = ([] if not groups else self.calibration.group_scores if fit is None else
                 [float(s) for s in model.group_scores(TensorBatches(fit, self.device), groups, progress)])
        promise = calibrated_threshold(np.concatenate([scores, group]), self.config.target_fpr, n_group=len(group))
        self.calibration = Calibration(
            threshold=promise.threshold, order_k=promise.order_k, promised_fpr=promise.promised_fpr,
            fpr_upper95=promise.fpr_upper95, target_fpr=self.config.target_fpr,
            map_scale=float(np.quantile(values, 0.999)), map_low=float(np.quantile(values, 0.5)),
            n_heldout=len(scores), heldout_scores=[float(s) for s in scores], group_scores=list(group))
        return self.calibration

    def rescore(self, overrides: dict[str, Any], data: str | Path, progress: bool = False) -> Detector:
        """Change scoring-only settings of a trained detector, then recalibrate it on its held-out normals.

        Args:
            overrides: values of the method's ``SCORING_KEYS`` (e.g. isstad ``pixel_map``, gtrans
                ``distance``); any other key changes training and raises ConfigError.
            data: the folder the detector was trained on; its held-out normal images (the file names
                stored in ``info["heldout_files"]``) give the new threshold and map statistics.
        """
        model = self.require_model()
        if not overrides:
            return self
        allowed = type(self.config).SCORING_KEYS
        bad = sorted(set(overrides) - set(allowed))
        if bad:
            raise ConfigError(f"{', '.join(bad)} change(s) training, not scoring; a saved model cannot "
                              "take them.", fix=f"retrain with --set, or change only: {', '.join(allowed)}")
        new_config = build_config(type(self.config), {**config_to_dict(self.config), **overrides})
        held = self.heldout_paths(data)
        self.config = model.config = new_config  # nothing changes before the inputs are known to be good
        compiled, self._compiled = self._compiled, None  # the compiled graph holds the old scoring settings
        held_imgs = load_stack(held, self.config.work_hw, int(self.channels or 3), progress=progress,
                               desc="recalibrating")
        fit = sorted(set(train_images(data)) - set(held)) if new_config.calibration_groups else []
        self.calibrate(held_imgs, load_stack(fit, self.config.work_hw, int(self.channels or 3), progress=progress,
                                             desc="group scores") if fit else None, progress)
        self.info = {**self.info, "rescored": dict(overrides)}
        if compiled is not None:
            self.compile(compiled.batch_size, warmup=False)
        return self

    def add_normals(self, images: ImageInput | list[ImageInput] | Tensor, data: str | Path | None = None) -> Detector:
        """Learn ``images`` (as :meth:`predict` takes them) as normal, then recalibrate: docs/methods.md."""
        if isinstance(images, Tensor) or (isinstance(images, np.ndarray) and images.ndim == 4):
            images = list(u8_batch(images))
        items = [self.prepare(im)[0] for im in (images if isinstance(images, (list, tuple)) else [images])]
        if not items:
            raise DataError("add_normals got no images.", fix="pass at least one image")
        try:
            held = self.heldout_paths(data if data is not None else self.info.get("dataset") or "")
        except AnomapError:
            if data is not None:
                raise
            held = []  # e.g. a service far from the training data
            warnings.warn("add_normals: the held-out normal images were not found, so the threshold and map "
                          "normalisation are kept (pass data=the training folder to recalibrate)",
                          CalibrationWarning, stacklevel=2)
        self.require_model().add_normals(to_tensor(np.stack(items), self.device))
        self._compiled = None  # a compiled graph holds the old state
        self.info = {**self.info, "added_normals": int(self.info.get("added_normals", 0)) + len(items)}
        if held:
            self.calibrate(load_stack(held, self.config.work_hw, int(self.channels or 3), progress=False))
        return self

    def heldout_paths(self, data: str | Path) -> list[Path]:
        """This detector's held-out normal images (``info["heldout_files"]``) in ``data``, sorted; checked by
        content against ``info["heldout_sha256"]`` (:func:`anomap.data.dataset.find_heldout`).

        Raises:
            ConfigError: ``data`` is not the folder the detector was trained on, or the detector does not
                know its held-out images (not trained by ``fit``).
        """
        return find_heldout(data, self.info.get("heldout_files"), self.info.get("heldout_sha256"))

    def compile(self, batch_size: int = PREDICT_BATCH, warmup: bool = True) -> Detector:
        """Score with the method's ``predict`` compiled by ``torch.compile`` (see :mod:`anomap.compiled`).

        Compiles for batches of ``batch_size`` images (1 for a latency-bound service); with ``warmup``
        the compile cost (tens of seconds on 2 cores) is paid now instead of at the first prediction.
        Falls back to eager PyTorch with a warning when compiling fails. Returns ``self``.
        """
        model = self.require_model()
        model.eval()
        self._compiled = CompiledPredict(model, batch_size)
        if warmup:
            self.predict_raw(np.zeros((1, *self.config.work_hw, int(self.channels or 3)), np.uint8))
        return self

    # ---------------------------------------------------------------------------------- prediction
    def require_model(self) -> Method:
        """The trained method; NotFittedError (naming the fix) before ``fit`` or ``load``."""
        if self.model is None:
            raise NotFittedError("this detector has not been trained.",
                                 fix="call fit(path) or anomap.load(file)")
        return self.model

    @torch.no_grad()
    def predict_raw(self, images: np.ndarray | ImageStore,
                    batch_size: int = PREDICT_BATCH) -> tuple[np.ndarray, np.ndarray]:
        """Raw scores (N,) and maps (N, H, W), float32, for uint8 images (N, H, W, C) at the working shape.

        This is the PyTorch :data:`~anomap.inference.Scorer` of :func:`~anomap.inference.score_images`.
        """
        scores, maps = [], []
        for s, m in self._predict_batches(images, batch_size):
            scores.append(s)
            maps.append(m)
        if not scores:
            return np.zeros(0, np.float32), np.zeros((0, *self.config.work_hw), np.float32)
        return np.concatenate(scores), np.concatenate(maps)

    @torch.no_grad()
    def _predict_batches(self, images: np.ndarray | ImageStore,
                         batch_size: int = PREDICT_BATCH) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Raw scores (b,) and maps (b, H, W) batch by batch, so that a caller can keep what it needs."""
        model = self.require_model()
        model.eval()
        for i in range(0, len(images), batch_size):
            x = to_tensor(images[i:i + batch_size], self.device)
            s, m = (self._compiled or model.predict)(x)
            yield s.float().cpu().numpy(), m.float().cpu().numpy()

    def prepare(self, image: ImageInput) -> tuple[np.ndarray, tuple[int, int]]:
        """One image (path, PIL image or array) -> uint8 (h, w, C) at the working shape, original (H, W)."""
        self.require_model()
        return prepare_image(image, int(self.channels or 3), self.config.work_hw)

    def predict(self, images: ImageInput | list[ImageInput] | tuple[ImageInput, ...] | Tensor,
                ) -> AnomalyResult | list[AnomalyResult]:
        """Score images through :func:`anomap.inference.score_images`; maps come back at each input's size.

        Args:
            images: a path, a PIL image or a (H, W[, C]) array -> one AnomalyResult; a list of those ->
                a list of AnomalyResult; a uint8 array (B, H, W, C) or a float tensor (B, C, H, W) in
                [0, 1] -> one batched AnomalyResult with arrays (B,), (B, H, W), (B,).
        """
        self.require_model()
        if isinstance(images, Tensor) or (isinstance(images, np.ndarray) and images.ndim == 4):
            batch = u8_batch(images)
            res = self._score(list(batch))
            maps = np.stack(res.maps) if res.maps else np.zeros((0, *batch.shape[1:3]), np.float32)
            return AnomalyResult(res.scores, maps, np.array(_flags(res), dtype=bool), res.threshold)
        res = self._score(list(images) if isinstance(images, (list, tuple)) else [images])
        out = [AnomalyResult(float(s), m, f, res.threshold)
               for s, m, f in zip(res.scores, res.maps, _flags(res), strict=True)]
        return out if isinstance(images, (list, tuple)) else out[0]

    def _score(self, images: list[ImageInput]) -> Scored:
        return score_images(images, self.predict_raw, channels=int(self.channels or 3),
                            size=self.config.work_hw, threshold=self.calibration.threshold,
                            batch_size=PREDICT_BATCH)

    # --------------------------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> Path:
        """Write one safetensors file: weights + JSON metadata (method, config, calibration, versions)."""
        model = self.require_model()
        meta = {
            "kind": "model",
            "anomap_version": __version__,
            "torch_version": torch.__version__,
            "method": self.method_name,
            "config": config_to_dict(self.config),
            "channels": self.channels,
            "image_size": self.config.image_size,
            "calibration": self.calibration.to_dict(),
            "info": self.info,
        }
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        return save_checkpoint(path, tensors, meta)

    @classmethod
    def load(cls, path: str | Path, device: str | None = None) -> Detector:
        """Load a file written by ``save``; never unpickles. ``device`` overrides the saved one."""
        tensors, meta = load_checkpoint(path)
        if meta.get("kind") != "model":
            raise CheckpointError(
                "this is a training checkpoint (.partial), not a finished model.", path=path,
                fix="resume training with `anomap fit ... --resume` or load the final file",
            )
        try:
            config = {**LEGACY_KEYS, **dict(meta["config"])}
            missing = sorted(set(fields_of(get_method_class(meta["method"]).Config)) - set(config))
            if missing:  # written by a development version, before these keys existed: today's defaults
                raise CheckpointError(  # would change what the model does, so the file is not read
                    f"written by a development version of anomap 0.1.0 (config lacks {', '.join(missing)}).",
                    path=path, fix="retrain the model with this anomap version (anomap fit)")
            det = cls(meta["method"], {**config, **({} if device is None else {"device": device})})
        except (KeyError, TypeError, ConfigError) as e:
            raise CheckpointError(f"metadata does not describe a usable model ({e}).", path=path) from None
        det.channels = int(meta["channels"])
        det.calibration = Calibration.from_dict(meta.get("calibration", {}))
        det.info = meta.get("info", {})
        det.device = resolve_device(det.config.device)
        model = get_method_class(det.method_name)(det.config, det.channels)
        state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            first = str(e).splitlines()[0]
            raise CheckpointError(f"weights do not fit the {det.method_name} model ({first}).", path=path,
                                  fix="the file was written by another anomap version or edited") from None
        det.model = model.to(det.device).eval()
        return det

    def describe(self) -> str:
        return json.dumps({"method": self.method_name, "config": config_to_dict(self.config),
                           "calibration": self.calibration.to_dict(), "info": self.info}, indent=2)


def _flags(res: Scored) -> list[bool]:
    """Verdicts as bools: an uncalibrated detector (no threshold) flags nothing."""
    return [f is True for f in res.is_anomalous]


def create(method: str = DEFAULT_METHOD, **config: Any) -> Detector:
    """A new, untrained detector: ``anomap.create()`` (the default method, ``DEFAULT_METHOD``) or e.g.
    ``anomap.create("ssl_ae", image_size=128, max_steps=500)``."""
    return Detector(method, config)


def load(path: str | Path, device: str | None = None) -> Detector:
    """A trained detector from a file written by ``Detector.save`` (no pickle, no code execution)."""
    return Detector.load(path, device=device)

