"""Scoring variants of a saved model on synthetic anomalies pasted into its own held-out normal images.

A label-free way to compare scoring settings (never test data): the model's held-out normal images
(``info["heldout_files"]``, never trained on) are the normals; the same images with synthetic
anomalies from the shared generator (:mod:`anomap.data.corruption`, its default preset, fixed seed,
the held-out images as the pool of "other" material) are the anomalies, with exact masks. For each
variant the model is re-scored and recalibrated on the held-out normals (``Detector.rescore``), then
image AUROC (normal vs corrupted), pixel AUROC and AUPRO@0.3 (maps of both sets, exact) are printed
as one Markdown row.

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
from anomap.data.dataset import train_images
from anomap.data.transforms import load_stack
from anomap.metrics.pro import aupro_exact
from anomap.metrics.roc import auroc, pixel_auroc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablate import append_rows, rescored, variant_parser  # a sibling script


def synthetic_set(det: anomap.Detector, data: str, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(held-out normals, corrupted copies, masks) at the model's working size."""
    names = set(det.info.get("heldout_files") or [])
    held = sorted(p for p in train_images(data) if p.name in names)
    if not names or len(held) != len(names):
        sys.exit(f"{data}: the model's held-out images are not all in this folder (give its training folder)")
    normals = load_stack(held, det.config.image_size, int(det.channels))
    bad, masks = corrupt_batch(normals, np.random.default_rng(seed), CorruptionConfig())
    return normals, bad, masks


def main(argv: list[str] | None = None) -> int:
    ap = variant_parser(__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=12345)
    args = ap.parse_args(argv)
    normals, bad, masks = synthetic_set(anomap.load(args.model), args.data, args.seed)
    labels = np.r_[np.zeros(len(normals)), np.ones(len(bad))]
    all_masks = np.concatenate([np.zeros_like(masks), masks]).astype(bool)
    rows = []
    for label, sets, det in rescored(args):
        s0, m0 = det.predict_raw(normals)
        s1, m1 = det.predict_raw(bad)
        maps = np.concatenate([m0, m1])
        img = auroc(np.r_[s0, s1], labels)
        pix, _ = pixel_auroc(maps, all_masks)
        pro = aupro_exact(maps, all_masks)
        rows.append(f"| {Path(args.data).name} | {det.method_name} | {label} | {' '.join(sets) or '(as trained)'} | "
                    f"{len(normals)} + {len(bad)} | {img:.3f} | {pix:.3f} | {pro:.3f} |")
        print(rows[-1], flush=True)
    append_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
