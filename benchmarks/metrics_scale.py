"""Exact vs streaming pixel metrics at scale: values, error bounds, time and peak RSS.

Every measurement runs in a fresh child process, so its peak RSS (``ru_maxrss``) is its own. Maps are
generated a chunk at a time from a seed (smooth noise, brighter rectangles as defects in half the
images, heavy-tailed like squared reconstruction errors); the exact run has to hold them all, the
streaming run never does.

    nice -n 19 .venv/bin/python benchmarks/metrics_scale.py                    # 2,000 maps at 256x256
    nice -n 19 .venv/bin/python benchmarks/metrics_scale.py --sweep 500,1000,2000
    nice -n 19 .venv/bin/python benchmarks/metrics_scale.py --evaluate 300,1000   # anomap.evaluate end to end

Prints Markdown tables (paste them into a dated file of docs/experiments/ with the command, machine and date).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

CHUNK = 16


def _chunk(seed: int, start: int, k: int, size: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Maps and masks of images ``start .. start + k``; defects in the first half of the set."""
    rng = np.random.default_rng([seed, start])
    masks = np.zeros((k, size, size), dtype=bool)
    for j in range(k):
        if start + j < n // 2:
            for _ in range(rng.integers(1, 4)):
                y, x = rng.integers(0, size - size // 6, 2)
                h, w = rng.integers(2, size // 6, 2)
                masks[j, y:y + h, x:x + w] = True
    noise = rng.normal(size=masks.shape).astype(np.float32) + masks
    maps = np.exp(3.0 * ndimage.gaussian_filter(noise, sigma=(0, 2, 2))).astype(np.float32)
    return maps, masks


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def child_metrics(mode: str, n: int, size: int, seed: int) -> dict:
    from anomap.metrics.pro import aupro_exact
    from anomap.metrics.roc import pixel_auroc
    from anomap.metrics.streaming import MapSpool

    t0 = time.perf_counter()
    out: dict = {"mode": mode, "n": n, "size": size}
    if mode == "exact":
        maps = np.zeros((n, size, size), np.float32)
        masks = np.zeros((n, size, size), bool)
        for i in range(0, n, CHUNK):
            k = min(CHUNK, n - i)
            maps[i:i + k], masks[i:i + k] = _chunk(seed, i, k, size, n)
        out["pixel_auroc"] = pixel_auroc(maps, masks, exact_limit=maps.size)[0]
        out["aupro"] = aupro_exact(maps, masks)
        out["auroc_bound"] = out["aupro_bound"] = 0.0
    elif mode == "streaming":
        with tempfile.TemporaryDirectory(prefix="anomap-bench-") as tmp, MapSpool(tmp, size) as spool:
            for i in range(0, n, CHUNK):
                spool.add(*_chunk(seed, i, min(CHUNK, n - i), size, n))
            stream = spool.stream()
            out["pixel_auroc"], out["auroc_bound"], _ = stream.pixel_auroc()
            out["aupro"], out["aupro_bound"] = stream.aupro()
            out["bins"] = stream.bins
    else:  # "generate": only make the maps, one chunk at a time (the floor of the other two)
        for i in range(0, n, CHUNK):
            _chunk(seed, i, min(CHUNK, n - i), size, n)
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_mb"] = _peak_mb()
    return out


def _make_category(root: Path, n_test: int, size: int = 256) -> Path:
    """MVTec-layout folder: 16 training images, ``n_test`` test images (half with a square defect)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]

    def normal() -> np.ndarray:
        base = 120 + 60 * np.sin(xx / 9.0 + rng.uniform(0, 0.3)) * np.cos(yy / 13.0)
        return np.clip(base[..., None] + rng.normal(0, 4, (size, size, 3)), 0, 255).astype(np.uint8)

    for sub in ("train/good", "test/good", "test/spot", "ground_truth/spot"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(16):
        Image.fromarray(normal()).save(root / "train/good" / f"{i:05d}.png")
    for i in range(n_test):
        img = normal()
        if i % 2:
            Image.fromarray(img).save(root / "test/good" / f"{i:05d}.png")
            continue
        mask = np.zeros((size, size), np.uint8)
        y, x = rng.integers(8, size - 40, 2)
        img[y:y + 30, x:x + 30] = 255
        mask[y:y + 30, x:x + 30] = 255
        Image.fromarray(img).save(root / "test/spot" / f"{i:05d}.png")
        Image.fromarray(mask).save(root / "ground_truth/spot" / f"{i:05d}_mask.png")
    return root


def child_evaluate(data: str, model: str, pixel_mode: str) -> dict:
    import anomap

    det = anomap.load(model)
    t0 = time.perf_counter()
    res = anomap.evaluate(det, data, progress=False, pixel_mode=pixel_mode)
    return {"mode": res.info["pixel_metrics_mode"], "n": res.info["n_test"], "size": res.info["eval_size"],
            "pixel_auroc": res.metrics["pixel_auroc"], "aupro": res.metrics["aupro"],
            "auroc_bound": res.info.get("pixel_auroc_max_error"), "aupro_bound": res.info.get("aupro_max_error"),
            "seconds": time.perf_counter() - t0, "peak_rss_mb": _peak_mb()}


def _run_child(args: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--child", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"child {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _table(rows: list[dict], exact: dict[tuple[int, int], dict]) -> str:
    lines = [("| maps | size | mode | pixel AUROC | AUPRO@0.3 | abs. diff to exact (AUROC / AUPRO) | "
              "stated bound (AUROC / AUPRO) | seconds | peak RSS MB |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = exact.get((r["n"], r["size"]))
        if "pixel_auroc" not in r:
            vals, diff, bound = "-", "-", "-"
            pro = "-"
        else:
            vals, pro = f"{r['pixel_auroc']:.6f}", f"{r['aupro']:.6f}"
            diff = "-" if ref is None else (f"{abs(r['pixel_auroc'] - ref['pixel_auroc']):.1e} / "
                                            f"{abs(r['aupro'] - ref['aupro']):.1e}")
            bound = f"{r['auroc_bound']:.1e} / {r['aupro_bound']:.1e}"
        lines.append(f"| {r['n']} | {r['size']}² | {r['mode']} | {vals} | {pro} | {diff} | {bound} | "
                     f"{r['seconds']:.1f} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="maps in the exact-vs-streaming comparison")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sweep", default="", help="comma-separated map counts for a streaming-only RSS sweep")
    ap.add_argument("--evaluate", default="", help="comma-separated test-set sizes for anomap.evaluate runs")
    ap.add_argument("--no-exact", action="store_true", help="skip the exact run (it needs ~25 B per pixel)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        out = child_evaluate(*rest) if kind == "evaluate" else child_metrics(kind, *map(int, rest))
        print(json.dumps(out))
        return

    rows, exact = [], {}
    modes = ["generate", "streaming"] + ([] if args.no_exact else ["exact"])
    for mode in modes:
        r = _run_child([mode, str(args.n), str(args.size), str(args.seed)])
        rows.append(r)
        if mode == "exact":
            exact[(r["n"], r["size"])] = r
    for n in [int(v) for v in args.sweep.split(",") if v]:
        if n != args.n:
            rows.append(_run_child(["streaming", str(n), str(args.size), str(args.seed)]))
    print(f"Pixel metrics on generated maps (seed {args.seed}); 'generate' = making the maps only.\n")
    print(_table(rows, exact))

    if args.evaluate:
        import anomap

        print("\nanomap.evaluate end to end (tiny ssl_ae at 32 px, eval_size 256; torch is in every RSS).\n")
        ev_rows: list[dict] = []
        ev_exact: dict[tuple[int, int], dict] = {}
        with tempfile.TemporaryDirectory(prefix="anomap-bench-eval-") as tmp:
            for n in [int(v) for v in args.evaluate.split(",") if v]:
                data = _make_category(Path(tmp) / f"cat{n}", n)
                model = Path(tmp) / f"m{n}.safetensors"
                anomap.create("ssl_ae", image_size=32, width=8, max_steps=20, batch_size=4, device="cpu",
                              num_threads=1, min_heldout=3, checkpoint_every=0).fit(data, out=model, progress=False)
                for pm in ("streaming", "exact"):
                    r = _run_child(["evaluate", str(data), str(model), pm])
                    ev_rows.append(r)
                    if pm == "exact":
                        ev_exact[(r["n"], r["size"])] = r
        print(_table(ev_rows, ev_exact))


if __name__ == "__main__":
    main()
