"""Inference throughput of a saved model at batch 1 and batch 16 on images already at the working size.

Usage: python benchmarks/batch_throughput.py MODEL.safetensors [--rounds 5]
Prints one Markdown row: ms/img at batch 1, images/s at batch 1 and at batch 16 (median of rounds).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch

import anomap


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    det = anomap.load(args.model, device="cpu")
    s, c = det.config.image_size, det.channels
    imgs = np.random.default_rng(0).integers(0, 256, (16, s, s, c), dtype=np.uint8)
    det.predict_raw(imgs[:2], batch_size=1)  # warm-up
    one, sixteen = [], []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        det.predict_raw(imgs, batch_size=1)
        one.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        det.predict_raw(imgs, batch_size=16)
        sixteen.append(time.perf_counter() - t0)
    b1, b16 = statistics.median(one), statistics.median(sixteen)
    print(f"| {det.method_name} | {s} | {torch.get_num_threads()} | {1000 * b1 / 16:.1f} | {16 / b1:.1f} | "
          f"{16 / b16:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
