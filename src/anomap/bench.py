"""Benchmark runner behind ``anomap bench``: train + evaluate each (dataset, method) pair.

Each pair runs in a fresh subprocess so that its peak memory is its own. A Markdown table row per
pair is appended to the output file (``anomap bench --out``; runs/bench/benchmarks.md by default, beside
the runs, never the repository's docs), under a line with the command, machine and date.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HEADER = ("| dataset | method | image AUROC | pixel AUROC | AUPRO@0.3 | image F1max | test FPR / recall @thr "
          "| fit s | ms/img (bs 1) | peak RSS MB | image size | steps (stopped by) | notes |")
SEP = "|" + "---|" * 13


def _fmt(v, nd: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}"


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}"


def run_one(data: str, method: str, sets: list[str], out_json: Path, run_dir: Path) -> dict:
    """Fit, evaluate, time batch-1 inference and write a JSON record (runs inside the subprocess)."""
    import torch

    import anomap
    from anomap.config import parse_overrides
    from anomap.data.dataset import test_samples
    from anomap.data.images import load_image
    from anomap.report.build import write_report

    run_dir.mkdir(parents=True, exist_ok=True)
    det = anomap.create(method, **parse_overrides(sets, prefix=method))
    t0 = time.perf_counter()
    det.fit(data, out=run_dir / "model.safetensors", progress=sys.stderr.isatty())
    fit_s = time.perf_counter() - t0
    result = anomap.evaluate(det, data, progress=False)
    write_report(det, result, run_dir / "report.html")
    # batch-1 latency: decoded image in memory -> resize + normalise + forward + map upsampling
    samples = test_samples(data)
    rng = np.random.default_rng(0)
    picks = [samples[i] for i in rng.choice(len(samples), size=min(20, len(samples)), replace=False)]
    imgs = [load_image(s.path, channels=det.channels) for s in picks]
    with torch.no_grad():
        for im in imgs[:3]:
            det.predict(im)
        t1 = time.perf_counter()
        for im in imgs:
            det.predict(im)
        ms = 1000 * (time.perf_counter() - t1) / len(imgs)
    rec = {
        "dataset": Path(data).name, "method": method, "metrics": result.metrics, "per_defect": result.per_defect,
        "fit_seconds": fit_s, "ms_per_image_bs1": ms,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "image_size": det.config.image_size, "info": {**det.info, **result.info}, "sets": sets,
        "machine": machine(), "date": dt.date.today().isoformat(),
    }
    out_json.write_text(json.dumps(rec, indent=2, default=float))
    return rec


def row(rec: dict, label: str = "") -> str:
    m = rec["metrics"]
    info = rec["info"]
    steps = sum(info.get("steps", {}).values()) if isinstance(info.get("steps"), dict) else info.get("steps")
    sets = " ".join(rec.get("sets", []))
    notes = "; ".join(x for x in dict.fromkeys((sets, label)) if x)  # a label that repeats the --set: once
    promise = (f" (promise <={info['promised_fpr']:.3f}, 95% <={info['fpr_upper95']:.3f})"  # test FPR beside it
               if info.get("promised_fpr") is not None and info.get("fpr_upper95") is not None else "")
    return (f"| {rec['dataset']} | {rec['method']} | {_fmt(m['image_auroc'])} | {_fmt(m['pixel_auroc'])} | "
            f"{_fmt(m['aupro'])} | {_fmt(m['image_f1max'])} | {_fmt(m['test_fpr'], 2)}{promise} / "
            f"{_fmt(m['test_recall'], 2)} "
            f"| {rec['fit_seconds']:.1f} | {rec['ms_per_image_bs1']:.1f} | {rec['peak_rss_mb']:.0f} | "
            f"{rec['image_size']} | {steps} ({info.get('stopped_by')}) | {notes} |")


def run_bench(datas: list[str], methods: list[str], sets: list[str], out: Path, runs_dir: Path,
              max_minutes: float | None = None, label: str = "") -> int:
    """Run every pair in a subprocess and append one Markdown row per pair to ``out``."""
    sets = list(sets)
    if max_minutes is not None:
        sets.append(f"max_train_seconds={max_minutes * 60:g}")
    cmd_line = "anomap bench " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 2 else ""
    lines = []
    failed = 0
    for data in datas:
        for method in methods:
            run_dir = runs_dir / f"{Path(data).name}-{method}"
            js = run_dir / "bench.json"
            run_dir.mkdir(parents=True, exist_ok=True)
            argv = [sys.executable, "-m", "anomap.bench", "--data", data, "--method", method,
                    "--json", str(js), "--run-dir", str(run_dir)] + [f"--set={s}" for s in sets]
            print(f"bench: {Path(data).name} x {method} ...", flush=True)
            proc = subprocess.run(argv, check=False)
            if proc.returncode != 0 or not js.exists():
                print(f"bench: {Path(data).name} x {method} failed (exit {proc.returncode})", file=sys.stderr)
                failed += 1
                continue
            rec = json.loads(js.read_text())
            lines.append(row(rec, label))
            print(lines[-1], flush=True)
    if lines:
        _append(out, lines, cmd_line)
    return 1 if failed else 0


def _append(out: Path, lines: list[str], cmd_line: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    text = out.read_text() if out.exists() else "# Benchmarks\n"
    block = [f"\n`{cmd_line}` on {machine()}, {dt.date.today().isoformat()}:\n", HEADER, SEP, *lines, ""]
    out.write_text(text.rstrip("\n") + "\n" + "\n".join(block))


def _main() -> None:
    ap = argparse.ArgumentParser(description="one benchmark pair (used by `anomap bench`)")
    ap.add_argument("--data", required=True)
    ap.add_argument("--method", required=True)
    ap.add_argument("--json", required=True)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--set", action="append", default=[])
    a = ap.parse_args()
    run_one(a.data, a.method, a.set, Path(a.json), Path(a.run_dir))


if __name__ == "__main__":
    _main()
