"""ONNX export of a trained detector, with an onnxruntime parity check on real images.

The graph (see docs/deploy.md):

- input ``images``: **uint8** (B, h, w, C), channels last, values 0..255, already resized to the working
  shape (h, w) (metadata ``work_shape``: image_size square, or the fit images' aspect with ``aspect=fit``;
  C = 1 for grey models, 3 for colour); B is dynamic. Float input is *not* accepted: convert
  with ``np.round(x * 255).astype(np.uint8)`` (that is what the PyTorch path does too).
- outputs ``scores`` (B,) and ``maps`` (B, h, w), float32: the method's *raw* values, exactly what
  ``Detector.predict_raw`` returns. Preprocessing (to float, /255, grey->RGB for ViTs, the method's own
  normalisation) is inside the graph; resizing is not (it depends on each image's size).
- calibration (threshold, target_fpr, map_low, map_scale), method, config and versions are stored in
  the model's ``metadata_props`` as JSON text, never folded into the outputs.

Exporter: torch 2.13's ``torch.onnx.export(dynamo=True)`` (torch.export + onnxscript) cannot capture
isstad (its scorer branches on a buffer's value, a data-dependent guard) and takes ~10x longer; the
TorchScript-based exporter (``dynamo=False``, deprecated but shipped) traces all three methods, so it
is used here. Tracing fixes Python control flow to the exported model, which is what we want (the
model is frozen) and what the parity check verifies on real images.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from anomap._version import __version__
from anomap.config import config_to_dict
from anomap.data.images import is_image_file
from anomap.detector import Detector
from anomap.errors import AnomapError, ExportError, ImageError
from anomap.methods.base import Method
from anomap.runtime.backend import (
    ONNX_FORMAT,
    ONNX_FORMAT_KEY,
    ONNX_INPUT,
    ONNX_OUTPUTS,
    OnnxBackend,
    normalise_map,
)

DEFAULT_OPSET = 17
DEFAULT_TOL = 1e-3
MAX_PARITY_IMAGES = 16
INFO_KEYS = ("dataset", "n_fit", "n_heldout", "steps", "stopped_by", "fit_seconds", "device")


class _Graph(nn.Module):
    """What is exported: uint8 (B, S, S, C) -> raw scores (B,), raw maps (B, S, S)."""

    def __init__(self, method: Method):
        super().__init__()
        self.method = method

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = images.permute(0, 3, 1, 2).float() / 255.0
        return self.method.predict(x)


def _detector(detector_or_path: str | Path | Detector) -> Detector:
    if isinstance(detector_or_path, Detector):
        det = detector_or_path
    else:
        path = Path(detector_or_path)
        if path.suffix.lower() == ".onnx":
            raise ExportError("is already an ONNX model.", path=path, fix="export the .safetensors model it came from")
        det = Detector.load(path, device="cpu")
    det.require_model()
    return det


def _metadata(det: Detector, parity: dict[str, Any] | None) -> dict[str, str]:
    """metadata_props: every value JSON text (numbers stay numbers, strings are quoted)."""
    cal = det.calibration.to_dict()
    (h, w), c = det.config.work_hw, det.channels
    values: dict[str, Any] = {
        ONNX_FORMAT_KEY: ONNX_FORMAT,
        "method": det.method_name,
        "channels": c,
        "image_size": det.config.image_size,
        "work_shape": [h, w],
        "threshold": cal["threshold"],
        "target_fpr": cal["target_fpr"],
        "map_low": cal["map_low"],
        "map_scale": cal["map_scale"],
        "calibration": cal,
        "config": config_to_dict(det.config),
        "info": {k: det.info[k] for k in INFO_KEYS if k in det.info},
        "anomap_version": __version__,
        "torch_version": torch.__version__,
        "input": f"images: uint8 (B, {h}, {w}, {c}), channels last, 0..255, resized to {h}x{w} (height x width)",
        "outputs": f"scores: float32 (B,) raw image scores; maps: float32 (B, {h}, {w}) raw anomaly maps",
        "parity": parity if parity is not None else "not checked",
    }
    return {k: json.dumps(v, default=float) for k, v in values.items()}


def _write_metadata(path: Path, props: dict[str, str]) -> None:
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for k, v in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    model.doc_string = "anomap anomaly detector: " + props["input"].strip('"') + "; " + props["outputs"].strip('"')
    model.producer_name = "anomap"
    onnx.save(model, str(path))


def _trace(det: Detector, path: Path, opset: int) -> None:
    """Write the bare graph (no metadata) with the TorchScript-based exporter."""
    (h, w), c = det.config.work_hw, int(det.channels or 3)
    graph = _Graph(det.require_model()).eval()
    example = torch.zeros(2, h, w, c, dtype=torch.uint8)  # batch 2: the batch axis is traced as symbolic
    axes = {ONNX_INPUT: {0: "batch"}, **{name: {0: "batch"} for name in ONNX_OUTPUTS}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about constant Python branches: intended
        torch.onnx.export(graph, (example,), str(path), input_names=[ONNX_INPUT], output_names=list(ONNX_OUTPUTS),
                          dynamic_axes=axes, opset_version=opset, dynamo=False, do_constant_folding=True)


def heldout_images(det: Detector) -> list[Path]:
    """The held-out normal images of the training data, when its folder still holds them (else [])."""
    dataset = det.info.get("dataset")
    if not dataset or not Path(dataset).is_dir():
        return []
    try:
        return det.heldout_paths(dataset)  # found by name, checked by content (fingerprints)
    except AnomapError:
        return []


def collect_parity_images(det: Detector, images: str | Path | Sequence[str | Path] | None) -> tuple[list[Path], str]:
    """Images for the parity check and where they came from.

    ``images`` (a folder, searched recursively, or a list of files) wins; otherwise the held-out normal
    images recorded in ``det.info``. At most ``MAX_PARITY_IMAGES`` are used (evenly spread).

    Raises:
        ExportError: no images could be found (the message says to pass ``--images`` or ``--no-parity``).
    """
    if images is not None:
        items = [images] if isinstance(images, (str, Path)) else list(images)
        found: list[Path] = []
        for item in items:
            p = Path(item)
            if p.is_dir():
                found.extend(sorted(f for f in p.rglob("*") if f.is_file() and is_image_file(f)))
            elif p.is_file():
                found.append(p)
            else:
                raise ExportError("parity image folder or file not found.", path=p,
                                  fix="give a folder of normal images with --images")
        source = ", ".join(str(i) for i in items)
    else:
        found, source = heldout_images(det), f"held-out normal images of {det.info.get('dataset')}"
    if not found:
        where = source if images is not None else (det.info.get("dataset") or "the model's training data")
        raise ExportError(f"no images for the parity check (looked in {where}).",
                          fix="pass a folder of real images with --images DIR (or skip the check with --no-parity)")
    if len(found) > MAX_PARITY_IMAGES:
        idx = np.linspace(0, len(found) - 1, MAX_PARITY_IMAGES).round().astype(int)
        found = [found[i] for i in idx]
    return found, source


def parity_check(det: Detector, onnx_path: str | Path, images: Sequence[str | Path], tol: float = DEFAULT_TOL,
                 threads: int = 2) -> dict[str, Any]:
    """Run PyTorch and onnxruntime on the same prepared images; compare normalised maps and scores.

    Maps are compared after ``(map - map_low) / (map_scale - map_low)`` (the scale a user sees), scores
    after dividing by the calibrated threshold (the scale of the decision). onnxruntime runs the batch
    once whole and the first image once alone (the batch axis is dynamic).

    Returns:
        {"n_images", "max_map_diff", "max_score_diff", "verdict_flips", "tol", "passed"}.

    Raises:
        ExportError: a difference exceeds ``tol`` (the message gives both figures) or an image is unreadable.
    """
    batch = []
    for p in images:
        try:
            batch.append(det.prepare(p)[0])
        except ImageError as e:
            raise ExportError(f"parity image unreadable ({e.problem}).", path=p,
                              fix="remove it or pass another folder with --images") from None
    arr = np.stack(batch)
    ref_scores, ref_maps = det.predict_raw(arr, batch_size=len(arr))
    backend = OnnxBackend(onnx_path, threads=threads)
    scores, maps = backend.predict_prepared(arr)
    one_score, one_map = backend.predict_prepared(arr[:1])
    scores_all = np.concatenate([scores, one_score])
    maps_all = np.concatenate([maps, one_map])
    ref_s = np.concatenate([ref_scores, ref_scores[:1]])
    ref_m = np.concatenate([ref_maps, ref_maps[:1]])
    cal = det.calibration
    map_diff = float(np.abs(normalise_map(maps_all, cal) - normalise_map(ref_m, cal)).max())
    thr = cal.threshold
    denom = abs(thr) if thr else max(float(np.abs(ref_s).max()), 1e-12)
    score_diff = float(np.abs(scores_all - ref_s).max() / denom)
    # verdicts may only flip for scores within the tolerance of the threshold (the threshold is often a
    # held-out score itself, so exact ties are common)
    flips = 0 if thr is None else int(((scores_all > thr) != (ref_s > thr)).sum())
    passed = bool(np.isfinite(map_diff) and np.isfinite(score_diff) and map_diff <= tol and score_diff <= tol)
    report = {"n_images": len(arr), "max_map_diff": map_diff, "max_score_diff": score_diff,
              "verdict_flips": flips, "tol": tol, "passed": passed}
    if not passed:
        raise ExportError(f"parity check failed: onnxruntime differs from PyTorch by {map_diff:.3g} (maps, "
                          f"normalised) and {score_diff:.3g} (scores / threshold) on {len(arr)} images; "
                          f"tolerance {tol:g}.", path=onnx_path,
                          fix="report this with the model file; the partial export was removed")
    return report


def export_onnx(detector_or_path: str | Path | Detector, out: str | Path, *, opset: int = DEFAULT_OPSET,
                parity_images: str | Path | Sequence[str | Path] | None = None, tol: float = DEFAULT_TOL,
                parity: bool = True, threads: int = 2) -> dict[str, Any]:
    """Export a trained detector to ONNX and prove that onnxruntime reproduces it.

    Args:
        detector_or_path: a trained Detector or its ``.safetensors`` file.
        out: the ``.onnx`` file to write (atomically: nothing is left there when anything fails).
        opset: ONNX opset version.
        parity_images: folder or files for the parity check; default: the held-out normal images of the
            training data recorded in the model (``info["dataset"]``), when that folder still exists.
        tol: largest allowed difference of normalised maps and of scores / threshold.
        parity: False skips the check (the metadata then says ``"parity": "not checked"``).
        threads: onnxruntime threads for the check.

    Returns:
        {"path", "method", "opset", "exporter", "bytes", "seconds", "images_from", "parity": {...} | None}.

    Raises:
        ExportError: no parity images, the parity check failed, or the exporter failed.
    """
    t0 = time.perf_counter()
    det = _detector(detector_or_path)
    if det.device.type != "cpu":
        det.require_model().to("cpu")
        det.device = torch.device("cpu")
    files, source = collect_parity_images(det, parity_images) if parity else ([], "")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            _trace(det, tmp, opset)
        except Exception as e:  # noqa: BLE001 - exporter failures come in many types
            raise ExportError(f"torch.onnx could not export the {det.method_name} model "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]}).", path=out,
                              fix="report this with the model file and `anomap --debug export ...` output") from None
        _write_metadata(tmp, _metadata(det, None))
        report = parity_check(det, tmp, files, tol, threads) if parity else None
        if report is not None:
            _write_metadata(tmp, _metadata(det, {**report, "images_from": source}))
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"path": str(out), "method": det.method_name, "opset": opset, "exporter": "torchscript",
            "bytes": out.stat().st_size, "seconds": round(time.perf_counter() - t0, 2),
            "images_from": source, "parity": report}
