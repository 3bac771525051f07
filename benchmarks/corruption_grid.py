"""Draw a grid of synthetic anomalies: rows are original, corrupted and mask, for 8 examples.

Usage:
    python benchmarks/corruption_grid.py                       # the demo category, preset ssl_ae
    python benchmarks/corruption_grid.py --data /path/to/mvtec/bottle --preset isstad --out /tmp/g.png

``--data`` is a folder of images or an MVTec-style category (its ``train/good`` is used). The mask row
shows the mask in white over the dimmed corrupted image, so the mask can be checked against the change.
Also prints the mean time per ``corrupt`` call.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from anomap.data.corruption import PRESETS, corrupt, make_grid
from anomap.data.demo import build_demo

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def load_images(folder: Path, size: int, limit: int) -> np.ndarray:
    """Up to ``limit`` images of ``folder`` (or of its ``train/good``) as uint8 (N, size, size, 3)."""
    if (folder / "train" / "good").is_dir():
        folder = folder / "train" / "good"
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not files:
        raise SystemExit(f"{folder}: no images found. Fix: pass a folder of images or an MVTec category.")
    images = [
        np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
        for p in files
    ]
    return np.stack(images)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, corrupt 8 images and write the grid PNG."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None, help="image folder or MVTec category (default: demo)")
    ap.add_argument("--preset", default="ssl_ae", choices=sorted(PRESETS))
    ap.add_argument("--size", type=int, default=128, help="images are resized to size x size")
    ap.add_argument("--n", type=int, default=8, help="number of examples (columns)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("docs/img/corruption_grid.png"))
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        data = (
            args.data
            if args.data is not None
            else build_demo(Path(tmp) / "demo", n_test_good=0, n_per_defect=0)
        )
        pool = load_images(data, args.size, limit=64)
    cfg = PRESETS[args.preset]
    rng = np.random.default_rng(args.seed)
    idx = rng.choice(len(pool), size=min(args.n, len(pool)), replace=False)
    rows: list[list[np.ndarray]] = [[], [], []]
    for i in idx:
        image = pool[i]
        corrupted, mask = corrupt(image, rng, cfg, pool)
        overlay = (corrupted.astype(np.float32) * 0.35).astype(np.uint8)
        overlay[mask > 0] = 255
        rows[0].append(image)
        rows[1].append(corrupted)
        rows[2].append(overlay)
    grid = make_grid(rows[0] + rows[1] + rows[2], ncol=len(idx))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(args.out)

    t0 = time.perf_counter()
    reps = 200
    for k in range(reps):
        corrupt(pool[k % len(pool)], rng, cfg, pool)
    ms = (time.perf_counter() - t0) / reps * 1000
    print(
        f"wrote {args.out} ({args.preset}, {len(idx)} examples, {args.size} px); corrupt: {ms:.2f} ms/image"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
