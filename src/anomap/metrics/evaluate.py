"""Run a trained detector over ``test/`` once and compute the standard metrics.

Test labels are read here and only here, after the model is frozen (docs/protocol.md).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from anomap.data.dataset import test_samples
from anomap.data.images import image_size, load_mask
from anomap.data.transforms import resize_maps, resize_mask
from anomap.metrics.pro import pro_curve
from anomap.metrics.roc import _trapezoid, aupr, auroc, f1max, pixel_auroc, roc_curve
from anomap.metrics.threshold import operating_point
from anomap.types import EvalResult

BATCH = 16
PRO_LIMIT = 0.3
IN_MEMORY_BYTES = 1 << 30  # maps larger than this go to a temporary memory-mapped file


def _downsample_curve(x: np.ndarray, y: np.ndarray, n: int = 500) -> tuple[list[float], list[float]]:
    if len(x) > n:
        idx = np.unique(np.linspace(0, len(x) - 1, n).round().astype(int))
        x, y = x[idx], y[idx]
    return [float(v) for v in x], [float(v) for v in y]


def evaluate(det: Any, path: str | Path, eval_size: int | None = None, progress: bool = True) -> EvalResult:
    """Score every image of ``path/test`` and compute metrics against the ground truth.

    Args:
        det: a trained ``anomap.Detector``.
        path: MVTec-layout category (``test/good``, ``test/<defect>``, ``ground_truth/<defect>``).
        eval_size: resolution of the pixel metrics (default: the detector's ``eval_size``, 256).
        progress: show a progress bar.

    Returns:
        EvalResult with ``metrics`` (image_auroc, pixel_auroc, aupro, image_f1max, image_aupr,
        test_fpr, test_recall), per-image ``rows``, ``curves``, ``per_defect`` and ``info``.
    """
    samples = test_samples(path)
    e = int(eval_size or det.config.eval_size)
    n = len(samples)
    with tempfile.TemporaryDirectory(prefix="anomap-eval-") as tmp:
        if n * e * e * 4 > IN_MEMORY_BYTES:
            maps = np.lib.format.open_memmap(Path(tmp) / "maps.npy", mode="w+", dtype=np.float32, shape=(n, e, e))
        else:
            maps = np.zeros((n, e, e), np.float32)
        masks = np.zeros((n, e, e), bool)
        scores = np.zeros(n, np.float64)
        t0 = time.perf_counter()
        bar = tqdm(total=n, desc="evaluating", unit="img", disable=not progress)
        for i in range(0, n, BATCH):
            chunk = samples[i:i + BATCH]
            imgs = np.stack([det.prepare(s.path)[0] for s in chunk])
            s, m = det.predict_raw(imgs)
            scores[i:i + len(chunk)] = s
            maps[i:i + len(chunk)] = resize_maps(m, (e, e))
            for j, smp in enumerate(chunk):
                if smp.mask_path is not None:
                    mask = load_mask(smp.mask_path, size=image_size(smp.path))
                    masks[i + j] = resize_mask(mask, e)
            bar.update(len(chunk))
        bar.close()
        seconds = time.perf_counter() - t0
        labels = np.array([s.label for s in samples], np.int64)
        result = _metrics(det, samples, scores, labels, maps, masks)
        del maps
    result.info.update({
        "dataset": str(Path(path).resolve()),
        "eval_size": e,
        "n_test": n,
        "n_good": int((labels == 0).sum()),
        "n_defect": int((labels == 1).sum()),
        "eval_seconds": round(seconds, 2),
        "ms_per_image_batched": round(1000 * seconds / max(1, n), 2),
    })
    return result


def _metrics(det: Any, samples, scores, labels, maps, masks) -> EvalResult:
    thr = det.calibration.threshold
    f1, _ = f1max(scores, labels)
    if masks.any():
        pix, pix_curve = pixel_auroc(maps, masks)
        pf, pp = pro_curve(maps, masks, fpr_limit=PRO_LIMIT)
        pro_value = _trapezoid(pp, pf) / PRO_LIMIT
        pro_c = dict(zip(("fpr", "pro"), _downsample_curve(pf, pp)))
    else:  # no defect pixels at all (e.g. masks are empty): pixel metrics are undefined
        pix, pix_curve, pro_value, pro_c = None, {}, None, {"fpr": [], "pro": []}
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
        for s, sc in zip(samples, scores)
    ]
    curves = {
        "image_roc": dict(zip(("fpr", "tpr"), _downsample_curve(fpr, tpr))),
        "pixel_roc": {"fpr": list(pix_curve.get("fpr", [])), "tpr": list(pix_curve.get("tpr", []))},
        "pro": pro_c,
    }
    info = {"method": det.method_name, "image_size": det.config.image_size, "threshold": thr,
            "target_fpr": det.calibration.target_fpr, "n_heldout": det.calibration.n_heldout}
    return EvalResult(metrics=metrics, rows=rows, curves=curves, per_defect=per_defect, info=info)
