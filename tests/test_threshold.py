"""What the calibrated threshold promises, checked by simulation: the conformal order statistic, its
marginal guarantee, the 95 % bound on a deployed line's false-alarm rate, and how many held-out normals a
target needs (anomap.metrics.threshold; docs/protocol.md, "The threshold and what it promises")."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy.stats import norm

from anomap.metrics.threshold import (
    CalibrationWarning,
    calibrated_threshold,
    conformal_k,
    heldout_needed,
    threshold_at_fpr,
)
from anomap.types import fpr_upper_bound, promised_fpr_of

DRAWS = 2000
Z = 3.0  # tolerance: three standard errors of the simulation itself


def _thresholds(rng: np.random.Generator, n: int, k: int, draws: int = DRAWS) -> np.ndarray:
    """The k-th smallest of n standard-normal held-out scores, for each of ``draws`` held-out sets."""
    return np.sort(rng.standard_normal((draws, n)), axis=1)[:, k - 1]


@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.1, 0.3])
def test_conformal_k_is_the_smallest_order_statistic_that_keeps_the_promise(alpha):
    for n in range(1, 400):
        keeps = [k for k in range(1, n + 1) if (n + 1 - k) / (n + 1) <= alpha + 1e-12]
        assert conformal_k(n, alpha) == (keeps[0] if keeps else n), n
        assert conformal_k(n, alpha) == min(n, max(1, math.ceil((n + 1) * (1 - alpha) - 1e-9)))


@pytest.mark.parametrize("n", [19, 50])
def test_fresh_normals_exceed_the_threshold_at_most_as_often_as_promised(n):
    rng = np.random.default_rng(n)
    p = calibrated_threshold(rng.standard_normal(n), 0.05)
    assert p.promised_fpr <= 0.05 and p.promised_fpr == promised_fpr_of(n, p.order_k)
    t = _thresholds(rng, n, p.order_k)
    fresh = rng.standard_normal((DRAWS, 200))  # 200 new normal images on each line
    rate = (fresh > t[:, None]).mean(axis=1)  # each line's share of false alarms
    se = rate.std(ddof=1) / math.sqrt(DRAWS)
    assert rate.mean() <= p.promised_fpr + Z * se
    # for continuous scores the promise is exact, not just an upper bound: the simulation lands on it
    assert rate.mean() >= p.promised_fpr - Z * se


def test_the_previous_rule_promised_less_than_it_kept():
    """numpy's 'higher' quantile took the 29th of 30 scores: a fresh normal exceeds it 2/31 = 6.5 % of the
    time, above the 5 % target; the conformal k (the maximum, 1/31 = 3.2 %) keeps it."""
    n, rng = 30, np.random.default_rng(1)
    scores = np.arange(n, dtype=float)
    k_old = int(np.searchsorted(scores, np.quantile(scores, 0.95, method="higher"))) + 1
    assert (k_old, conformal_k(n, 0.05)) == (29, 30)
    far = norm.sf(_thresholds(rng, n, k_old))  # exact false-alarm rate of each line
    se = far.std(ddof=1) / math.sqrt(DRAWS)
    assert far.mean() > 0.05 + Z * se
    assert abs(far.mean() - promised_fpr_of(n, k_old)) <= Z * se


def test_the_promise_holds_with_tied_scores():
    n, rng = 50, np.random.default_rng(2)
    held = np.round(rng.standard_normal((DRAWS, n)), 1)  # coarse scores: many ties
    k = conformal_k(n, 0.05)
    t = np.array([calibrated_threshold(h, 0.05, warn=False).threshold for h in held])
    assert np.array_equal(t, np.sort(held, axis=1)[:, k - 1])
    far = norm.sf(t + 0.05)  # P(round(X, 1) > t): X at or above t + 0.05
    se = far.std(ddof=1) / math.sqrt(DRAWS)
    assert far.mean() <= promised_fpr_of(n, k) + Z * se


@pytest.mark.parametrize("n", [19, 50, 200])
def test_the_95_percent_bound_is_exceeded_in_about_5_percent_of_lines(n):
    rng = np.random.default_rng(100 + n)
    k = conformal_k(n, 0.05)
    bound = fpr_upper_bound(n, k)
    far = norm.sf(_thresholds(rng, n, k))  # the true false-alarm rate of each calibrated line
    exceeded = float((far > bound).mean())
    se = math.sqrt(0.05 * 0.95 / DRAWS)
    assert exceeded <= 0.05 + Z * se
    assert exceeded >= 0.05 - Z * se  # exact for continuous scores: not a vacuous, loose bound


def test_the_bound_is_the_one_sided_clopper_pearson_bound():
    from scipy.stats import beta, binom

    for n, k in [(19, 19), (50, 49), (70, 68), (200, 191)]:
        u = fpr_upper_bound(n, k)
        assert u == pytest.approx(beta.ppf(0.95, n + 1 - k, k))
        # Clopper-Pearson: the rate at which n - k or fewer of n scores above the threshold has probability 5 %
        assert binom.cdf(n - k, n, u) == pytest.approx(0.05, abs=1e-9)


@pytest.mark.parametrize("alpha", [0.3, 0.1, 0.05, 0.02, 0.01])
def test_heldout_needed_matches_a_brute_force_search(alpha):
    n_promise, n_bound = heldout_needed(alpha)
    ns = np.arange(1, int(40 / alpha))
    ks = np.array([conformal_k(int(n), alpha) for n in ns])
    promised = (ns + 1 - ks) / (ns + 1)
    assert n_promise == int(ns[promised <= alpha + 1e-12].min()) == math.ceil(1 / alpha - 1e-9) - 1
    bounds = np.array([fpr_upper_bound(int(n), int(k)) for n, k in zip(ns, ks, strict=True)])
    failing = ns[bounds > 2 * alpha]
    assert n_bound == max(int(failing.max()) + 1 if len(failing) else 1, n_promise)
    assert (bounds[ns >= n_bound] <= 2 * alpha).all()


def test_the_bound_is_a_saw_tooth_so_needed_means_from_there_on():
    assert heldout_needed(0.05) == (19, 61)
    first = next(n for n in range(19, 200) if fpr_upper_bound(n, conformal_k(n, 0.05)) <= 0.1)
    assert first == 29 and fpr_upper_bound(40, conformal_k(40, 0.05)) > 0.1  # 29 alone would mislead


def test_warning_fires_when_too_few_and_names_the_counts_needed():
    with pytest.warns(CalibrationWarning) as rec:
        p = calibrated_threshold(np.linspace(0, 1, 10), 0.05)
    assert len(rec) == 1 and p.order_k == 10 and p.threshold == 1.0
    msg = str(rec[0].message)
    assert "only 10 held-out" in msg and "1/11" in msg and "at least 19" in msg and "61 for a 95% bound" in msg
    assert "\n" not in msg and "min_heldout=19" in msg
    assert p.promised_fpr == pytest.approx(1 / 11) and not p.meets_target


@pytest.mark.parametrize("n", [19, 100])
def test_no_warning_with_enough_heldout_normals(n):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = calibrated_threshold(np.random.default_rng(0).random(n), 0.05)
    assert p.meets_target and p.promised_fpr <= 0.05


def test_threshold_at_fpr_stays_silent_and_returns_the_same_threshold():
    scores = np.random.default_rng(3).random(7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert threshold_at_fpr(scores, 0.05) == calibrated_threshold(scores, 0.05, warn=False).threshold


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="target_fpr"):
        conformal_k(10, 1.5)
    with pytest.raises(ValueError, match="n=0"):
        conformal_k(0, 0.05)
    with pytest.raises(ValueError, match="0 < target_fpr < 1"):
        heldout_needed(0.0)
