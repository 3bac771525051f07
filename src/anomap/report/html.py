"""Self-contained HTML evaluation report: metrics, inline-SVG curves, per-defect AUROC and example heat maps.

The output is a single file with inline CSS, inline SVG plots and images embedded as PNG data URIs; it
references no external URL and contains no JavaScript, so it can be mailed or archived as is.
"""

from __future__ import annotations

import datetime as _dt
import html
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TypeGuard

import numpy as np

from anomap.report.overlay import colormap, downscale, heatmap_overlay, png_data_uri, side_by_side
from anomap.report.threshold import threshold_html
from anomap.types import EvalResult

_PANEL_SIDE = 224  # long side, in pixels, of each image / overlay panel embedded in an example card

GROUP_TOP_DEFECTS = "Highest-scored defects"
GROUP_MISSES = "Lowest-scored defects (hardest misses)"
GROUP_TOP_GOOD = "Highest-scored normal images (closest to false alarms)"

METRIC_NAMES = {
    "image_auroc": "Image AUROC",
    "pixel_auroc": "Pixel AUROC",
    "aupro": "AUPRO@0.3",
    "image_f1max": "Image F1max",
    "image_aupr": "Image AUPR",
    "test_fpr": "Test FPR at calibrated threshold",
    "test_recall": "Test recall at calibrated threshold",
}

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1200px;
padding:0 16px;color:#1d2330;background:#fff;line-height:1.4}
h1{margin:0 0 4px;font-size:26px}h2{margin:28px 0 10px;font-size:19px;border-bottom:1px solid #dde2ea;
padding-bottom:4px}
.info{color:#4a5466;font-size:14px}.info span{display:inline-block;margin-right:16px}
table{border-collapse:collapse;font-size:14px}td,th{padding:4px 10px;border-bottom:1px solid #e6e9ef;
text-align:left}th{background:#f3f5f8}td.num{text-align:right;font-variant-numeric:tabular-nums}
.plots{display:flex;flex-wrap:wrap;gap:16px}.plot{border:1px solid #e6e9ef;border-radius:6px;padding:6px}
.na{color:#8a93a3;font-style:italic}
.bar{background:#e9edf3;width:260px;height:12px;border-radius:3px}.bar div{background:#3b6fd8;height:12px;
border-radius:3px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:14px}
.card{border:1px solid #dde2ea;border-radius:6px;padding:8px;background:#fafbfc}
.card img{width:100%;height:auto;display:block;image-rendering:auto}
.card .t{font-weight:600;font-size:14px;word-break:break-all;margin-bottom:4px}
.card .m{font-size:13px;color:#4a5466;margin-top:4px}.cap{display:flex;font-size:11px;color:#8a93a3}
.cap span{flex:1;text-align:center}
.flag{color:#b3261e;font-weight:600}.ok{color:#1e7b34;font-weight:600}
details summary{cursor:pointer;font-weight:600;margin:8px 0}
.legend{font-size:13px;color:#4a5466;display:flex;align-items:center;gap:10px;flex-wrap:wrap}
footer{margin-top:32px;font-size:12px;color:#8a93a3}
"""


@dataclass
class Example:
    """One test image shown in an example card, with its anomaly map and (for defects) its mask."""

    title: str
    image: np.ndarray
    amap: np.ndarray
    mask: np.ndarray | None
    score: float
    label: int
    defect_type: str
    path: str


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _is_num(v: object) -> TypeGuard[int | float | np.integer | np.floating]:
    """A real number (Python or numpy), not a bool."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _fmt(v: object, spec: str = ".3f") -> str:
    """Format a number (None / NaN -> "n/a")."""
    if v is None or not _is_num(v) or not math.isfinite(float(v)):
        return "n/a"
    return format(float(v), spec)


def _fmt_value(v: object) -> str:
    """Human-readable text for an info value: numbers, sizes, dicts and lists (unescaped)."""
    if isinstance(v, bool) or v is None:
        return "n/a" if v is None else str(v)
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if _is_num(v):
        return _fmt(v, ".4g")
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt_value(x)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        if 1 < len(v) <= 3 and all(isinstance(x, (int, np.integer)) for x in v):
            return "x".join(str(int(x)) for x in v)
        return ", ".join(_fmt_value(x) for x in v)
    return str(v)


def _score_key(row: dict) -> float:
    s = row.get("score")
    return float(s) if _is_num(s) and math.isfinite(float(s)) else -math.inf


def select_examples(rows: list[dict], k: int = 6) -> dict[str, list[dict]]:
    """Pick the rows worth looking at: best-caught defects, hardest misses and near false alarms.

    Args:
        rows: ``EvalResult.rows`` dicts (path, defect_type, label, score, is_anomalous).
        k: how many rows per group.

    Returns:
        Ordered dict of group title -> rows: top-k defective by score (descending), bottom-k defective
        (ascending, lowest first) and top-k good images (descending).
    """
    k = max(int(k), 0)
    bad = [r for r in rows if int(r.get("label", 0)) == 1]
    good = [r for r in rows if int(r.get("label", 0)) == 0]
    bad_desc = sorted(bad, key=_score_key, reverse=True)
    return {
        GROUP_TOP_DEFECTS: bad_desc[:k],
        GROUP_MISSES: sorted(bad, key=_score_key)[:k],
        GROUP_TOP_GOOD: sorted(good, key=_score_key, reverse=True)[:k],
    }


def _clean_curve(xs: object, ys: object) -> tuple[np.ndarray, np.ndarray] | None:
    """Validate a curve: equal-length finite numeric lists with >= 2 points, sorted by x; else None."""
    try:
        x = np.asarray(xs, dtype=np.float64).ravel()
        y = np.asarray(ys, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        return None
    if x.size < 2 or x.size != y.size:
        return None
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 2:
        return None
    order = np.argsort(x, kind="stable")
    return x[order], y[order]


def _decimate(x: np.ndarray, y: np.ndarray, n: int = 600) -> tuple[np.ndarray, np.ndarray]:
    if x.size <= n:
        return x, y
    idx = np.unique(np.linspace(0, x.size - 1, n).round().astype(int))
    return x[idx], y[idx]


def _clip_x(x: np.ndarray, y: np.ndarray, xmax: float) -> tuple[np.ndarray, np.ndarray]:
    """Restrict a sorted curve to x <= xmax, interpolating the end point at xmax."""
    keep = x <= xmax
    if keep.all() or x[0] > xmax:
        return x[keep], y[keep]
    return np.append(x[keep], xmax), np.append(y[keep], np.interp(xmax, x, y))


def _trapz(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))


def _svg_plot(title: str, x: np.ndarray, y: np.ndarray, xmax: float, xlabel: str, ylabel: str,
              legend: str, diagonal: bool) -> str:
    """A small line plot with axes, ticks, grid, axis labels and a one-entry legend, as inline SVG."""
    w, h, ml, mr, mt, mb = 360, 300, 50, 14, 30, 46
    pw, ph = w - ml - mr, h - mt - mb

    def px(v: float) -> float:
        return ml + pw * v / xmax

    def py(v: float) -> float:
        return mt + ph * (1.0 - v)

    out = [(f'<svg width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
           f'font-family="sans-serif" font-size="11" role="img" aria-label="{_esc(title)}">'),
           f'<text x="{w / 2}" y="18" text-anchor="middle" font-size="14" font-weight="600">{_esc(title)}</text>']
    for i in range(6):
        xv, yv = xmax * i / 5, i / 5
        out.append(f'<line x1="{px(xv):.1f}" y1="{mt}" x2="{px(xv):.1f}" y2="{mt + ph}" stroke="#eef0f4"/>')
        out.append(f'<line x1="{ml}" y1="{py(yv):.1f}" x2="{ml + pw}" y2="{py(yv):.1f}" stroke="#eef0f4"/>')
        out.append(f'<line x1="{px(xv):.1f}" y1="{mt + ph}" x2="{px(xv):.1f}" y2="{mt + ph + 4}" stroke="#333"/>')
        out.append(f'<text x="{px(xv):.1f}" y="{mt + ph + 16}" text-anchor="middle">{xv:.2g}</text>')
        out.append(f'<line x1="{ml - 4}" y1="{py(yv):.1f}" x2="{ml}" y2="{py(yv):.1f}" stroke="#333"/>')
        out.append(f'<text x="{ml - 7}" y="{py(yv) + 4:.1f}" text-anchor="end">{yv:.1f}</text>')
    out.append(f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>')
    if diagonal:
        out.append(f'<line x1="{px(0)}" y1="{py(0)}" x2="{px(xmax):.1f}" y2="{py(min(xmax, 1.0)):.1f}" '
                   'stroke="#9aa3b2" stroke-dasharray="4 3"/>')
    pts = " ".join(f"{px(a):.1f},{py(b):.1f}" for a, b in zip(*_decimate(x, np.clip(y, 0, 1)), strict=True))
    out.append(f'<polyline points="{pts}" fill="none" stroke="#d0452b" stroke-width="2" '
               'stroke-linejoin="round"/>')
    lx, ly = ml + pw - 150, mt + ph - 30
    out.append(f'<rect x="{lx}" y="{ly}" width="142" height="22" fill="#fff" fill-opacity="0.85" stroke="#ccd"/>')
    out.append(f'<line x1="{lx + 8}" y1="{ly + 11}" x2="{lx + 28}" y2="{ly + 11}" stroke="#d0452b" '
               'stroke-width="2"/>')
    out.append(f'<text x="{lx + 34}" y="{ly + 15}">{_esc(legend)}</text>')
    out.append(f'<text x="{ml + pw / 2}" y="{h - 8}" text-anchor="middle" font-size="12">{_esc(xlabel)}</text>')
    out.append(f'<text transform="translate(14 {mt + ph / 2}) rotate(-90)" text-anchor="middle" '
               f'font-size="12">{_esc(ylabel)}</text></svg>')
    return "".join(out)


def _curve_panel(result: EvalResult, key: str, title: str, ykey: str, xmax: float, metric: str) -> str:
    curve = (result.curves or {}).get(key) or {}
    cleaned = _clean_curve(curve.get("fpr"), curve.get(ykey)) if isinstance(curve, dict) else None
    if cleaned is not None:
        cleaned = _clip_x(*cleaned, xmax)
    if cleaned is None or cleaned[0].size < 2:
        return f'<div class="plot"><b>{_esc(title)}</b><p class="na">n/a (no curve data)</p></div>'
    x, y = cleaned
    value = (result.metrics or {}).get(metric)
    if value is None or not _is_num(value):
        value = _trapz(x, y) / xmax
    name = METRIC_NAMES.get(metric, metric).replace("Image ", "").replace("Pixel ", "")
    ylabel = "per-region overlap (PRO)" if ykey == "pro" else "true positive rate"
    svg = _svg_plot(title, x, y, xmax, "false positive rate", ylabel, f"{name} = {_fmt(value)}", ykey != "pro")
    return f'<div class="plot">{svg}</div>'


def _colorbar(vmin: float, vmax: float) -> str:
    stops = "".join(
        f'<stop offset="{t:.2f}" stop-color="rgb({c[0]},{c[1]},{c[2]})"/>'
        for t, c in zip(np.linspace(0, 1, 17), colormap(np.linspace(0, 1, 17)), strict=True)
    )
    ticks = []
    for i in range(5):
        xv = 30 + 300 * i / 4
        ticks.append(f'<line x1="{xv}" y1="24" x2="{xv}" y2="28" stroke="#333"/>'
                     f'<text x="{xv}" y="40" text-anchor="middle">{_fmt(vmin + (vmax - vmin) * i / 4, ".3g")}</text>')
    return ('<svg width="360" height="44" font-family="sans-serif" '
            f'font-size="11"><defs><linearGradient id="anomap-cbar">{stops}</linearGradient></defs>'
            '<rect x="30" y="4" width="300" height="20" fill="url(#anomap-cbar)" stroke="#333"/>'
            f'{"".join(ticks)}</svg>')


def _common_scale(examples: dict[str, list[Example]], vmin: float | None,
                  vmax: float | None) -> tuple[float, float]:
    maps = [np.asarray(e.amap, dtype=np.float64).ravel() for group in examples.values() for e in group]
    values = np.concatenate(maps) if maps else np.zeros(0)
    values = values[np.isfinite(values)]
    lo = float(vmin) if vmin is not None else (float(np.percentile(values, 1.0)) if values.size else 0.0)
    hi = float(vmax) if vmax is not None else (float(np.percentile(values, 99.9)) if values.size else 1.0)
    if not hi > lo:
        hi = lo + 1e-6
    return float(lo), float(hi)


def _flag_html(ex: Example, flags: dict[str, bool], threshold: object) -> str:
    flagged: bool | None = flags.get(str(ex.path))
    if flagged is None and _is_num(threshold):
        flagged = bool(float(ex.score) > float(threshold))
    if flagged is None:
        return '<span class="na">not flagged (uncalibrated)</span>'
    return '<span class="flag">flagged</span>' if flagged else '<span class="ok">not flagged</span>'


def _card(ex: Example, lo: float, hi: float, flags: dict[str, bool], threshold: object) -> str:
    # Shrink first so the mask contour is drawn at display resolution and stays 1-2 px wide on screen.
    image = downscale(ex.image, _PANEL_SIDE)
    overlay = heatmap_overlay(image, ex.amap, lo, hi, alpha=0.5, mask=ex.mask)
    uri = png_data_uri(side_by_side([image, overlay]), max_side=2 * _PANEL_SIDE + 8)
    kind = "defective" if int(ex.label) == 1 else "good"
    return (f'<div class="card"><div class="t" title="{_esc(ex.path)}">{_esc(ex.title)}</div>'
            f'<img src="{uri}" alt="{_esc(ex.path)}"><div class="cap"><span>image</span>'
            f'<span>{"heat map + mask contour" if ex.mask is not None else "heat map"}</span></div>'
            f'<div class="m">type: <b>{_esc(ex.defect_type)}</b> ({kind}) &middot; score: '
            f'<b>{_esc(_fmt(ex.score, ".4g"))}</b> &middot; {_flag_html(ex, flags, threshold)}</div>'
            f'<div class="m" style="word-break:break-all">{_esc(ex.path)}</div></div>')


def _info_html(info: dict) -> str:
    order = ["method", "dataset", "category", "image_size", "work_shape", "eval_size", "counts", "threshold", "date"]
    keys = [k for k in order if k in info] + [k for k in info if k not in order]
    spans = [f"<span><b>{_esc(str(k).replace('_', ' '))}:</b> {_esc(_fmt_value(info[k]))}</span>" for k in keys]
    return f'<p class="info">{"".join(spans) or "no run information"}</p>'


def _metrics_html(metrics: dict) -> str:
    keys = list(METRIC_NAMES) + [k for k in metrics if k not in METRIC_NAMES]
    rows = "".join(f"<tr><td>{_esc(METRIC_NAMES.get(k, k))}</td><td class=num>{_fmt(metrics.get(k))}</td></tr>"
                   for k in keys)
    return f"<table><tr><th>metric</th><th>value</th></tr>{rows}</table>"


def _per_defect_html(per_defect: dict, rows: list[dict]) -> str:
    if not per_defect:
        return '<p class="na">n/a (no defect types)</p>'
    counts: dict[str, int] = {}
    for r in rows:
        counts[str(r.get("defect_type"))] = counts.get(str(r.get("defect_type")), 0) + 1
    body = []
    for name, v in sorted(per_defect.items(), key=lambda kv: str(kv[0])):
        width = 100.0 * min(max(float(v), 0.0), 1.0) if _is_num(v) and math.isfinite(float(v)) else 0.0
        body.append(f"<tr><td>{_esc(name)}</td><td class=num>{counts.get(str(name), 0)}</td>"
                    f"<td class=num>{_fmt(v)}</td><td><div class=bar><div style=\"width:{width:.1f}%\">"
                    "</div></div></td></tr>")
    return ("<table><tr><th>defect type</th><th>images</th><th>image AUROC</th><th>0 &ndash; 1</th></tr>"
            f"{''.join(body)}</table>")


def _rows_html(rows: list[dict]) -> str:
    body = []
    for r in sorted(rows, key=_score_key, reverse=True):
        flagged = r.get("is_anomalous")
        flag = "n/a" if flagged is None else ("yes" if flagged else "no")
        body.append(f"<tr><td>{_esc(r.get('path', ''))}</td><td>{_esc(r.get('defect_type', ''))}</td>"
                    f"<td class=num>{_esc(r.get('label', ''))}</td><td class=num>{_fmt(r.get('score'), '.4g')}</td>"
                    f"<td>{flag}</td></tr>")
    return (f"<details><summary>All {len(rows)} test images, by score (click to expand)</summary>"
            "<table><tr><th>path</th><th>defect type</th><th>label</th><th>score</th><th>flagged</th></tr>"
            f"{''.join(body)}</table></details>")


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a report is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def render_report(
    result: EvalResult,
    examples: dict[str, list[Example]],
    out_path: str | os.PathLike[str],
    title: str = "anomap report",
    vmin: float | None = None,
    vmax: float | None = None,
) -> Path:
    """Write a single self-contained HTML report of an evaluation.

    Args:
        result: what ``anomap.evaluate`` returned.
        examples: group title -> example images with their maps (see ``select_examples`` for groups).
        out_path: where to write the ``.html`` file (parent folders are created; written atomically).
        title: page title.
        vmin: heat-map value drawn as the lowest colour; default the 1st percentile of all example maps.
        vmax: heat-map value drawn as the highest colour; default the 99.9th percentile of all example maps.

    Returns:
        The path written.
    """
    out = Path(out_path)
    info = result.info if isinstance(result.info, dict) else {}
    rows = list(result.rows or [])
    lo, hi = _common_scale(examples, vmin, vmax)
    flags = {str(r.get("path")): bool(r["is_anomalous"]) for r in rows if r.get("is_anomalous") is not None}
    threshold = info.get("threshold")
    curves = "".join([
        _curve_panel(result, "image_roc", "Image-level ROC", "tpr", 1.0, "image_auroc"),
        _curve_panel(result, "pixel_roc", "Pixel-level ROC", "tpr", 1.0, "pixel_auroc"),
        _curve_panel(result, "pro", "PRO curve (FPR <= 0.3)", "pro", 0.3, "aupro"),
    ])
    parts = [
        (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
        f"<style>{_CSS}</style></head><body><h1>{_esc(title)}</h1>{_info_html(info)}"),
        f"<h2>Metrics</h2>{_metrics_html(result.metrics or {})}",
        threshold_html(info, result.metrics or {}, rows),
        f'<h2>Curves</h2><div class="plots">{curves}</div>',
        f"<h2>Image AUROC per defect type</h2>{_per_defect_html(result.per_defect or {}, rows)}",
    ]
    if any(examples.values()):
        parts.append(f'<h2>Heat-map colour scale</h2><div class="legend">{_colorbar(lo, hi)}<span>Common scale for '
                     f"all heat maps below: raw map value {_esc(_fmt(lo, '.4g'))} (blue) to "
                     f"{_esc(_fmt(hi, '.4g'))} (red), clipped. White outline (dark halo): ground-truth defect mask."
                     "</span></div>")
    for group, items in examples.items():
        cards = "".join(_card(e, lo, hi, flags, threshold) for e in items)
        parts.append(f"<h2>{_esc(group)}</h2>" + (f'<div class="grid">{cards}</div>' if cards
                                                  else '<p class="na">n/a (no images)</p>'))
    parts.append(f"<h2>Per-image results</h2>{_rows_html(rows)}")
    stamp = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    parts.append(f"<footer>Generated by anomap on {_esc(stamp)}. Self-contained file: no external resources."
                 "</footer></body></html>\n")
    _write_atomic(out, "\n".join(parts))
    return out
