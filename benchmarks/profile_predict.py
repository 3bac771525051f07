"""Where a model's prediction time goes: torch.profiler's ops over ``Detector.predict`` of one image.

    python benchmarks/profile_predict.py runs/gmem/mpdd_metal_plate-gtrans_memory/model.safetensors

A random 256x256 RGB image (``--input-size``), ``--warmup`` calls, then ``--calls`` profiled ones with
``--threads`` threads; prints the median wall time of ``--calls`` plain calls and the ops by their own
CPU time per image.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

import anomap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--input-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--rows", type=int, default=12, help="ops shown")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    det = anomap.load(args.model)
    img = np.random.default_rng(0).integers(0, 256, (args.input_size, args.input_size, 3), dtype=np.uint8)
    for _ in range(args.warmup):
        det.predict(img)
    times = []
    for _ in range(args.calls):
        t = time.perf_counter()
        det.predict(img)
        times.append(time.perf_counter() - t)
    print(f"median {statistics.median(times) * 1000:.1f} ms per image over {args.calls} calls")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.calls):
            det.predict(img)
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:args.rows]
    print("| op | ms per image | calls per image |\n|---|---|---|")
    for e in ops:
        print(f"| `{e.key}` | {e.self_cpu_time_total / 1000 / args.calls:.2f} | {e.count / args.calls:g} |")


if __name__ == "__main__":
    main()
