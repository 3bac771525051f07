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
from collections.abc import Iterator
from pathlib import Path

import numpy as np

import anomap
from anomap.config import parse_overrides
from anomap.data.transforms import load_stack
from anomap.errors import ConfigError

METRICS = ("image_auroc", "pixel_auroc", "aupro")  # the columns of a row, in order


def variant_parser(description: str) -> argparse.ArgumentParser:
    """--model, --data, repeated --variant LABEL KEY=VALUE..., --out (shared with synthetic_check.py)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="the folder the model was trained on")
    ap.add_argument("--variant", nargs="+", action="append", required=True, metavar=("LABEL", "KEY=VALUE"),
                    help="a label, then the scoring overrides (none = the model as saved)")
    ap.add_argument("--out", help="Markdown file to append the rows to")
    return ap


def rescored(args: argparse.Namespace) -> Iterator[tuple[str, list[str], anomap.Detector]]:
    """(label, KEY=VALUE list, the model re-scored and recalibrated on its held-out normals) per variant."""
    for label, *sets in args.variant:
        det = anomap.load(args.model)
        det.rescore(parse_overrides(sets, prefix=det.method_name), args.data)
        yield label, sets, det


def variant_row(data: str, det: anomap.Detector, label: str, sets: list[str], *cells: str) -> str:
    """One Markdown row: dataset, method, variant label, its settings, then ``cells``; also printed."""
    row = f"| {Path(data).name} | {det.method_name} | {label} | {' '.join(sets) or '(as trained)'} | " \
          + " | ".join(cells) + " |"
    print(row, flush=True)
    return row


def heldout_files(det: anomap.Detector, data: str) -> list[Path]:
    """The detector's held-out normal images in ``data``; exits if they are not there as trained."""
    try:
        return det.heldout_paths(data)
    except ConfigError as err:
        sys.exit(str(err))


def heldout_stack(det: anomap.Detector, data: str) -> np.ndarray:
    """The detector's held-out normal images in ``data`` at its working size; exits if they are not those."""
    return load_stack(heldout_files(det, data), det.config.work_hw, int(det.channels))


def append_rows(path: str | None, rows: list[str]) -> None:
    """Append Markdown rows to ``path`` under a comment with the date and the command line."""
    if path:
        with open(path, "a") as f:
            f.write(f"\n<!-- {dt.date.today()} python {' '.join(sys.argv)} -->\n" + "\n".join(rows) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = variant_parser(__doc__.splitlines()[0]).parse_args(argv)
    rows = []
    for label, sets, det in rescored(args):
        t0 = time.perf_counter()
        res = anomap.evaluate(det, args.data, progress=False)
        m = res.metrics
        rows.append(variant_row(args.data, det, label, sets, *(f"{m[k]:.3f}" for k in METRICS),
                                f"{time.perf_counter() - t0:.0f}"))
    append_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
