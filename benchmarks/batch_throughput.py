"""Inference speed of a saved model: batch-1 latency and batch-16 throughput, plus a machine reference.

Usage: python benchmarks/batch_throughput.py MODEL.safetensors [--input-size 256] [--rounds 5] [--compile]

Images are random uint8 (B, S, S, C) at ``--input-size`` (default: the model's working size) and go
through ``Detector.predict``: resize to the working shape, normalise, forward, map resized back to S.
Prints one Markdown row per variant: method, input size, working size, threads, ms/img at batch 1,
images/s at batch 1 and at batch 16 (medians over rounds), and two machine references measured in
the same sitting (fp32 GEMM GFLOP/s and the time of one small 1x1 convolution), because this shared
VM's speed for small memory-bound layers varies by up to 2x from hour to hour while large GEMMs do not.

With ``--compile`` a second copy of the model is compiled by ``Detector.compile`` (for batch 1 and for
batch 16; compile times go to stderr and are not counted) and eager and compiled rounds alternate, so
that both rows see the same machine; the ratio of the two rows is the figure to quote.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch

import anomap
from anomap.data.aspect import shape_label


def machine_reference() -> tuple[float, float]:
    """(GEMM GFLOP/s on 2048x2048 fp32, ms of a (1, 16, 112, 112) -> 96-channel 1x1 convolution)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    conv, x = torch.nn.Conv2d(16, 96, 1), torch.randn(1, 16, 112, 112)
    with torch.no_grad():
        for _ in range(3):
            a @ b
            conv(x)
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        gflops = 10 * 2 * 2048 ** 3 / (time.perf_counter() - t0) / 1e9
        t0 = time.perf_counter()
        for _ in range(50):
            conv(x)
        conv_ms = 1000 * (time.perf_counter() - t0) / 50
    return gflops, conv_ms


def time_round(dets: dict[int, anomap.Detector], imgs: np.ndarray) -> tuple[float, float]:
    """Seconds for 16 single-image calls (with dets[1]) and for one 16-image call (with dets[16])."""
    t0 = time.perf_counter()
    for im in imgs:
        dets[1].predict(im)
    one = time.perf_counter() - t0
    t0 = time.perf_counter()
    dets[16].predict(imgs)
    return one, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--input-size", type=int, default=0, help="side of the square input images (0: working size)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also time the torch.compile'd model, interleaved")
    args = ap.parse_args(argv)
    eager = anomap.load(args.model, device="cpu")
    (h, w), c = eager.config.work_hw, eager.channels
    work = shape_label(h, w)  # aspect=fit: the working shape, height x width
    s = args.input_size or max(h, w)
    imgs = np.random.default_rng(0).integers(0, 256, (16, s, s, c), dtype=np.uint8)
    variants: dict[str, dict[int, anomap.Detector]] = {eager.method_name: {1: eager, 16: eager}}
    if args.compile:
        compiled = {}
        for bs in (1, 16):
            t0 = time.perf_counter()
            compiled[bs] = anomap.load(args.model, device="cpu").compile(batch_size=bs)
            print(f"compiled for batch {bs} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        variants[f"{eager.method_name} (compiled)"] = compiled
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    with torch.no_grad():
        for dets in variants.values():  # warm-up
            time_round(dets, imgs[:2])
        for _ in range(args.rounds):
            for name, dets in variants.items():
                times[name].append(time_round(dets, imgs))
    gflops, conv_ms = machine_reference()
    for name, rounds in times.items():
        b1 = statistics.median(r[0] for r in rounds)
        b16 = statistics.median(r[1] for r in rounds)
        print(f"| {name} | {s} | {work} | {torch.get_num_threads()} | {1000 * b1 / 16:.1f} | {16 / b1:.1f} | "
              f"{16 / b16:.1f} | {gflops:.0f} | {conv_ms:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
