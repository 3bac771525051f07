"""The dev-suite view of bench runs: the mean over datasets of each metric with a bootstrap 95% interval.

A bench run folder (``runs/<tag>/<dataset>-<method>/``) holds ``bench.json`` and ``summaries.npz``
(:class:`anomap.metrics.bootstrap.ImageSummaries`). For each dataset the test images are resampled
with replacement, good and defective apart (each resample keeps the class sizes), ``RESAMPLES`` times
from a generator seeded by the seed and the dataset's name (:func:`~anomap.metrics.bootstrap.dataset_rng`),
so every bench of the same dataset draws the same resamples. Each resample of the suite is the mean
over datasets of that resample's metric; the interval is the 2.5th to 97.5th percentile of those
means (percentile bootstrap). Point values are the exact metrics of the full test sets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from anomap.errors import DataError
from anomap.metrics.bootstrap import METRICS, RESAMPLES, ImageSummaries, dataset_rng, interval, stratified_weights

NAMES = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "aupro": "AUPRO@0.3"}
SUMMARIES = "summaries.npz"


@dataclass
class Run:
    """One (dataset, method) bench run: its folder, its record and its per-image summaries."""

    folder: Path
    dataset: str
    method: str
    summaries: ImageSummaries

    def point(self, metric: str) -> float | None:
        return self.summaries.point(metric)


def load_run(folder: str | Path) -> Run:
    """A run folder with ``bench.json`` and ``summaries.npz``.

    Raises:
        DataError: a file is missing or unreadable.
    """
    folder = Path(folder)
    try:
        rec = json.loads((folder / "bench.json").read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"is not a bench run folder ({type(e).__name__}: bench.json).", path=folder,
                        fix="give folders made by `anomap bench` (runs/<tag>/<dataset>-<method>/)") from None
    s = ImageSummaries.load(folder / SUMMARIES)
    return Run(folder, str(rec.get("dataset", s.meta.get("dataset", folder.name))),
               str(rec.get("method", s.meta.get("method", ""))), s)


def load_runs(folder: str | Path) -> list[Run]:
    """Every run under a bench runs folder (sub-folders with a ``bench.json``), sorted by dataset, method.

    Raises:
        DataError: the folder holds no run.
    """
    folder = Path(folder)
    dirs = sorted(p.parent for p in folder.glob("*/bench.json")) if folder.is_dir() else []
    if not dirs:
        raise DataError("holds no bench runs (no */bench.json).", path=folder,
                        fix="give the --runs-dir of an `anomap bench` (e.g. runs/bench)")
    return sorted((load_run(d) for d in dirs), key=lambda r: (r.dataset, r.method))


def draws(run: Run, resamples: int = RESAMPLES, seed: int = 0,
          weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The metrics of ``resamples`` stratified resamples of the run's test images (or of ``weights``)."""
    if weights is None:
        weights = stratified_weights(run.summaries.labels, resamples, dataset_rng(run.dataset, seed))
    return run.summaries.metrics(weights)


def _stat(point: float | None, values: np.ndarray) -> dict[str, float | None]:
    lo, hi = interval(values) if point is not None else (None, None)
    return {"value": point, "lo": lo, "hi": hi}


def suite_stats(runs: list[Run], resamples: int = RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """Per dataset and suite-mean values with 95% intervals, for runs of one method (one per dataset).

    A metric that is undefined on any dataset (no defect masks) has no suite mean (None).
    """
    per: dict[str, Any] = {}
    means: dict[str, list[np.ndarray]] = {m: [] for m in METRICS}
    points: dict[str, list[float | None]] = {m: [] for m in METRICS}
    bounds = {"pixel_auroc": 0.0, "aupro": 0.0}
    for run in runs:
        d = draws(run, resamples, seed)
        per[run.dataset] = {"n_test": run.summaries.n, **{m: _stat(run.point(m), d[m]) for m in METRICS}}
        for m in METRICS:
            means[m].append(d[m])
            points[m].append(run.point(m))
        for m in bounds:
            b = np.asarray(d[f"{m}_max_error"])
            if np.isfinite(b).any():
                bounds[m] = max(bounds[m], float(np.nanmax(b)))
    suite: dict[str, Any] = {}
    for m in METRICS:
        pts = points[m]
        if not pts or any(p is None for p in pts):
            suite[m] = {"value": None, "lo": None, "hi": None}
            continue
        suite[m] = _stat(float(np.mean([p for p in pts if p is not None])), np.mean(np.stack(means[m]), axis=0))
    return {"datasets": per, "suite": suite, "n_datasets": len(runs), "resamples": int(resamples), "seed": int(seed),
            "bins": max((r.summaries.edges.size for r in runs), default=0), "binning_max_error": bounds}


def cell(s: dict[str, float | None], nd: int = 3, sign: bool = False) -> str:
    if s.get("value") is None:
        return "n/a"
    f = f"{{:+.{nd}f}}" if sign else f"{{:.{nd}f}}"
    if s.get("lo") is None:
        return f.format(s["value"])
    return f"{f.format(s['value'])} [{f.format(s['lo'])}, {f.format(s['hi'])}]"


def suite_block(stats: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown lines: one row per (method, dataset) with 95% intervals, then each method's suite mean."""
    any_stats = next(iter(stats.values()))
    lines = [f"Suite mean over datasets with 95% bootstrap intervals ({any_stats['resamples']} resamples of the "
             f"test images within each dataset, stratified by label, seed {any_stats['seed']}; the suite's "
             "interval is over the mean of each resample):", "",
             "| method | dataset | test images | " + " | ".join(NAMES[m] for m in METRICS) + " |",
             "|" + "---|" * (3 + len(METRICS))]
    for method, st in stats.items():
        for ds, row in st["datasets"].items():
            lines.append(f"| {method} | {ds} | {row['n_test']} | " + " | ".join(cell(row[m]) for m in METRICS) + " |")
        lines.append(f"| {method} | **suite mean ({st['n_datasets']})** | | "
                     + " | ".join(f"**{cell(st['suite'][m])}**" for m in METRICS) + " |")
    worst = {m: max(st["binning_max_error"][m] for st in stats.values()) for m in ("pixel_auroc", "aupro")}
    bins = max(st["bins"] for st in stats.values())
    lines += ["", f"Pixel metrics of the resamples are binned (at most {bins} bins): within {worst['pixel_auroc']:.1e} "
              f"(pixel AUROC) and {worst['aupro']:.1e} (AUPRO) of the exact values, the largest bound over "
              "datasets and resamples.", ""]
    return lines


def suite_for_runs(runs: list[Run], resamples: int = RESAMPLES, seed: int = 0) -> dict[str, dict[str, Any]]:
    """:func:`suite_stats` per method, in the order the methods first appear.

    Raises:
        DataError: a method has two runs of the same dataset.
    """
    by_method: dict[str, list[Run]] = {}
    for r in runs:
        group = by_method.setdefault(r.method, [])
        if any(o.dataset == r.dataset for o in group):
            raise DataError(f"has two {r.method} runs of dataset {r.dataset}.", path=r.folder,
                            fix="keep one run per dataset and method in a runs folder")
        group.append(r)
    return {m: suite_stats(rs, resamples, seed) for m, rs in by_method.items()}
