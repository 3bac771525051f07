"""The threshold's promise where users see it: stored in the model file (old files still load), warned
about by `anomap fit`, carried into evaluate's info, the HTML report and the bench row."""

from __future__ import annotations

import contextlib
import io
import re

import numpy as np
import pytest

import anomap
from anomap.bench import row
from anomap.cli import main
from anomap.metrics.threshold import conformal_k, heldout_needed
from anomap.report.build import write_report
from anomap.train.checkpoint import load_checkpoint, save_checkpoint
from anomap.types import Calibration, fpr_upper_bound, promised_fpr_of
from conftest import TINY, make_category

PROMISE_KEYS = ("order_k", "promised_fpr", "fpr_upper95")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """`anomap fit` of a tiny ssl_ae (3 held-out normals: too few for 5 %), its stderr and model file."""
    root = tmp_path_factory.mktemp("promise")
    data = make_category(root / "cat")
    out = root / "m.safetensors"
    sets = [f"{k}={v}" for k, v in {**TINY, "max_steps": 3}.items()]
    err = io.StringIO()  # capsys is function-scoped; the module's one fit is captured by hand
    with contextlib.redirect_stderr(err):
        rc = main(["fit", "--method", "ssl_ae", "--data", str(data), "--out", str(out), "-q", "--set", *sets])
    assert rc == 0
    return data, out, err.getvalue()


def test_calibration_round_trips_through_a_dict():
    cal = Calibration(threshold=0.7, target_fpr=0.05, map_scale=2.0, map_low=0.1, n_heldout=3,
                      heldout_scores=[0.1, 0.7, 0.3], order_k=3, promised_fpr=0.25, fpr_upper95=0.6)
    assert Calibration.from_dict(cal.to_dict()) == cal
    empty = Calibration.from_dict(Calibration().to_dict())
    assert (empty.order_k, empty.promised_fpr, empty.fpr_upper95) == (None, None, None)


def test_old_calibration_dicts_get_their_promise_computed():
    rng = np.random.default_rng(0)
    scores = rng.random(30).tolist()
    old_thr = float(np.quantile(scores, 0.95, method="higher"))  # the rule before: the 29th of 30
    old = {"threshold": old_thr, "target_fpr": 0.05, "map_scale": 1.0, "map_low": 0.0, "n_heldout": 30,
           "heldout_scores": scores}
    cal = Calibration.from_dict(old)
    assert cal.order_k == 29 and cal.threshold == old_thr  # what that file's threshold is, not recomputed
    assert cal.promised_fpr == pytest.approx(2 / 31) and cal.fpr_upper95 == pytest.approx(fpr_upper_bound(30, 29))
    no_scores = Calibration.from_dict({k: v for k, v in old.items() if k != "heldout_scores"})
    assert no_scores.order_k == 29  # from n_heldout and target_fpr with the rule it was written with
    assert Calibration.from_dict({"target_fpr": 0.05}).promised_fpr is None  # uncalibrated: nothing to promise
    assert Calibration.from_dict({**old, "order_k": None}).promised_fpr is None  # stored as unknown: kept so


def test_fit_warns_in_one_line_and_stores_the_promise(fitted):
    _, out, err = fitted
    lines = [ln for ln in err.splitlines() if "held-out normal images for target_fpr" in ln]
    assert len(lines) == 1 and lines[0].startswith("anomap: warning: only 3 held-out normal images")
    need, need2 = heldout_needed(0.05)
    assert f"at least {need} normal images" in lines[0] and f"{need2} for a 95% bound" in lines[0]
    cal = anomap.load(out).calibration
    assert cal.n_heldout == 3 and cal.order_k == conformal_k(3, 0.05) == 3
    assert cal.threshold == max(cal.heldout_scores)
    assert cal.promised_fpr == pytest.approx(0.25) and cal.fpr_upper95 == pytest.approx(1 - 0.05 ** (1 / 3))
    assert load_checkpoint(out)[1]["calibration"]["promised_fpr"] == cal.promised_fpr


def test_model_files_written_before_the_promise_still_load(fitted, tmp_path):
    _, out, _ = fitted
    tensors, meta = load_checkpoint(out)
    for key in PROMISE_KEYS:
        del meta["calibration"][key]
    old = save_checkpoint(tmp_path / "old.safetensors", tensors, meta)
    new_cal, old_cal = anomap.load(out).calibration, anomap.load(old).calibration
    assert old_cal == new_cal  # computed from the stored held-out scores: the same k, promise and bound


def test_evaluate_report_and_bench_row_show_the_promise(fitted, tmp_path):
    data, out, _ = fitted
    det = anomap.load(out)
    result = anomap.evaluate(det, data, progress=False)
    cal = det.calibration
    assert result.info["promised_fpr"] == cal.promised_fpr and result.info["fpr_upper95"] == cal.fpr_upper95
    html = write_report(det, result, tmp_path / "r.html", k=1).read_text()
    section = html[html.index("Threshold and what it promises"):]
    assert re.search(r'class=promised>25 %<', section) and "class=upper95>63.2 %<" in section
    assert "Too few held-out normals" in section and "hold out at least 19" in section
    n_good = sum(1 for r in result.rows if r["label"] == 0)
    assert f"of {n_good} good images flagged" in section
    rec = {"dataset": "tiny", "method": "ssl_ae", "sets": [], "image_size": 32, "metrics": result.metrics,
           "fit_seconds": 1.0, "ms_per_image_bs1": 1.0, "peak_rss_mb": 1.0, "info": {**det.info, **result.info}}
    cell = row(rec).split("|")[7].strip()
    assert cell.endswith(f"(promise <={cal.promised_fpr:.3f}, 95% <={cal.fpr_upper95:.3f}) / "
                         f"{result.metrics['test_recall']:.2f}")


def test_promise_of_a_stored_threshold_matches_the_formulas():
    assert promised_fpr_of(19, 19) == pytest.approx(0.05)
    assert promised_fpr_of(100, 96) == pytest.approx(5 / 101)
    assert fpr_upper_bound(19, 19) == pytest.approx(1 - 0.05 ** (1 / 19))  # Beta(1, 19): closed form
