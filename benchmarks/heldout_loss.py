"""gtrans's distillation loss on a saved model's held-out normal images (a label-free training criterion).

The held-out images (``info["heldout_files"]``) were never trained on, so their loss says how well the
student follows the teacher on normal images it has not seen: lower means fewer false alarms from
under-fitting. Used to choose gtrans's learning rate (docs/methods.md) without test labels.

Prints one JSON line: per-scale mean distances of the token heads and of the feature heads, and the
loss ``w_tok * sum(token) + w_feat * sum(feature)`` (the training loss's form with the plain mean over
locations, i.e. ``hard_fraction=0``, whatever the model was trained with; averaged over images).

``--fit-images`` measures the same on the images the model was trained on instead (the folder's
``train/good`` minus the held-out ones): set beside the held-out figure, it tells under-fitting (both
high) from over-fitting (only the held-out one high), per scale and head.

Usage: python benchmarks/heldout_loss.py --model runs/b5/magnetic_tile-gtrans/model.safetensors \
    --data ../shared/data/magnetic_tile
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

import anomap

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablate import heldout_files, heldout_stack  # a sibling script

from anomap.data.dataset import train_images
from anomap.data.tensors import to_tensor
from anomap.data.transforms import load_stack

BATCH = 16


def heldout_loss(det: anomap.Detector, data: str, fit_images: bool = False) -> dict:
    """Mean distances and loss of a gtrans detector on its held-out normal images in ``data`` (with
    ``fit_images``: on the images of ``data``'s ``train/good`` it was trained on)."""
    if det.method_name != "gtrans":
        sys.exit(f"{det.method_name}: only gtrans models are supported")
    if fit_images:
        held = set(heldout_files(det, data))
        imgs = load_stack([p for p in train_images(data) if p not in held], det.config.work_hw, int(det.channels))
    else:
        imgs = heldout_stack(det, data)
    n_heldout = len(det.info["heldout_files"])
    m = det.model
    m.eval()
    sums = np.zeros((2, len(m.scales)))  # per-image mean distance summed over images: token, feature heads
    with torch.no_grad():
        for i in range(0, len(imgs), BATCH):
            targets, feat_preds, tok_preds = m._forward(to_tensor(imgs[i:i + BATCH], det.device))
            for h, preds in enumerate((tok_preds, feat_preds)):
                sums[h] += [float(m.distance(t, p).mean(dim=(1, 2)).sum()) for t, p in zip(targets, preds, strict=True)]
    tok, feat = sums / len(imgs)
    loss = det.config.w_tok * tok.sum() + det.config.w_feat * feat.sum()
    return {"images": "fit" if fit_images else "heldout", "n_images": len(imgs), "n_heldout": n_heldout,
            "lr": det.config.lr, "steps": det.info.get("steps"),
            "token": [round(float(v), 4) for v in tok], "feature": [round(float(v), 4) for v in feat],
            "loss": round(float(loss), 4)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="the folder the model was trained on")
    ap.add_argument("--fit-images", action="store_true", help="measure on the images it was trained on instead")
    args = ap.parse_args(argv)
    print(json.dumps({"model": args.model, **heldout_loss(anomap.load(args.model), args.data, args.fit_images)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
