"""gtrans's distillation loss on a saved model's held-out normal images (a label-free training criterion).

The held-out images (``info["heldout_files"]``) were never trained on, so their loss says how well the
student follows the teacher on normal images it has not seen: lower means fewer false alarms from
under-fitting. Used to choose gtrans's learning rate (docs/methods.md) without test labels.

Prints one JSON line: per-scale mean distances of the token heads and of the feature heads, and the
loss ``w_tok * sum(token) + w_feat * sum(feature)`` (the training loss's form with the plain mean over
locations, i.e. ``hard_fraction=0``, whatever the model was trained with; averaged over images).

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
from ablate import heldout_stack  # a sibling script

BATCH = 16


def heldout_loss(det: anomap.Detector, data: str) -> dict:
    """Mean distances and loss of a gtrans detector on its held-out normal images in ``data``."""
    if det.method_name != "gtrans":
        sys.exit(f"{det.method_name}: only gtrans models are supported")
    imgs = heldout_stack(det, data)
    m = det.model
    m.eval()
    sums = np.zeros((2, len(m.scales)))  # per-image mean distance summed over images: token, feature heads
    with torch.no_grad():
        for i in range(0, len(imgs), BATCH):
            targets, feat_preds, tok_preds = m._forward(m.to_tensor(imgs[i:i + BATCH], det.device))
            for h, preds in enumerate((tok_preds, feat_preds)):
                sums[h] += [float(m.distance(t, p).mean(dim=(1, 2)).sum()) for t, p in zip(targets, preds)]
    tok, feat = sums / len(imgs)
    loss = det.config.w_tok * tok.sum() + det.config.w_feat * feat.sum()
    return {"n_heldout": len(imgs), "lr": det.config.lr, "steps": det.info.get("steps"),
            "token": [round(float(v), 4) for v in tok], "feature": [round(float(v), 4) for v in feat],
            "loss": round(float(loss), 4)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="the folder the model was trained on")
    args = ap.parse_args(argv)
    print(json.dumps({"model": args.model, **heldout_loss(anomap.load(args.model), args.data)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
