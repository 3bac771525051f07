"""Training throughput with 1 and 2 processes (torchrun, DDP over gloo) on this machine.

Every run trains the same global batch (each method's config batch size) for the same number of
steps on a generated category; 1 process uses all cores' threads, N processes share the cores
(``num_threads=0``: cores / N each). images/s = images trained / the loop's training seconds (data
caching, model setup and calibration excluded). Prints a Markdown table.

    python benchmarks/scale_procs.py                        # ssl_ae, isstad, gtrans; 1 and 2 processes
    python benchmarks/scale_procs.py --methods ssl_ae --steps 40 --procs 1 2
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_rss import make_category

# batch-size keys per stage, in stage order
BATCH_KEYS = {"ssl_ae": ["batch_size"], "gtrans": ["batch_size"], "isstad": ["stage1_batch_size", "stage2_batch_size"]}


def fit(method: str, procs: int, data: Path, out: Path, steps: int, extra: list[str]) -> dict:
    """Train once; returns the saved model's info and config."""
    from anomap.train.checkpoint import read_metadata

    launcher = ([sys.executable, "-m", "anomap"] if procs == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
                 "-m", "anomap"])
    cmd = [*launcher, "fit", "--method", method, "--data", str(data), "--out", str(out), "-q", "--device", "cpu",
           "--set", f"max_steps={steps}", "--set", "checkpoint_every=0", "--set", "num_threads=0", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return read_metadata(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["ssl_ae", "isstad", "gtrans"])
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=20, help="optimiser steps per run (all stages together)")
    ap.add_argument("--images", type=int, default=200, help="generated training images")
    ap.add_argument("--work", type=Path, default=Path("/tmp/anomap_scale"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every run")
    args = ap.parse_args()

    data = make_category(args.work / f"data_{args.images}", args.images, 2)
    extra = [x for kv in args.set for x in ("--set", kv)]
    rows = []
    for method in args.methods:
        for procs in args.procs:
            meta = fit(method, procs, data, args.work / f"procs_{method}_{procs}.safetensors", args.steps, extra)
            info, cfg = meta["info"], meta["config"]
            images = sum(s * cfg[k] for s, k in zip(info["steps"].values(), BATCH_KEYS[method], strict=True))
            batches = "/".join(str(cfg[k]) for k in BATCH_KEYS[method])
            rows.append((method, procs, cfg["image_size"], batches, sum(info["steps"].values()),
                         info["train_seconds"], images / info["train_seconds"]))
            print(f"{method} x{procs}: {rows[-1][-1]:.1f} images/s", file=sys.stderr)

    print(f"\nanomap fit throughput, CPU, gloo; {platform.node()}, {os.cpu_count()} cores, "
          f"{time.strftime('%Y-%m-%d')}; {args.images} generated 256x256 images\n")
    print("| method | processes | image size | global batch | steps | train s | images/s | vs 1 process |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    base = {r[0]: r[-1] for r in rows if r[1] == min(args.procs)}
    for method, procs, size, batches, steps, secs, ips in rows:
        print(f"| {method} | {procs} | {size} | {batches} | {steps} | {secs:.1f} | {ips:.1f} | "
              f"{ips / base[method]:.2f}x |")


if __name__ == "__main__":
    main()
