"""Peak RSS of ``anomap fit`` and ``anomap evaluate`` against the number of training images.

Generates MVTec-layout categories of N normal 256x256 PNGs (smooth stripes + noise) and N/10 test
images (half with a bright square defect and its mask) under a work folder outside the repository,
then runs a short fit (``max_steps``) and an evaluation of each in a fresh process and reads that
process's peak RSS (``ru_maxrss``). Prints a Markdown table.

    python benchmarks/scale_rss.py --sizes 1000 5000 20000          # the table in docs/scale.md
    python benchmarks/scale_rss.py --sizes 1000 --no-stream           # the same with the fit set in RAM

The generated data is kept (``--work``, default /tmp/anomap_scale) and reused by later runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

SIDE = 256
RUNNER = ("import json, resource, sys, time; from anomap.cli import main; t = time.perf_counter(); "
          "rc = main(sys.argv[2:]); json.dump({'rc': rc, 'seconds': time.perf_counter() - t, "
          "'maxrss_kb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}, open(sys.argv[1], 'w'))")


def _normal(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIDE, 0:SIDE]
    phase, fx, fy = rng.uniform(0, 6.3), rng.uniform(8, 12), rng.uniform(12, 16)
    base = 120 + 60 * np.sin(xx / fx + phase) * np.cos(yy / fy)
    img = base[..., None] + rng.normal(0, 3, (SIDE, SIDE, 3))
    img[..., 1] *= 0.9
    return np.clip(img, 0, 255).astype(np.uint8)


def _write(job: tuple[str, int, str | None]) -> None:
    path, seed, mask_path = job
    img = _normal(seed)
    if mask_path is not None:
        rng = np.random.default_rng(seed + 1)
        y, x = rng.integers(16, SIDE - 48, 2)
        mask = np.zeros((SIDE, SIDE), np.uint8)
        img[y:y + 32, x:x + 32] = 255
        mask[y:y + 32, x:x + 32] = 255
        Image.fromarray(mask).save(mask_path)
    Image.fromarray(img).save(path)


def make_category(root: Path, n: int, workers: int) -> Path:
    """N train/good images and N/10 (at least 20) test images; skipped when already complete."""
    done = root / ".complete"
    if done.exists():
        return root
    n_test = max(20, n // 10)
    jobs: list[tuple[str, int, str | None]] = []
    for sub in ("train/good", "test/good", "test/square", "ground_truth/square"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    jobs += [(str(root / f"train/good/{i:06d}.png"), i, None) for i in range(n)]
    jobs += [(str(root / f"test/good/{i:05d}.png"), 10**7 + i, None) for i in range(n_test // 2)]
    jobs += [(str(root / f"test/square/{i:05d}.png"), 2 * 10**7 + i,
              str(root / f"ground_truth/square/{i:05d}_mask.png")) for i in range(n_test - n_test // 2)]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write, jobs, chunksize=64))
    done.write_text("ok\n")
    return root


def run(argv: list[str], env: dict[str, str], result: Path) -> dict:
    """One anomap command in a fresh process; its exit code, seconds and peak RSS."""
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(result), *argv], env=env, check=False,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0 or not result.exists():
        raise SystemExit(f"failed: anomap {' '.join(argv)}\n{proc.stderr[-3000:]}")
    return json.loads(result.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000])
    ap.add_argument("--work", type=Path, default=Path("/tmp/anomap_scale"))
    ap.add_argument("--method", default="ssl_ae")
    ap.add_argument("--image-size", type=int, default=128, help="the model's working size")
    ap.add_argument("--max-steps", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2, help="processes writing the PNGs")
    ap.add_argument("--no-stream", action="store_true", help="keep the fit set in RAM (no disk cache)")
    args = ap.parse_args()

    env = {**os.environ, "ANOMAP_STREAM_MIN_BYTES": str(1 << 60) if args.no_stream else os.environ.get(
        "ANOMAP_STREAM_MIN_BYTES", "")}
    rows = []
    for n in args.sizes:
        t = time.perf_counter()
        data = make_category(args.work / f"data_{n}", n, args.workers)
        gen = time.perf_counter() - t
        out = args.work / f"runs_{n}{'_ram' if args.no_stream else ''}"
        out.mkdir(parents=True, exist_ok=True)
        model = out / "model.safetensors"
        common = ["--set", f"image_size={args.image_size}", "--set", f"max_steps={args.max_steps}",
                  "--set", "checkpoint_every=0", "-q"]
        fit = run(["fit", "--method", args.method, "--data", str(data), "--out", str(model), *common], env,
                  out / "fit.json")
        ev = run(["evaluate", "--model", str(model), "--data", str(data), "--out", str(out / "metrics.json"), "-q"],
                 env, out / "eval.json")
        metrics = json.loads((out / "metrics.json").read_text())
        n_test = sum(1 for _ in (data / "test").rglob("*.png"))
        decoded_mb = n * args.image_size**2 * 3 / 2**20
        rows.append((n, n_test, decoded_mb, fit, ev, metrics.get("info", {}).get("pixel_metrics_mode", "?"), gen))
        print(f"N={n}: fit {fit['maxrss_kb'] / 1024:.0f} MB, evaluate {ev['maxrss_kb'] / 1024:.0f} MB", file=sys.stderr)

    print(f"\nanomap fit/evaluate peak RSS; {args.method}, image_size={args.image_size}, max_steps={args.max_steps}, "
          f"{'fit set in RAM' if args.no_stream else 'streamed fit set'}; {platform.node()}, "
          f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}\n")
    print("| train images | test images | decoded train set (MB) | fit peak RSS (MB) | fit s | "
          "evaluate peak RSS (MB) | evaluate s | pixel metrics |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for n, n_test, mb, fit, ev, mode, _ in rows:
        print(f"| {n} | {n_test} | {mb:.0f} | {fit['maxrss_kb'] / 1024:.0f} | {fit['seconds']:.1f} | "
              f"{ev['maxrss_kb'] / 1024:.0f} | {ev['seconds']:.1f} | {mode} |")


if __name__ == "__main__":
    main()
