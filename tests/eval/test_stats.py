"""Statistics helpers: McNemar and Wilson on known values, flip tables, bootstrap pairing and coverage."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from ligero.errors import LigeroError
from ligero.eval.stats import (
    bootstrap_ci,
    flip_rate,
    flip_table,
    mcnemar,
    wilson_interval,
)


def test_mcnemar_exact_p_matches_binomial():
    res = mcnemar(10, 2)
    assert res["p_value"] == pytest.approx(sps.binomtest(2, 12, 0.5).pvalue)
    assert res["p_value"] == pytest.approx(0.0386, abs=1e-4)
    assert res["statistic"] == pytest.approx((8 - 1) ** 2 / 12)
    assert res["exact"] and (res["b"], res["c"]) == (10, 2)


def test_mcnemar_balanced_and_empty_tables_show_no_change():
    assert mcnemar(7, 7)["p_value"] == 1.0 and mcnemar(7, 7)["statistic"] == 0.0
    assert mcnemar(0, 0)["p_value"] == 1.0


def test_mcnemar_textbook_example():
    # Wikipedia's McNemar example: discordant cells b = 121, c = 59.
    res = mcnemar(121, 59)
    assert res["statistic"] == pytest.approx((62 - 1) ** 2 / 180)  # 20.67 with Edwards' correction
    exact = 2 * sum(math.comb(180, k) for k in range(60)) / 2 ** 180  # two-sided binomial by hand
    assert res["p_value"] == pytest.approx(exact, rel=1e-9)
    assert res["p_value"] < 1e-5


def test_mcnemar_rejects_bad_counts():
    with pytest.raises(LigeroError):
        mcnemar(-1, 3)
    with pytest.raises(LigeroError):
        mcnemar(1.5, 3)


def test_flip_table_on_known_outcomes():
    base = [True, True, False, False, True]
    variant = [True, False, True, False, False]
    table = flip_table(base, variant)
    assert table == {"both": 1, "base_only": 2, "variant_only": 1, "neither": 1, "n": 5, "flip_rate": 0.6}
    assert flip_rate(base, variant) == pytest.approx(0.6)
    assert flip_rate(base, base) == 0.0


def test_flip_table_rejects_mismatched_or_empty_input():
    with pytest.raises(LigeroError, match="equal length"):
        flip_table([True, False], [True])
    with pytest.raises(LigeroError, match="empty"):
        flip_table([], [])


def test_bootstrap_mean_ci_covers_the_true_mean_about_95_percent():
    rng = np.random.default_rng(123)
    covered = 0
    for rep in range(200):
        ci = bootstrap_ci(rng.standard_normal(100), n_resamples=400, seed=rep)
        covered += ci["low"] <= 0.0 <= ci["high"]
    assert 0.88 <= covered / 200 <= 0.99  # percentile intervals run slightly narrow at n = 100


def test_bootstrap_is_deterministic_and_paired():
    x = np.random.default_rng(0).standard_normal(300)
    assert bootstrap_ci(x, seed=5) == bootstrap_ci(x, seed=5)
    assert bootstrap_ci(x, seed=5) != bootstrap_ci(x, seed=6)
    # Same indices for both arrays: a constant per-item shift has a zero-width interval.
    diff = bootstrap_ci(x, x + 1.0, statistic=lambda b, v: v.mean(-1) - b.mean(-1), n_resamples=200)
    assert diff["estimate"] == pytest.approx(1.0)
    assert diff["low"] == pytest.approx(1.0) and diff["high"] == pytest.approx(1.0)


def test_bootstrap_rejects_bad_input():
    with pytest.raises(LigeroError, match="equal length"):
        bootstrap_ci([1.0, 2.0], [1.0])
    with pytest.raises(LigeroError, match="empty"):
        bootstrap_ci([])
    with pytest.raises(LigeroError, match="level"):
        bootstrap_ci([1.0, 2.0], level=95)


def test_wilson_interval_known_values():
    z2 = sps.norm.ppf(0.975) ** 2
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(z2 / (10 + z2))  # 0.2775
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    ref = sps.binomtest(81, 263).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(81, 263) == pytest.approx((ref.low, ref.high))
    with pytest.raises(LigeroError):
        wilson_interval(3, 0)
