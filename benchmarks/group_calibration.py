"""The threshold's test false-alarm rate and recall for several ``calibration_groups`` on bench runs.

For each ``RUNS/<dataset>-gtrans_memory/`` of an ``anomap bench`` run, the saved model is re-scored with
each ``calibration_groups`` value (0: the held-out normals alone; K: also every fit image scored by a
memory without its k-means group; ``rK``: K groups drawn at random instead of by k-means, the control),
which recalibrates the threshold from normal images only. The test scores of ``summaries.npz`` do not
depend on the threshold, so the test false-alarm rate (good test images above it) and the recall
(defective ones above it) at each threshold come from them; beside them the 95 % bound the model
states (``fpr_upper95``). Prints a Markdown table and writes it as JSON (``--json``).

    python benchmarks/group_calibration.py runs/gmem --data ../shared/data --groups 0 4 8 16 r8
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import anomap
from anomap.bench.suite import SUMMARIES
from anomap.methods.gtrans import cross_fit
from anomap.metrics.bootstrap import ImageSummaries


def random_groups(points: np.ndarray, k: int, seed: int) -> np.ndarray:
    """K groups of (nearly) equal size drawn at random: the control for grouping by look."""
    return np.random.default_rng(seed).permutation(len(points)) % max(1, min(int(k), len(points)))


def measure(run: Path, data: str, groups: str) -> dict:
    """One (run, groups) cell: threshold, bound, test FPR, recall and the seconds the recalibration took."""
    k = int(groups.lstrip("r"))
    det = anomap.load(run / "model.safetensors")
    kmeans = cross_fit.kmeans_groups
    cross_fit.kmeans_groups = random_groups if groups.startswith("r") else kmeans
    try:
        t0 = time.perf_counter()
        det.rescore({"calibration_groups": k}, data)
        seconds = time.perf_counter() - t0
    finally:
        cross_fit.kmeans_groups = kmeans
    s = ImageSummaries.load(run / SUMMARIES)
    cal, good = det.calibration, s.labels == 0
    above = s.scores > cal.threshold
    return {"groups": groups, "threshold": cal.threshold, "n_scores": cal.n_scores,
            "fpr_upper95": cal.fpr_upper95, "test_fpr": float(above[good].mean()),
            "recall": float(above[~good].mean()), "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, help="an anomap bench runs folder of gtrans_memory runs")
    ap.add_argument("--data", type=Path, required=True, help="the folder holding the datasets by name")
    ap.add_argument("--groups", nargs="+", default=["0", "8"], help="calibration_groups values; rK: K at random")
    ap.add_argument("--json", type=Path, default=None, help="write the cells here")
    args = ap.parse_args()
    cells = []
    print("| dataset | groups | n scores | threshold | test FPR | 95% bound | inside | recall | s |\n"
          "|---|---|---|---|---|---|---|---|---|", flush=True)
    for run in sorted(p for p in args.runs.iterdir() if (p / "bench.json").is_file()):
        dataset = json.loads((run / "bench.json").read_text())["dataset"]
        for g in args.groups:
            c = {"dataset": dataset, **measure(run, str(args.data / dataset), g)}
            cells.append(c)
            print(f"| {dataset} | {g} | {c['n_scores']} | {c['threshold']:.4g} | {c['test_fpr']:.3f} | "
                  f"{c['fpr_upper95']:.3f} | {'yes' if c['test_fpr'] <= c['fpr_upper95'] else 'no'} | "
                  f"{c['recall']:.3f} | {c['seconds']:.0f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(cells, indent=1))


if __name__ == "__main__":
    main()
