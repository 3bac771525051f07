"""Scoring variants of a saved model on synthetic anomalies pasted into its own held-out normal images.

A label-free way to compare scoring settings (never test data): the model's held-out normal images
(``info["heldout_files"]``, never trained on) are the normals; the same images with synthetic
anomalies from the shared generator (:mod:`anomap.data.corruption`, its default preset, fixed seed,
the held-out images as the pool of "other" material) are the anomalies, with exact masks. For each
variant the model is re-scored and recalibrated on the held-out normals (``Detector.rescore``), then
image AUROC (normal vs corrupted), pixel AUROC and AUPRO@0.3 (maps of both sets, exact) are printed
as one Markdown row.

``--cross`` is for settings that learn more from the held-out normals than a few numbers (e.g. gtrans
``map_norm=location``, a mean per location): the held-out images are split in two halves (even and
odd positions), the model is calibrated on one half and scores the other half and its corrupted copies,
then the halves swap; the metrics pool both halves. Without it, such a setting would be scored on the
very images it was calibrated on.

``--copies K`` draws K corrupted copies of every held-out image (default 1). With few held-out images
(mpdd_metal_plate has 5) one image pair in the wrong order moves the image AUROC by 1/(5*5) = 0.04;
more copies make the comparison finer (the normals are still the same few images). ``--digits N``
prints the metrics with N decimals (default 3), for rules that ask which of two close values is higher.

Usage:
    python benchmarks/synthetic_check.py --model runs/b2/mpdd_metal_plate-gtrans/model.safetensors \
        --data ../shared/data/mpdd_metal_plate --variant "token heads" map_heads=token \
        --variant "feature heads" map_heads=feature --variant "both" map_heads=both
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

import anomap
from anomap.data.corruption import CorruptionConfig, corrupt_batch
from anomap.metrics.pro import aupro_exact
from anomap.metrics.roc import auroc, pixel_auroc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablate import append_rows, heldout_stack, rescored, variant_parser, variant_row  # a sibling script


def synthetic_set(det: anomap.Detector, data: str, seed: int, copies: int = 1
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(held-out normals, corrupted copies, masks) at the model's working size.

    With ``copies`` K the copies are K blocks of the normals' length: ``bad[k * N + i]`` is copy k of image i.
    """
    normals = heldout_stack(det, data)
    rng = np.random.default_rng(seed)
    drawn = [corrupt_batch(normals, rng, CorruptionConfig()) for _ in range(copies)]
    return normals, np.concatenate([b for b, _ in drawn]), np.concatenate([m for _, m in drawn])


def _score(det: anomap.Detector, normals: np.ndarray, bad: np.ndarray, cross: bool
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Scores and maps of the normals and of their corrupted copies (in the same order; ``bad`` may hold
    several blocks of copies, see :func:`synthetic_set`).

    With ``cross``: each half of the images is scored by the model calibrated on the other half.
    """
    if not cross:
        return (*det.predict_raw(normals), *det.predict_raw(bad))
    if len(normals) < 2:
        sys.exit("--cross needs at least 2 held-out images")
    out = [np.zeros(len(normals), np.float32), np.zeros(normals.shape[:3], np.float32),
           np.zeros(len(bad), np.float32), np.zeros(bad.shape[:3], np.float32)]
    idx = np.arange(len(normals))
    for part in (idx % 2 == 0, idx % 2 == 1):
        det.calibrate(normals[~part])
        part_bad = np.tile(part, len(bad) // len(normals))
        for j, (res, sel) in enumerate(zip((*det.predict_raw(normals[part]), *det.predict_raw(bad[part_bad])),
                                           (part, part, part_bad, part_bad), strict=True)):
            out[j][sel] = res
    return tuple(out)


def main(argv: list[str] | None = None) -> int:
    ap = variant_parser(__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--cross", action="store_true", help="2-fold cross-calibration on the held-out normals")
    ap.add_argument("--copies", type=int, default=1, help="corrupted copies per held-out image (default 1)")
    ap.add_argument("--digits", type=int, default=3, help="decimals of the metrics (default 3; more to break ties)")
    args = ap.parse_args(argv)
    if args.copies < 1:
        sys.exit(f"--copies {args.copies}: need at least 1")
    normals, bad, masks = synthetic_set(anomap.load(args.model), args.data, args.seed, args.copies)
    labels = np.r_[np.zeros(len(normals)), np.ones(len(bad))]
    all_masks = np.concatenate([np.zeros((len(normals), *masks.shape[1:]), masks.dtype), masks]).astype(bool)
    rows = []
    for label, sets, det in rescored(args):
        s0, m0, s1, m1 = _score(det, normals, bad, args.cross)
        maps = np.concatenate([m0, m1])
        img = auroc(np.r_[s0, s1], labels)
        pix, _ = pixel_auroc(maps, all_masks)
        pro = aupro_exact(maps, all_masks)
        rows.append(variant_row(args.data, det, label, sets, f"{len(normals)} + {len(bad)}",
                                *(f"{v:.{args.digits}f}" for v in (img, pix, pro))))
    append_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
