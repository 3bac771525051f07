"""Scoring ablations on saved models: `anomap evaluate --set ...` per variant, one Markdown row each.

Each variant changes only scoring settings of the same trained weights; the model is recalibrated on
its own held-out normal images (Detector.rescore), never on test data.

Usage:
    python benchmarks/ablate.py --model runs/b2/mpdd_metal_plate-isstad/model.safetensors \
        --data ../shared/data/mpdd_metal_plate --variant "stage 1 alone" score_model=stage1 pixel_map=recon \
        --variant "probability alone" pixel_map=prob
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

import anomap
from anomap.config import parse_overrides


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--variant", nargs="+", action="append", required=True, metavar=("LABEL", "KEY=VALUE"),
                    help="a label, then the scoring overrides (none = the model as saved)")
    ap.add_argument("--out", help="Markdown file to append the rows to")
    args = ap.parse_args(argv)
    rows = []
    for label, *sets in args.variant:
        det = anomap.load(args.model)
        overrides = parse_overrides(sets, prefix=det.method_name)
        det.rescore(overrides, args.data)
        t0 = time.perf_counter()
        res = anomap.evaluate(det, args.data, progress=False)
        m = res.metrics
        rows.append(f"| {Path(args.data).name} | {det.method_name} | {label} | "
                    f"{' '.join(sets) or '(as trained)'} | {m['image_auroc']:.3f} | {m['pixel_auroc']:.3f} | "
                    f"{m['aupro']:.3f} | {time.perf_counter() - t0:.0f} |")
        print(rows[-1], flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(f"\n<!-- {dt.date.today()} python {' '.join(sys.argv)} -->\n" + "\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
