"""PyTorch eager vs onnxruntime: per-image latency at batch 1 and the map difference after normalisation.

    nice -n 0 .venv/bin/python benchmarks/onnx_speed.py runs/bench/*/model.safetensors --threads 2

For each model: export to ONNX (with the usual parity check), prepare the same images (the model's
held-out normal images when its training folder exists, else ``--images DIR``), then score each image
alone with both runtimes, ``--repeat`` rounds after ``--warmup`` untimed calls, both limited to
``--threads`` threads. Prints one Markdown table row per model; the median per-image latency is what
counts (mean and p90 are shown for context). Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import anomap
from anomap.data.aspect import shape_label
from anomap.export.onnx import collect_parity_images, export_onnx
from anomap.runtime.backend import OnnxBackend, normalise_map


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def timed(fn, batch: np.ndarray, warmup: int, repeat: int) -> list[float]:
    """Seconds per call of ``fn`` on each single image of ``batch``, ``repeat`` rounds."""
    for i in range(warmup):
        fn(batch[i % len(batch)][None])
    out = []
    for _ in range(repeat):
        for img in batch:
            t0 = time.perf_counter()
            fn(img[None])
            out.append(time.perf_counter() - t0)
    return out


def bench_one(model: Path, args: argparse.Namespace, onnx_dir: Path) -> str:
    det = anomap.load(model, device="cpu")
    files, _ = collect_parity_images(det, args.images)
    files = files[: args.n]
    onnx_path = onnx_dir / f"{model.parent.name}-{model.stem}.onnx"
    rep = export_onnx(det, onnx_path, parity_images=files, tol=args.tol, threads=args.threads)
    batch = np.stack([det.prepare(f)[0] for f in files])
    backend = OnnxBackend(onnx_path, threads=args.threads, spinning=args.spin)
    t_torch = timed(lambda x: det.predict_raw(x, batch_size=1), batch, args.warmup, args.repeat)
    t_onnx = timed(backend.predict_prepared, batch, args.warmup, args.repeat)
    ref_s, ref_m = det.predict_raw(batch, batch_size=1)
    outs = [backend.predict_prepared(img[None]) for img in batch]
    on_s, on_m = np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])
    cal = det.calibration
    map_diff = float(np.abs(normalise_map(on_m, cal) - normalise_map(ref_m, cal)).max())
    thr = cal.threshold or 1.0
    score_diff = float(np.abs(on_s - ref_s).max() / abs(thr))
    med_t, med_o = statistics.median(t_torch) * 1e3, statistics.median(t_onnx) * 1e3

    def p90(t: list[float]) -> float:
        return float(np.quantile(t, 0.9)) * 1e3

    size = shape_label(*det.config.work_hw)
    return (f"| {model.parent.name}/{model.name} | {det.method_name} | {size} | {len(files)} | "
            f"{med_t:.1f} (p90 {p90(t_torch):.1f}) | {med_o:.1f} (p90 {p90(t_onnx):.1f}) | "
            f"{med_t / med_o:.2f}x | {map_diff:.1e} | {score_diff:.1e} | {rep['bytes'] / 1e6:.1f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", type=Path, help=".safetensors files written by anomap fit")
    ap.add_argument("--images", help="folder of images (default: each model's held-out normal images)")
    ap.add_argument("-n", type=int, default=16, help="images per model (default 16)")
    ap.add_argument("--threads", type=int, default=2, help="threads for both runtimes (default 2)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=5, help="timed rounds over the images (default 5)")
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--spin", action="store_true", help="let onnxruntime's idle threads busy-wait (default off)")
    ap.add_argument("--onnx-dir", type=Path, help="keep the exported .onnx files here (default: a temp folder)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import onnxruntime

    print(f"<!-- {datetime.date.today()} {cpu_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
          f"onnxruntime {onnxruntime.__version__}, {args.threads} threads each "
          f"(ort spinning {'on' if args.spin else 'off'}), batch 1, median of "
          f"{args.repeat} x n images; command: python benchmarks/onnx_speed.py {' '.join(sys.argv[1:])} -->")
    print("| model | method | size | images | torch eager ms/img | onnxruntime ms/img | speed-up | "
          "max map diff (normalised) | max score diff (/thr) | onnx MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        onnx_dir = args.onnx_dir or Path(tmp)
        onnx_dir.mkdir(parents=True, exist_ok=True)
        for model in args.models:
            print(bench_one(model, args, onnx_dir), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
