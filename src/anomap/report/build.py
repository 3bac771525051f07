"""Evaluate-and-render glue: pick example images, score them, write the HTML report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from anomap.data.images import image_size, load_image, load_mask
from anomap.report.html import Example, render_report, select_examples
from anomap.types import EvalResult


def examples_for(det: Any, result: EvalResult, k: int = 6) -> dict[str, list[Example]]:
    """Score the selected example images again to get their maps at the image's own resolution."""
    groups = select_examples(result.rows, k=k)
    masks = {}
    for smp_row in result.rows:
        masks[smp_row["path"]] = smp_row.get("mask_path")
    out: dict[str, list[Example]] = {}
    for title, rows in groups.items():
        cards = []
        for row in rows:
            path = Path(row["path"])
            img = load_image(path, channels=det.channels)
            res = det.predict(path)
            mask_path = masks.get(row["path"])
            mask = load_mask(mask_path, size=image_size(path)) if mask_path else None
            cards.append(Example(title=path.name, image=img, amap=np.asarray(res.anomaly_map), mask=mask,
                                 score=float(row["score"]), label=int(row["label"]),
                                 defect_type=row["defect_type"], path=str(path)))
        out[title] = cards
    return out


def write_report(det: Any, result: EvalResult, out_path: str | Path, k: int = 6) -> Path:
    """Render ``result`` with example overlays to one self-contained HTML file."""
    cal = det.calibration
    return render_report(result, examples_for(det, result, k), out_path,
                         title=f"anomap report: {det.method_name} on {Path(result.info.get('dataset', '')).name}",
                         vmin=cal.map_low, vmax=cal.map_scale)
