"""Run a trained detector over ``test/`` once and compute the standard metrics.

Test labels are read here and only here, after the model is frozen (docs/protocol.md).

Pixel metrics have two modes, recorded in ``EvalResult.info["pixel_metrics_mode"]``:

* ``exact`` (default while the test set has at most ``EXACT_PIXEL_LIMIT`` pixels at the evaluation
  size): maps and masks are kept in memory; pixel AUROC and AUPRO use every distinct map value as a
  threshold.
* ``streaming`` (above the limit): maps go to a temporary file on disk and are binned in a second
  pass (:mod:`anomap.metrics.streaming`); memory no longer grows with the number of images.

Both modes report a bound on the difference to the mathematically exact value as
``pixel_auroc_max_error`` and ``aupro_max_error`` (rounded up to 3 significant digits): the binning
error (streaming) plus the floating-point error of the sums (both modes;
:func:`anomap.metrics.curves.area_rounding_bound`, about 1e-8 at the exact limit). Two results differ
by at most the sum of their bounds.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from anomap.data.dataset import test_samples
from anomap.data.images import image_size, load_mask
from anomap.data.transforms import resize_maps, resize_mask
from anomap.metrics.curves import area_rounding_bound, downsample_curve, round_up, trapezoid
from anomap.metrics.pro import pro_curve_exact
from anomap.metrics.roc import aupr, auroc, f1max, pixel_auroc, roc_curve
from anomap.metrics.streaming import DEFAULT_BINS, MapSpool
from anomap.metrics.threshold import operating_point
from anomap.types import EvalResult, EvaluableDetector, Sample

BATCH = 16
PRO_LIMIT = 0.3
# Exact pixel metrics sort every pixel: about 40 bytes per pixel at the peak. 2**24 pixels (256 test
# images at 256x256) is ~0.7 GB; larger sets stream (memory independent of the number of images).
EXACT_PIXEL_LIMIT = 1 << 24
PIXEL_MODES = ("auto", "exact", "streaming")
# Called once per batch with (samples, scores (B,), maps and bool masks (B, e, e) at the evaluation size).
Observer = Callable[[list[Sample], np.ndarray, np.ndarray, np.ndarray], None]


def choose_pixel_mode(pixel_mode: str, n_pixels: int, limit: int | None = None) -> str:
    """``"exact"`` or ``"streaming"`` for a test set of ``n_pixels`` pixels at the evaluation size."""
    if pixel_mode not in PIXEL_MODES:
        raise ValueError(f"pixel_mode={pixel_mode!r} is not known; use one of {', '.join(PIXEL_MODES)}.")
    if pixel_mode != "auto":
        return pixel_mode
    return "exact" if n_pixels <= (EXACT_PIXEL_LIMIT if limit is None else limit) else "streaming"


def evaluate(det: EvaluableDetector, path: str | Path, eval_size: int | None = None, progress: bool = True,
             pixel_mode: str = "auto", observe: Observer | None = None) -> EvalResult:
    """Score every image of ``path/test`` and compute metrics against the ground truth.

    Args:
        det: a trained ``anomap.Detector`` (or anything with what
            :class:`~anomap.types.EvaluableDetector` lists).
        path: MVTec-layout category (``test/good``, ``test/<defect>``, ``ground_truth/<defect>``).
        eval_size: resolution of the pixel metrics (default: the detector's ``eval_size``, 256).
        progress: show a progress bar.
        pixel_mode: "auto" (exact up to ``EXACT_PIXEL_LIMIT`` pixels, else streaming), "exact" or
            "streaming" (see the module docstring).
        observe: called with each batch's samples, raw scores, maps and masks at the evaluation size
            (``anomap bench`` keeps per-image summaries this way: :mod:`anomap.metrics.bootstrap`).

    Returns:
        EvalResult with ``metrics`` (image_auroc, pixel_auroc, aupro, image_f1max, image_aupr,
        test_fpr, test_recall), per-image ``rows``, ``curves``, ``per_defect`` and ``info``.
    """
    samples = test_samples(path)
    e = int(eval_size or det.config.eval_size)
    n = len(samples)
    mode = choose_pixel_mode(pixel_mode, n * e * e)
    scores = np.zeros(n, np.float64)
    with tempfile.TemporaryDirectory(prefix="anomap-eval-") as tmp:
        spool = MapSpool(tmp, e) if mode == "streaming" else None
        kept = 0 if spool is not None else n  # maps kept in memory: all of them in the exact mode
        maps, masks = np.zeros((kept, e, e), np.float32), np.zeros((kept, e, e), bool)
        t0 = time.perf_counter()
        bar = tqdm(total=n, desc="evaluating", unit="img", disable=not progress)
        for i in range(0, n, BATCH):
            chunk = samples[i:i + BATCH]
            imgs = np.stack([det.prepare(s.path)[0] for s in chunk])
            s, m = det.predict_raw(imgs)
            scores[i:i + len(chunk)] = s
            chunk_masks = np.zeros((len(chunk), e, e), bool)
            for j, smp in enumerate(chunk):
                if smp.mask_path is not None:
                    chunk_masks[j] = resize_mask(load_mask(smp.mask_path, size=image_size(smp.path)), e)
            chunk_maps = resize_maps(m, (e, e))
            if observe is not None:
                observe(chunk, np.asarray(s), chunk_maps, chunk_masks)
            if spool is not None:
                spool.add(chunk_maps, chunk_masks)
            else:
                maps[i:i + len(chunk)] = chunk_maps
                masks[i:i + len(chunk)] = chunk_masks
            bar.update(len(chunk))
        bar.close()
        seconds = time.perf_counter() - t0
        pixel = _pixel_metrics_streaming(spool) if spool is not None else _pixel_metrics_exact(maps, masks)
        if spool is not None:
            spool.remove()
        del maps, masks
    labels = np.array([s.label for s in samples], np.int64)
    result = _metrics(det, samples, scores, labels, pixel)
    result.info.update({
        "dataset": str(Path(path).resolve()),
        "eval_size": e,
        "n_test": n,
        "n_good": int((labels == 0).sum()),
        "n_defect": int((labels == 1).sum()),
        "eval_seconds": round(seconds, 2),
        "ms_per_image_batched": round(1000 * seconds / max(1, n), 2),
        **pixel["info"],
    })
    return result


def _pixel_metrics_exact(maps: np.ndarray, masks: np.ndarray) -> dict[str, Any]:
    """Exact pixel AUROC and AUPRO (a threshold at every distinct map value); None without defects."""
    info: dict[str, Any] = {"pixel_metrics_mode": "exact"}
    if not masks.any():  # no defect pixels at all (e.g. masks are empty): pixel metrics are undefined
        return {"pixel_auroc": None, "roc": {}, "aupro": None, "pro": {"fpr": [], "pro": []}, "info": info}
    pix, pix_curve = pixel_auroc(maps, masks, exact_limit=maps.size)
    pf, pp = pro_curve_exact(maps, masks, fpr_limit=PRO_LIMIT)
    # Exact up to floating point: both curves have at most one point per pixel plus two, and PRO's
    # running sums add at most one weight per pixel (see area_rounding_bound).
    rounding = round_up(area_rounding_bound(maps.size + 2))
    info.update({"pixel_auroc_max_error": rounding, "aupro_max_error": rounding})
    return {"pixel_auroc": pix, "roc": pix_curve, "aupro": trapezoid(pp, pf) / PRO_LIMIT,
            "pro": dict(zip(("fpr", "pro"), downsample_curve(pf, pp), strict=True)), "info": info}


def _pixel_metrics_streaming(spool: MapSpool) -> dict[str, Any]:
    """Binned pixel AUROC and AUPRO from the spooled maps, with their error bounds."""
    info: dict[str, Any] = {"pixel_metrics_mode": "streaming"}
    if spool.defect_pixels == 0:
        return {"pixel_auroc": None, "roc": {}, "aupro": None, "pro": {"fpr": [], "pro": []}, "info": info}
    stream = spool.stream(DEFAULT_BINS)
    pix, pix_err, pix_curve = stream.pixel_auroc()
    pf, pp, pro_err = stream.pro_curve(PRO_LIMIT)
    info.update({"pixel_metrics_bins": stream.bins, "pixel_auroc_max_error": round_up(pix_err),
                 "aupro_max_error": round_up(pro_err)})
    aupro = float(np.clip(trapezoid(pp, pf) / PRO_LIMIT, 0, 1))
    return {"pixel_auroc": pix, "roc": pix_curve, "aupro": aupro,
            "pro": dict(zip(("fpr", "pro"), downsample_curve(pf, pp), strict=True)), "info": info}


def _metrics(det: EvaluableDetector, samples: list[Sample], scores: np.ndarray, labels: np.ndarray,
             pixel: dict[str, Any]) -> EvalResult:
    thr = det.calibration.threshold
    f1, _ = f1max(scores, labels)
    pix, pix_curve, pro_value, pro_c = pixel["pixel_auroc"], pixel["roc"], pixel["aupro"], pixel["pro"]
    fpr, tpr, _ = roc_curve(scores, labels)
    metrics: dict[str, float | None] = {
        "image_auroc": auroc(scores, labels),
        "pixel_auroc": pix,
        "aupro": pro_value,
        "image_f1max": f1,
        "image_aupr": aupr(scores, labels),
        "test_fpr": None,
        "test_recall": None,
    }
    if thr is not None:
        op = operating_point(scores, labels, thr)
        metrics["test_fpr"], metrics["test_recall"] = op["fpr"], op["recall"]
    types = sorted({s.defect_type for s in samples if s.label == 1})
    good = labels == 0
    per_defect = {}
    for t in types:
        sel = good | np.array([s.defect_type == t for s in samples])
        per_defect[t] = auroc(scores[sel], labels[sel])
    rows = [
        {"path": str(s.path), "defect_type": s.defect_type, "label": int(s.label), "score": float(sc),
         "is_anomalous": bool(thr is not None and sc > thr),
         "mask_path": None if s.mask_path is None else str(s.mask_path)}
        for s, sc in zip(samples, scores, strict=True)
    ]
    curves = {
        "image_roc": dict(zip(("fpr", "tpr"), downsample_curve(fpr, tpr), strict=True)),
        "pixel_roc": {"fpr": list(pix_curve.get("fpr", [])), "tpr": list(pix_curve.get("tpr", []))},
        "pro": pro_c,
    }
    cal = det.calibration  # what the threshold promises, beside the test_fpr it achieved
    info = {"method": det.method_name, "image_size": det.config.image_size,
            "work_shape": list(det.config.work_hw), "threshold": thr,
            "target_fpr": cal.target_fpr, "n_heldout": cal.n_heldout, "promised_fpr": cal.promised_fpr,
            "fpr_upper95": cal.fpr_upper95, "n_group_scores": len(cal.group_scores)}
    return EvalResult(metrics=metrics, rows=rows, curves=curves, per_defect=per_defect, info=info)
