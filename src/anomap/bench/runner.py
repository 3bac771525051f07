"""Benchmark runner behind ``anomap bench``: train + evaluate each (dataset, method) pair.

Each pair runs in a fresh subprocess so that its peak memory is its own, and leaves ``bench.json``,
``summaries.npz`` (per-image summaries for the bootstrap, :mod:`anomap.metrics.bootstrap`), the model
and its report in ``RUNS_DIR/<dataset>-<method>/``. A Markdown table row per pair is appended to the
output file (``anomap bench --out``; runs/bench/benchmarks.md by default, beside the runs, never the
repository's docs), under a line with the command, machine and date, followed by the suite block
(:mod:`anomap.bench.suite`: each method's mean over the datasets with 95% bootstrap intervals), which
also goes to ``RUNS_DIR/suite.json``.
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
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from anomap.bench.compare import compare_folders, compare_markdown
from anomap.bench.suite import SUMMARIES, load_run, load_runs, suite_block, suite_for_runs
from anomap.data.aspect import shape_label
from anomap.metrics.bootstrap import RESAMPLES

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

    import anomap
    from anomap.config import parse_overrides

    run_dir.mkdir(parents=True, exist_ok=True)
    det = anomap.create(method, **parse_overrides(sets, prefix=method))
    t0 = time.perf_counter()
    det.fit(data, out=run_dir / "model.safetensors", progress=sys.stderr.isatty())
    fit_s = time.perf_counter() - t0
    return record(det, data, method, sets, fit_s, out_json, run_dir)


def record(det: Any, data: str, method: str, sets: list[str], fit_s: float, out_json: Path, run_dir: Path) -> dict:
    """Evaluate a trained detector (with per-image summaries and a report in ``run_dir``), time batch-1
    inference, and write the JSON record. ``anomap bench`` calls it after a fit; a script may call it for a
    re-scored model (``Detector.rescore``)."""
    import anomap
    from anomap.metrics.bootstrap import SummaryBuilder
    from anomap.report.build import write_report

    with tempfile.TemporaryDirectory(prefix="anomap-summaries-") as tmp:
        builder = SummaryBuilder(tmp, int(det.config.eval_size))
        result = anomap.evaluate(det, data, progress=False, observe=builder.add)
        summaries = builder.finish(_summary_meta(data, method, result.metrics, result.info))
    summaries.save(run_dir / SUMMARIES)
    write_report(det, result, run_dir / "report.html")
    ms = batch1_ms(det, data)
    rec = {
        "dataset": Path(data).name, "method": method, "metrics": result.metrics, "per_defect": result.per_defect,
        "fit_seconds": fit_s, "ms_per_image_bs1": ms,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "image_size": det.config.image_size, "info": {**det.info, **result.info}, "sets": sets,
        "machine": machine(), "date": dt.date.today().isoformat(), "summaries": SUMMARIES,
    }
    out_json.write_text(json.dumps(rec, indent=2, default=float))
    return rec


def batch1_ms(det: Any, data: str, n: int = 20) -> float:
    """Mean batch-1 latency over ``n`` test images after 3 warm-up calls: decoded image in memory ->
    resize + normalise + forward + map upsampling."""
    import torch

    from anomap.data.dataset import test_samples
    from anomap.data.images import load_image

    samples = test_samples(data)
    rng = np.random.default_rng(0)
    picks = [samples[i] for i in rng.choice(len(samples), size=min(n, len(samples)), replace=False)]
    imgs = [load_image(s.path, channels=det.channels) for s in picks]
    with torch.no_grad():
        for im in imgs[:3]:
            det.predict(im)
        t1 = time.perf_counter()
        for im in imgs:
            det.predict(im)
        return 1000 * (time.perf_counter() - t1) / len(imgs)


def _summary_meta(data: str, method: str, metrics: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    keys = ("image_auroc", "pixel_auroc", "aupro")
    return {"dataset": Path(data).name, "method": method, "exact": {k: metrics.get(k) for k in keys},
            "exact_max_error": {k: info.get(f"{k}_max_error") for k in keys[1:]}}


def row(rec: dict, label: str = "") -> str:
    m = rec["metrics"]
    info = rec["info"]
    size = shape_label(*(info.get("work_shape") or (rec["image_size"], rec["image_size"])))  # aspect=fit: HxW
    steps = sum(info.get("steps", {}).values()) if isinstance(info.get("steps"), dict) else info.get("steps")
    sets = " ".join(rec.get("sets", []))
    notes = "; ".join(x for x in dict.fromkeys((sets, label)) if x)  # a label that repeats the --set: once
    promise = (f" (promise <={info['promised_fpr']:.3f}, 95% <={info['fpr_upper95']:.3f})"  # test FPR beside it
               if info.get("promised_fpr") is not None and info.get("fpr_upper95") is not None else "")
    return (f"| {rec['dataset']} | {rec['method']} | {_fmt(m['image_auroc'])} | {_fmt(m['pixel_auroc'])} | "
            f"{_fmt(m['aupro'])} | {_fmt(m['image_f1max'])} | {_fmt(m['test_fpr'], 2)}{promise} / "
            f"{_fmt(m['test_recall'], 2)} "
            f"| {rec['fit_seconds']:.1f} | {rec['ms_per_image_bs1']:.1f} | {rec['peak_rss_mb']:.0f} | "
            f"{size} | {steps} ({info.get('stopped_by')}) | {notes} |")


def run_bench(datas: list[str], methods: list[str], sets: list[str], out: Path, runs_dir: Path,
              max_minutes: float | None = None, label: str = "") -> int:
    """Run every pair in a subprocess; append one Markdown row per pair and the suite block to ``out``."""
    sets = list(sets)
    if max_minutes is not None:
        sets.append(f"max_train_seconds={max_minutes * 60:g}")
    lines = []
    done: list[Path] = []
    failed = 0
    for data in datas:
        for method in methods:
            run_dir = runs_dir / f"{Path(data).name}-{method}"
            js = run_dir / "bench.json"
            run_dir.mkdir(parents=True, exist_ok=True)
            js.unlink(missing_ok=True)  # a failed run must not leave the previous record behind
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
            done.append(run_dir)
    if lines:
        block = _suite_lines(done, runs_dir / "suite.json")
        print("\n" + "\n".join(block), flush=True)
        _append(out, lines, _cmd_line(), after=block)
    return 1 if failed else 0


def _cmd_line() -> str:
    return "anomap bench " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 2 else ""


def _suite_lines(run_dirs: list[Path], json_out: Path, resamples: int = RESAMPLES, seed: int = 0) -> list[str]:
    """The suite block of these runs (Markdown lines), its figures written to ``json_out``."""
    stats = suite_for_runs([load_run(d) for d in run_dirs], resamples, seed)
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(stats, indent=2))
    return suite_block(stats)


def run_suite(runs_dir: Path, out: Path, resamples: int = RESAMPLES, seed: int = 0) -> int:
    """``anomap bench --suite RUNS``: the suite block of every run already in a runs folder."""
    dirs = [r.folder for r in load_runs(runs_dir)]
    block = _suite_lines(dirs, runs_dir / "suite.json", resamples, seed)
    print("\n".join(block))
    _append_text(out, _cmd_line(), block)
    return 0


def run_compare(runs_a: Path, runs_b: Path, out: Path, json_out: Path | None = None,
                methods: tuple[str | None, str | None] = (None, None), resamples: int = RESAMPLES,
                seed: int = 0) -> int:
    """``anomap bench --compare A B``: the paired comparison, printed, appended to ``out``, and as JSON."""
    res = compare_folders(runs_a, runs_b, methods, resamples, seed)
    lines = compare_markdown(res)
    print("\n".join(lines))
    _append_text(out, _cmd_line(), lines)
    json_out = json_out or out.parent / f"compare-{runs_a.resolve().name}-vs-{runs_b.resolve().name}.json"
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(res, indent=2))
    print(f"bench: comparison written to {json_out}")
    return 0


def _append(out: Path, lines: list[str], cmd_line: str, after: list[str] | None = None) -> None:
    """Append a block to ``out``: the command line, machine and date, the table of ``lines``, then ``after``."""
    _append_text(out, cmd_line, [HEADER, SEP, *lines, "", *(after or [])])


def _append_text(out: Path, cmd_line: str, body: list[str]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    text = out.read_text() if out.exists() else "# Benchmarks\n"
    block = [f"\n`{cmd_line}` on {machine()}, {dt.date.today().isoformat()}:\n", *body]
    out.write_text(text.rstrip("\n") + "\n" + "\n".join(block).rstrip("\n") + "\n")


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
