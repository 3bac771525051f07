"""Re-score the models of a bench runs folder with other scoring settings, as a runs folder of its own.

Each ``RUNS_IN/<dataset>-<method>/model.safetensors`` is loaded, re-scored with ``--set`` (scoring keys
only, e.g. gtrans ``memory=off``; the detector recalibrates on its own held-out normals) and evaluated
like ``anomap bench`` does (``bench.json``, ``summaries.npz``, ``report.html``) into
``RUNS_OUT/<dataset>-<method>/``. The fit time is the original run's. So one training run per dataset
gives two rows whose test images pair up for ``anomap bench --compare RUNS_IN RUNS_OUT``.

    python benchmarks/rescore_runs.py runs/suite runs/suite-off --data ../shared/data --set memory=off
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import anomap
from anomap.bench.runner import record
from anomap.config import parse_overrides


def rescore_run(run_in: Path, run_out: Path, data_root: Path, sets: list[str]) -> dict:
    old = json.loads((run_in / "bench.json").read_text())
    det = anomap.load(run_in / "model.safetensors")
    data = str(data_root / old["dataset"])
    det.rescore(parse_overrides(sets, prefix=det.method_name), data)
    run_out.mkdir(parents=True, exist_ok=True)
    det.save(run_out / "model.safetensors")
    return record(det, data, old["method"], [*old.get("sets", []), *sets], float(old["fit_seconds"]),
                  run_out / "bench.json", run_out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs_in", type=Path)
    ap.add_argument("runs_out", type=Path)
    ap.add_argument("--data", type=Path, required=True, help="the folder holding the datasets by name")
    ap.add_argument("--set", nargs="+", default=[], help="scoring settings, key=value")
    args = ap.parse_args()
    for run_in in sorted(p for p in args.runs_in.iterdir() if (p / "bench.json").is_file()):
        rec = rescore_run(run_in, args.runs_out / run_in.name, args.data, args.set)
        m = rec["metrics"]
        print(f"{run_in.name}: {m['image_auroc']:.3f} / {m['pixel_auroc']:.3f} / {m['aupro']:.3f}", flush=True)


if __name__ == "__main__":
    main()
