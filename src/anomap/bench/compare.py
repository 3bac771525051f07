"""``anomap bench --compare RUNS_A RUNS_B``: is B a better method default than A on the dev suite?

For each dataset run in both folders, the difference B - A of image AUROC, pixel AUROC and AUPRO
with a **paired** bootstrap 95% interval: A and B are scored on the same resamples of the test
images (the same draws, image by image), so what both find hard or easy cancels out of the difference
(:mod:`anomap.bench.suite` describes the resampling). The suite-mean difference is the mean over
datasets, its interval over the mean of each resample.

The adoption rule (docs/protocol.md, "Choosing a method default"), per metric: **adopt** when the
suite-mean difference is above 0 and no dataset drops beyond its interval (no dataset's interval
lies wholly below 0, i.e. its upper end below 0); otherwise **keep** A.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from anomap.bench.suite import NAMES, Run, cell, draws, load_runs
from anomap.errors import DataError
from anomap.metrics.bootstrap import METRICS, RESAMPLES, dataset_rng, interval, stratified_weights


def _by_dataset(runs: list[Run], method: str | None, folder: Path) -> dict[str, Run]:
    """One run per dataset, of ``method`` when given."""
    out: dict[str, Run] = {}
    for r in runs:
        if method is not None and r.method != method:
            continue
        if r.dataset in out:
            raise DataError(f"has runs of {out[r.dataset].method} and {r.method} on {r.dataset}.", path=folder,
                            fix="say which to compare: --method A_METHOD B_METHOD")
        out[r.dataset] = r
    if not out:
        raise DataError(f"holds no {method} runs." if method else "holds no runs.", path=folder,
                        fix="check --method and the runs folder")
    return out


def _pair(a: Run, b: Run, resamples: int, seed: int) -> dict[str, Any]:
    """Differences B - A on one dataset, with paired intervals and the binning bound of the difference."""
    if a.summaries.names.shape != b.summaries.names.shape or not np.array_equal(a.summaries.names, b.summaries.names):
        raise DataError(f"{a.dataset}: runs A and B scored different test images.", path=b.folder,
                        fix="compare runs of the same dataset folder")
    w = stratified_weights(a.summaries.labels, resamples, dataset_rng(a.dataset, seed))
    da, db = draws(a, weights=w), draws(b, weights=w)
    out: dict[str, Any] = {"method_a": a.method, "method_b": b.method, "n_test": a.summaries.n, "_draws": {}}
    for m in METRICS:
        pa, pb = a.point(m), b.point(m)
        diff = db[m] - da[m]
        lo, hi = interval(diff) if pa is not None and pb is not None else (None, None)
        bound = 0.0
        if m != "image_auroc":
            both = da[f"{m}_max_error"] + db[f"{m}_max_error"]
            bound = float(np.nanmax(both)) if np.isfinite(both).any() else 0.0
        out[m] = {"a": pa, "b": pb, "value": None if pa is None or pb is None else pb - pa, "lo": lo, "hi": hi,
                  "binning_max_error": bound}
        out["_draws"][m] = diff
    return out


def _verdict(metric: str, suite: dict[str, Any], per: dict[str, Any]) -> dict[str, str]:
    value = suite["value"]
    if value is None:
        return {"verdict": "n/a", "reason": f"{NAMES[metric]} is undefined on some dataset"}
    drops = [ds for ds, p in per.items() if p[metric]["hi"] is not None and p[metric]["hi"] < 0]
    if value > 0 and not drops:
        return {"verdict": "adopt", "reason": f"suite mean {value:+.4f} > 0 and no dataset drops beyond its interval"}
    why = [] if value > 0 else [f"suite mean {value:+.4f} is not above 0"]
    why += [f"{ds} drops ({cell(per[ds][metric], 4, sign=True)})" for ds in drops]
    return {"verdict": "keep", "reason": "; ".join(why)}


def compare_runs(runs_a: list[Run], runs_b: list[Run], folder_a: Path, folder_b: Path,
                 methods: tuple[str | None, str | None] = (None, None), resamples: int = RESAMPLES,
                 seed: int = 0) -> dict[str, Any]:
    """The paired comparison of B against A over the datasets run in both (see the module docstring).

    Raises:
        DataError: no dataset in common, several methods per dataset without ``methods``, or different
            test images for a dataset.
    """
    a_sets = _by_dataset(runs_a, methods[0], folder_a)
    b_sets = _by_dataset(runs_b, methods[1], folder_b)
    common = sorted(set(a_sets) & set(b_sets))
    if not common:
        raise DataError(f"has no dataset in common with {folder_a}.", path=folder_b,
                        fix="bench both on the same dev datasets")
    per = {ds: _pair(a_sets[ds], b_sets[ds], resamples, seed) for ds in common}
    suite: dict[str, Any] = {}
    for m in METRICS:
        values = [p[m]["value"] for p in per.values()]
        if any(v is None for v in values):
            suite[m] = {"value": None, "lo": None, "hi": None}
            continue
        lo, hi = interval(np.mean(np.stack([p["_draws"][m] for p in per.values()]), axis=0))
        suite[m] = {"value": float(np.mean(values)), "lo": lo, "hi": hi}
    for p in per.values():
        del p["_draws"]
    return {"a": str(folder_a), "b": str(folder_b), "resamples": int(resamples), "seed": int(seed),
            "datasets": per, "suite": suite, "verdicts": {m: _verdict(m, suite[m], per) for m in METRICS},
            "only_in_a": sorted(set(a_sets) - set(b_sets)), "only_in_b": sorted(set(b_sets) - set(a_sets))}


def compare_markdown(res: dict[str, Any]) -> list[str]:
    """The comparison as Markdown lines: a table of differences, then one verdict line per metric."""
    lines = [f"B - A with paired bootstrap 95% intervals (A: `{res['a']}`, B: `{res['b']}`; {res['resamples']} "
             f"resamples of the test images within each dataset, stratified by label, seed {res['seed']}):", "",
             "| dataset | A → B | test images | " + " | ".join(f"Δ {NAMES[m]}" for m in METRICS) + " |",
             "|" + "---|" * (3 + len(METRICS))]
    for ds, p in res["datasets"].items():
        lines.append(f"| {ds} | {p['method_a']} → {p['method_b']} | {p['n_test']} | "
                     + " | ".join(cell(p[m], 4, sign=True) for m in METRICS) + " |")
    lines.append(f"| **suite mean ({len(res['datasets'])})** | | | "
                 + " | ".join(f"**{cell(res['suite'][m], 4, sign=True)}**" for m in METRICS) + " |")
    lines.append("")
    for m in METRICS:
        v = res["verdicts"][m]
        lines.append(f"- {NAMES[m]}: **{v['verdict']}** ({v['reason']})")
    worst = {m: max(p[m]["binning_max_error"] for p in res["datasets"].values()) for m in ("pixel_auroc", "aupro")}
    notes = [f"binned pixel metrics: each difference is within {worst['pixel_auroc']:.1e} (pixel AUROC) and "
             f"{worst['aupro']:.1e} (AUPRO) of the exact one"]
    for side in ("a", "b"):
        if res[f"only_in_{side}"]:
            notes.append(f"only in {side.upper()}, not compared: {', '.join(res[f'only_in_{side}'])}")
    lines += ["", "; ".join(notes) + ".", ""]
    return lines


def compare_folders(folder_a: str | Path, folder_b: str | Path, methods: tuple[str | None, str | None] = (None, None),
                    resamples: int = RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """:func:`compare_runs` on two bench runs folders."""
    fa, fb = Path(folder_a), Path(folder_b)
    return compare_runs(load_runs(fa), load_runs(fb), fa, fb, methods, resamples, seed)
