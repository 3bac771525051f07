"""Operator feedback on a real dataset: the false alarms among the test normals, half of them confirmed as
normal and folded in by ``anomap update``; what happens to them, to the other half, to the held-out normals'
false-alarm rate, to the defects and to the image AUROC (issue 22's figure).

    python benchmarks/feedback_update.py --data ../shared/data/bsdata_pitting --seeds 0 1 2

gtrans with ``memory=only`` and ``memory_pool_pad=zeros`` (no student is trained, so the fit is cheap) is
fitted once on ``train/good``; the test images are scored; the test normals above the threshold (false
alarms) are split at random (``--seeds``) into half A, stored in a :class:`anomap.feedback.FeedbackStore`
as ``normal`` and folded in with :func:`anomap.update.update_model` (the code of ``anomap update``), and half
B, never fed back. Half A's images are in the memory after the update, so the honest figures are those of
half B, of the test normals not fed back (A left out) and of the AUROC without A.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import anomap
from anomap.config import parse_overrides
from anomap.data.dataset import test_samples
from anomap.feedback import FeedbackStore, model_hash
from anomap.metrics.roc import auroc
from anomap.update import update_model

BASE = {"memory": "only", "memory_pool_pad": "zeros"}


def _scores(det: anomap.Detector, paths: list[Path]) -> np.ndarray:
    return np.array([r.score for r in det.predict(paths)], dtype=np.float64)


def _rows(det: anomap.Detector) -> int | None:
    memory = getattr(det.model, "memory", None)
    return None if memory is None else len(memory)


def _frac(flags: np.ndarray) -> str:
    return f"{int(flags.sum())}/{len(flags)}" if len(flags) else "0/0"


def one_split(work: Path, model: Path, data: Path, paths: list[Path], labels: np.ndarray, before: np.ndarray,
              t0: float, seed: int) -> dict[str, Any]:
    """Feed back half A of the false alarms (drawn with ``seed``), update, and measure before -> after."""
    alarms = np.flatnonzero((labels == 0) & (before > t0))
    perm = np.random.default_rng(seed).permutation(alarms)
    half_a, half_b = np.sort(perm[: (len(perm) + 1) // 2]), np.sort(perm[(len(perm) + 1) // 2:])
    folder = work / f"feedback-{seed}"
    shutil.rmtree(folder, ignore_errors=True)
    store, digest = FeedbackStore(folder), model_hash(model)
    for i in half_a:
        store.add(paths[i].read_bytes(), "normal", label=paths[i].name, model_sha256=digest, score=float(before[i]))
    out = work / f"updated-{seed}.safetensors"
    t = time.perf_counter()
    report = update_model(model, folder, out, data=data, progress=False)
    seconds = time.perf_counter() - t
    new = anomap.load(out)
    after, t1 = _scores(new, paths), float(new.calibration.threshold or 0.0)
    kept = np.setdiff1d(np.arange(len(paths)), half_a)  # every test image but half A
    normal_kept = kept[labels[kept] == 0]
    held = report["heldout"]
    return {
        "seed": seed, "n_alarms": len(alarms), "n_a": len(half_a), "n_b": len(half_b),
        "threshold": [t0, t1], "update_seconds": round(seconds, 1),
        "a_above": [_frac(before[half_a] > t0), _frac(after[half_a] > t1)],
        "b_above": [_frac(before[half_b] > t0), _frac(after[half_b] > t1)],
        "heldout_above": [f"{held['above_before']}/{held['n']}", f"{held['above_after']}/{held['n']}"],
        "target_fpr": report["calibration"]["target_fpr"]["after"],
        "promised_fpr": report["calibration"]["promised_fpr"]["after"],
        "test_normals_not_fed_above": [_frac(before[normal_kept] > t0), _frac(after[normal_kept] > t1)],
        "defects_flagged": [_frac(before[labels == 1] > t0), _frac(after[labels == 1] > t1)],
        "auroc": [auroc(before, labels), auroc(after, labels)],
        "auroc_without_a": [auroc(before[kept], labels[kept]), auroc(after[kept], labels[kept])],
        "memory_rows": [_rows(anomap.load(model)), _rows(new)],
        "rows": [{"file": str(paths[i].relative_to(data)), "half": "A" if i in set(half_a) else "B",
                  "score_before": float(before[i]), "score_after": float(after[i])} for i in alarms],
        "lost_defects": [{"file": str(paths[i].relative_to(data)), "score_before": float(before[i]),
                          "score_after": float(after[i])}
                         for i in np.flatnonzero((labels == 1) & (before > t0) & (after <= t1))],
    }


def table(name: str, results: list[dict[str, Any]]) -> str:
    head = ("| dataset | seed | false alarms (A fed back / B not) | threshold | A above threshold | B above threshold "
            "| held-out normals above (target, promise) | test normals not fed back above | defects flagged "
            "| image AUROC | AUROC without A | update s |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in results:
        def arrow(key: str, fmt: str = "{}", r: dict[str, Any] = r) -> str:
            return f"{fmt.format(r[key][0])} → {fmt.format(r[key][1])}"

        promise = "" if r["promised_fpr"] is None else f", ≤ {100 * r['promised_fpr']:.1f}%"
        lines.append(
            f"| {name} | {r['seed']} | {r['n_alarms']} ({r['n_a']} / {r['n_b']}) | {arrow('threshold', '{:.4g}')} "
            f"| {arrow('a_above')} | {arrow('b_above')} | {arrow('heldout_above')} ({100 * r['target_fpr']:.0f}%"
            f"{promise}) | {arrow('test_normals_not_fed_above')} | {arrow('defects_flagged')} "
            f"| {arrow('auroc', '{:.3f}')} | {arrow('auroc_without_a', '{:.3f}')} | {r['update_seconds']} |")
    return "\n".join(lines)


def _version() -> str:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=False).stdout.strip()
    except OSError:
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="a category folder (MVTec layout)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of the A/B split (default 0)")
    ap.add_argument("--set", nargs="+", default=[], help="more gtrans config values, key=value")
    ap.add_argument("--work", type=Path, help="folder for the models and feedback (default: a temporary one)")
    ap.add_argument("--json", type=Path, help="write every figure (and each false alarm's scores) here")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="feedback-update-"))
    work.mkdir(parents=True, exist_ok=True)
    cfg = {**BASE, **parse_overrides(args.set, prefix="gtrans")}
    t = time.perf_counter()
    det = anomap.create("gtrans", **cfg).fit(args.data, out=work / "model.safetensors", progress=False)
    fit_s = time.perf_counter() - t
    samples = test_samples(args.data)
    paths, labels = [s.path for s in samples], np.array([s.label for s in samples])
    before, t0 = _scores(det, paths), float(det.calibration.threshold or 0.0)
    results = [one_split(work, work / "model.safetensors", args.data, paths, labels, before, t0, seed)
               for seed in args.seeds]
    print(f"gtrans {cfg}; fit {fit_s:.1f} s ({det.info['n_fit']} fit, {det.info['n_heldout']} held out); "
          f"{len(paths)} test images; code {_version()}\n")
    print(table(args.data.name, results))
    if args.json:
        args.json.write_text(json.dumps({"dataset": str(args.data), "config": cfg, "fit_seconds": fit_s,
                                         "results": results}, indent=1) + "\n")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
