"""Dynamic batching against batch prediction, in one sitting: is the service as fast as `anomap predict`?

For one model: generate N 256x256 PNGs (outside the repository), time `anomap predict MODEL DIR
--batch-size 16` with the torch and the onnx backend (marginal throughput: N images minus a 16-image run,
so start-up is not counted), then run `benchmarks/serve_load.py` against `anomap serve` with 8 concurrent
clients for each server setting, and print one Markdown table with requests/s, p50/p99 latency and the
ratio to the faster `anomap predict`. The issue's bars: requests/s >= 0.8x that throughput, p99 <=
max-wait-ms + 2 batch times (a batch time: max-batch images at the predict throughput).

    python benchmarks/serve_batching.py runs/demo/model.safetensors --images 256 --requests 400
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
SETTINGS = {  # label -> serve_load.py arguments
    "serve, batching (auto backend)": ["--max-batch", "8", "--max-wait-ms", "5"],
    "serve, batching, --backend torch": ["--max-batch", "8", "--max-wait-ms", "5", "--backend", "torch"],
    "serve, no batching (--max-batch 1, auto backend)": ["--max-batch", "1"],
}


def make_images(folder: Path, n: int, side: int = 256) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side]
    for k in range(n):
        base = 128 + 60 * np.sin(xx / (7.0 + k % 5)) * np.cos(yy / 13.0)
        arr = np.clip(base[..., None] + rng.normal(0, 6, (side, side, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{k:04d}.png")


def predict_seconds(model: Path, inputs: list[str], backend: str, threads: int) -> float:
    cmd = [sys.executable, "-m", "anomap.cli", "predict", str(model), *inputs, "--batch-size", "16", "--backend",
           backend, "--threads", str(threads), "-q", "--out", str(Path(tempfile.gettempdir()) / "anomap-predict.csv")]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def predict_throughput(model: Path, folder: Path, backend: str, threads: int) -> float:
    """Images per second of `anomap predict --batch-size 16`, start-up excluded (N - 16 images)."""
    files = sorted(str(p) for p in folder.glob("*.png"))
    small = min(predict_seconds(model, files[:16], backend, threads) for _ in range(2))
    full = predict_seconds(model, [str(folder)], backend, threads)
    if full <= small:
        raise SystemExit(f"serve_batching: {len(files)} images took no longer than 16 ({full:.2f} s vs {small:.2f} s); "
                         "use more --images on a quieter machine")
    return (len(files) - 16) / (full - small)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    model = Path(args.model)
    work = Path(tempfile.mkdtemp(prefix="anomap-batching-"))
    make_images(work / "images", args.images)
    onnx = work / "model.onnx"
    subprocess.run([sys.executable, "-m", "anomap.cli", "export", str(model), "--format", "onnx", "--out", str(onnx),
                    "--images", str(work / "images")], check=True, stdout=subprocess.DEVNULL)
    predict = {"torch": predict_throughput(model, work / "images", "torch", args.threads),
               "onnx": predict_throughput(onnx, work / "images", "onnx", args.threads)}
    best = max(predict.values())
    rows = []
    for label, extra in SETTINGS.items():
        out = work / "load.json"
        subprocess.run([sys.executable, str(HERE / "serve_load.py"), "--model", str(model), "--requests",
                        str(args.requests), "--concurrency", "8", "--threads", str(args.threads),
                        "--image", str(work / "images" / "0000.png"), "--json", str(out), *extra], check=True,
                       stdout=subprocess.DEVNULL)
        r = json.loads(out.read_text())
        rows.append({"setting": label, "backend": r["backend"], "requests_per_s": r["requests_per_s"],
                     "p50_ms": r["latency_ms"]["p50"], "p99_ms": r["latency_ms"]["p99"],
                     "errors": r["errors"], "ratio": round(r["requests_per_s"] / best, 2)})
    batch_ms = 8 / best * 1000.0
    print(f"{model}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"anomap predict --batch-size 16: torch {predict['torch']:.1f} img/s, onnx {predict['onnx']:.1f} img/s; "
          f"one batch of 8 at the faster: {batch_ms:.0f} ms; p99 bar: 5 + 2 x {batch_ms:.0f} = "
          f"{5 + 2 * batch_ms:.0f} ms")
    print("\n| setting | served by | requests/s (8 clients) | x predict | p50 ms | p99 ms | errors |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['backend']} | {r['requests_per_s']} | {r['ratio']} | {r['p50_ms']} | "
              f"{r['p99_ms']} | {r['errors']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"predict_images_per_s": predict, "rows": rows,
                                               "batch8_ms": batch_ms}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
