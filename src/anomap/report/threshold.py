"""The report's threshold section: the calibrated threshold, what it promises, and what the test set gave."""

from __future__ import annotations

import html
import math
from typing import Any

from anomap.metrics.threshold import heldout_needed


def _num(v: object) -> float | None:
    """A finite number (Python or numpy) as float, else None."""
    if v is None or isinstance(v, (bool, str)):
        return None
    try:
        f = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _pct(v: float) -> str:
    return f"{100 * v:.3g} %"


def threshold_html(info: dict[str, Any], metrics: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """A heading and a few plain sentences: threshold, promise, 95 % bound, and the test false-alarm rate."""
    head = "<h2>Threshold and what it promises</h2>"
    thr, target, n = _num(info.get("threshold")), _num(info.get("target_fpr")), info.get("n_heldout")
    if thr is None:
        return head + '<p class="na">Uncalibrated: no image is flagged.</p>'
    groups = int(_num(info.get("n_group_scores")) or 0)
    also = (f" and {groups} fit images (each scored by the model fitted without its group of look-alikes)"
            if groups else "")
    parts = [f"Threshold <b>{thr:.4g}</b> (an image is flagged when its score is above it), set on "
             f"{html.escape(str(n))} held-out normal images{also} for a target false-alarm rate of "
             f"{_pct(target) if target is not None else 'n/a'}."]
    like = "the held-out ones, or as unlike the fit images as one group of them is from the rest," if groups else \
        "the held-out ones"
    promised, upper = _num(info.get("promised_fpr")), _num(info.get("fpr_upper95"))
    if promised is not None and upper is not None:
        parts.append(f"<b>Promise:</b> a new normal image like {like} is flagged with probability at "
                     f"most <b class=promised>{_pct(promised)}</b> (on average over which normals are held out). "
                     f"<b>With 95 % confidence</b> the false-alarm rate of this very threshold is at most "
                     f"<b class=upper95>{_pct(upper)}</b>.")
        if target is not None and 0 < target < 1 and promised > target * (1 + 1e-9):
            need, need2 = heldout_needed(target)
            few = ("normal images for the target:</span> train on" if groups else
                   "held-out normals for the target:</span> hold out")
            parts.append(f'<span class="flag">Too few {few} at least '
                         f"{need} for the promise and {need2} for a 95 % bound of at most {_pct(2 * target)}.")
    good = [r for r in rows if r.get("label") == 0 and r.get("is_anomalous") is not None]
    test_fpr = _num(metrics.get("test_fpr"))
    if good and test_fpr is not None:
        flagged = sum(1 for r in good if r.get("is_anomalous"))
        parts.append(f"Measured on this test set: {flagged} of {len(good)} good images flagged "
                     f"(test false-alarm rate {_pct(test_fpr)}).")
        if upper is not None and test_fpr > upper:
            parts.append("That is above the 95 % bound. The promise holds for normals like the held-out ones: test "
                         "normals that differ from them (another batch, position or lighting) break it, and with "
                         "few good test images chance alone moves the measured rate.")
    return head + "<p>" + " ".join(parts) + "</p>"
