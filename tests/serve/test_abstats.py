"""A/B statistics: Wilson rates, mean scores, the always-valid difference under peeking, SRM, Benjamini-Hochberg,
segments."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from scipy import stats as sps

from ligero.errors import LigeroError
from ligero.serve.abstats import (
    MIN_PER_ARM,
    always_valid_halfwidth,
    analyze_feedback,
    analyze_numeric,
    benjamini_hochberg,
    difference,
    latest_per_response,
    latest_score_per_response,
    mean_difference,
    moments,
    planned_information,
    rho2_for,
    srm,
    t_interval,
    welch,
    wilson,
)


def test_wilson_known_values():
    row = wilson(0, 10)
    assert row["rate"] == 0 and row["low"] == pytest.approx(0.0, abs=1e-12)
    z2 = 1.959963984540054 ** 2
    assert row["high"] == pytest.approx(z2 / (10 + z2), rel=1e-9)  # Wilson upper bound at 0 successes
    mid = wilson(50, 100)
    assert mid["low"] == pytest.approx(1 - mid["high"]) and mid["low"] == pytest.approx(0.4038, abs=1e-4)
    assert wilson(0, 0)["rate"] is None


def test_benjamini_hochberg_known_example_and_scipy():
    q = benjamini_hochberg([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(q, [0.02, 0.04, 0.04, 0.02])
    p = np.random.default_rng(0).random(25) ** 3
    np.testing.assert_allclose(benjamini_hochberg(p), sps.false_discovery_control(p, method="bh"))
    assert benjamini_hochberg([]).size == 0
    with pytest.raises(LigeroError):
        benjamini_hochberg([0.5, 1.5])


def test_srm_flags_60_40_not_a_fair_draw():
    planned = {"control": 50, "treatment": 50}
    bad = srm({"control": 1200, "treatment": 800}, planned)
    assert bad["flagged"] and bad["p_value"] < 1e-10
    fair = srm({"control": 1010, "treatment": 990}, planned)
    assert not fair["flagged"] and fair["p_value"] > 0.5
    uneven = srm({"a": 900, "b": 100, "x": 3}, {"a": 0.9, "b": 0.1})
    assert not uneven["flagged"] and uneven["unplanned"] == {"x": 3}
    with pytest.raises(LigeroError):
        srm({"a": 1}, {"a": -1, "b": 2})


def test_always_valid_interval_is_wider_than_fixed():
    for s_c, n_c, s_t, n_t in [(30, 50, 35, 50), (700, 1000, 720, 1000), (5000, 10000, 5100, 10000), (0, 40, 40, 40)]:
        d = difference((s_c, n_c), (s_t, n_t))
        av, fx = d["always_valid"], d["fixed"]
        # (0, 40) vs (40, 40): both intervals reach past 1 and are clipped there (issue 10), so their tops are equal
        assert av["low"] < fx["low"] <= d["estimate"] <= fx["high"] < av["high"] or fx["high"] == av["high"] == 1
        assert av["p_value"] >= fx["p_value"]
    assert difference((0, 0), (3, 5))["fixed"] is None


def test_intervals_for_a_difference_of_proportions_stay_within_what_is_possible():
    """Little feedback made the always-valid interval [-1.35, 1.68]; a difference of proportions lies in [-1, 1]."""
    for control, treatment in [((1, 2), (2, 3)), ((0, 1), (1, 1)), ((5, 5), (0, 4)), ((3, 10), (4, 10))]:
        d = difference(control, treatment)
        for interval in (d["fixed"], d["always_valid"]):
            assert -1 <= interval["low"] <= d["estimate"] <= interval["high"] <= 1, (control, treatment, d)
    wide = difference((1, 2), (2, 3))["always_valid"]
    assert (wide["low"], wide["high"]) == (-1.0, 1.0)


def test_always_valid_p_value_matches_the_interval():
    rho2 = rho2_for(planned_information(1000))
    for s_t in (700, 730, 745, 760):
        d = difference((700, 1000), (s_t, 1000))
        excludes_zero = d["always_valid"]["low"] > 0 or d["always_valid"]["high"] < 0
        assert excludes_zero == (d["always_valid"]["p_value"] < 0.05)
    # in information time the boundary matches the unit-variance margin of Waudby-Smith et al. at t = I
    t = 500.0
    assert always_valid_halfwidth(t, 0.05, rho2) == pytest.approx(
        np.sqrt(2 * (t * rho2 + 1) / (t * t * rho2) * np.log(np.sqrt(t * rho2 + 1) / 0.05)))


def test_peeking_keeps_type_one_error_for_always_valid_only():
    """200 A/A tests, 10 looks each: repeated fixed intervals reject far above 5 %; the sequence does not."""
    rng = np.random.default_rng(7)
    sims, n, p = 200, 1000, 0.3
    a = np.cumsum(rng.random((sims, n)) < p, axis=1)
    b = np.cumsum(rng.random((sims, n)) < p, axis=1)
    naive = np.zeros(sims, bool)
    always = np.zeros(sims, bool)
    for t in range(100, n + 1, 100):
        for s in range(sims):
            d = difference((int(a[s, t - 1]), t), (int(b[s, t - 1]), t), planned_n_per_arm=n)
            naive[s] |= not d["fixed"]["low"] <= 0 <= d["fixed"]["high"]
            always[s] |= not d["always_valid"]["low"] <= 0 <= d["always_valid"]["high"]
    assert naive.mean() > 0.08  # ~0.19 expected with 10 looks
    assert always.mean() <= 0.06  # covers the true difference (0) at every look in >= 94 % of the tests


def _rows(variant, segment, n, rate):
    """n thumbs votes with exactly round(rate * n) up (deterministic, so the test does not depend on a draw)."""
    t0 = datetime(2026, 11, 26, tzinfo=UTC)
    return [{"response_id": f"{variant}-{segment}-{i}", "variant": variant, "segment": segment,
             "name": "thumbs", "value": float(i < round(rate * n)), "data_type": "boolean",
             "created_at": t0 + timedelta(seconds=i)} for i in range(n)]


def test_analyze_feedback_segments_and_warn():
    rows = (_rows("fp32", "code", 300, 0.8) + _rows("int4", "code", 300, 0.55)
            + _rows("fp32", "chat", 300, 0.7) + _rows("int4", "chat", 300, 0.7))
    rows.append({"response_id": "x", "variant": "int4", "segment": "chat", "name": "score", "value": 4.0,
                 "data_type": "numeric", "created_at": None})
    out = analyze_feedback(rows, control="fp32", treatment="int4")
    m = out["metrics"]["thumbs"]
    assert out["n_not_boolean"] == 1 and set(m["variants"]) == {"fp32", "int4"}
    assert m["variants"]["fp32"]["n"] == 600 and m["segments"]["code"]["int4"]["n"] == 300
    effects = {e["segment"]: e for e in m["segment_effects"]}
    assert effects["code"]["q_value"] < 0.001 and effects["chat"]["q_value"] == pytest.approx(1.0)
    np.testing.assert_allclose([effects["chat"]["q_value"], effects["code"]["q_value"]],
                               benjamini_hochberg([effects["chat"]["p_value"], effects["code"]["p_value"]]))
    diff = m["difference"]  # 0.625 - 0.75 = -0.125 on 600 per arm
    assert diff["estimate"] == pytest.approx(-0.125)
    assert diff["always_valid"]["high"] < 0 and m["status"] == "WARN"


def test_latest_vote_per_response_counts_once():
    t0 = datetime(2026, 11, 26, tzinfo=UTC)
    rows = [{"response_id": 1, "name": "thumbs", "value": 0, "data_type": "boolean", "created_at": t0},
            {"response_id": 1, "name": "thumbs", "value": 1, "data_type": "boolean", "created_at": t0 + timedelta(1)},
            {"response_id": 2, "name": "thumbs", "value": 1, "data_type": None, "created_at": t0}]
    kept = sorted(latest_per_response(rows), key=lambda r: r["response_id"])
    assert [r["positive"] for r in kept] == [True, True]


# ---- numeric feedback ------------------------------------------------------------------------------------------

def test_t_interval_hand_example_and_scipy():
    row = t_interval([1, 2, 3, 4, 5])  # mean 3, sd sqrt(2.5), t_{0.975, 4} = 2.776445
    half = 2.7764451051977987 * np.sqrt(2.5) / np.sqrt(5)
    assert row["n"] == 5 and row["mean"] == 3 and row["sd"] == pytest.approx(np.sqrt(2.5))
    assert (row["low"], row["high"]) == pytest.approx((3 - half, 3 + half), rel=1e-12)
    assert (row["low"], row["high"]) == pytest.approx(sps.t.interval(0.95, 4, loc=3, scale=np.sqrt(2.5 / 5)))
    x = np.random.default_rng(1).normal(0.6, 0.2, 37)
    assert (t_interval(x, 0.9)["low"], t_interval(x, 0.9)["high"]) == pytest.approx(
        sps.t.interval(0.9, 36, loc=x.mean(), scale=sps.sem(x)))
    assert t_interval([])["mean"] is None
    one = t_interval([4.0])
    assert one["mean"] == 4.0 and one["low"] is None and one["sd"] is None


def test_welch_matches_scipy():
    rng = np.random.default_rng(2)
    c, t = rng.normal(3.0, 1.0, 40), rng.normal(3.4, 2.0, 25)
    ours = welch(moments(c), moments(t), alpha=0.05)
    ref = sps.ttest_ind(t, c, equal_var=False)
    ci = ref.confidence_interval(0.95)
    assert ours["p_value"] == pytest.approx(ref.pvalue, rel=1e-9)
    assert (ours["low"], ours["high"]) == pytest.approx((ci.low, ci.high), rel=1e-9)
    assert ours["df"] == pytest.approx(ref.df)


def test_always_valid_mean_difference_covers_a_large_effect():
    """400 scores per arm, means 3.0 vs 3.5, sd 1: the sequence holds the truth (0.5) and excludes 0."""
    for seed in range(20):
        rng = np.random.default_rng(seed)
        c, t = rng.normal(3.0, 1.0, 400), rng.normal(3.5, 1.0, 400)
        d = mean_difference(moments(c), moments(t), planned_n_per_arm=1000)
        av, fx = d["always_valid"], d["fixed"]
        assert 0 < av["low"] <= 0.5 <= av["high"], (seed, av)
        assert av["low"] < fx["low"] <= d["estimate"] <= fx["high"] < av["high"]
        assert av["p_value"] < 0.05 and av["p_value"] >= fx["p_value"]
        assert d["se"] == pytest.approx(np.sqrt(c.var(ddof=1) / 400 + t.var(ddof=1) / 400))


def test_always_valid_mean_difference_survives_peeking():
    """200 A/A tests of 1-5 star scores (skewed, not normal), 10 looks each: repeated Welch intervals reject far
    above 5 %, the always-valid interval stays below it."""
    rng = np.random.default_rng(11)
    sims, n, looks = 200, 1000, np.arange(100, 1001, 100)
    stars = np.array([1, 2, 3, 4, 5], dtype=float)
    probs = [0.1, 0.05, 0.15, 0.3, 0.4]
    arms = []
    for _ in range(2):  # cumulative (n, mean, variance) at every look, for all simulations at once
        x = rng.choice(stars, size=(sims, n), p=probs)
        s1, s2 = np.cumsum(x, axis=1)[:, looks - 1], np.cumsum(x * x, axis=1)[:, looks - 1]
        arms.append((s1 / looks, (s2 - s1 ** 2 / looks) / (looks - 1)))
    (mc, vc), (mt, vt) = arms
    naive = np.zeros(sims, bool)
    always = np.zeros(sims, bool)
    for s in range(sims):
        for j, t in enumerate(looks):
            d = mean_difference((int(t), mc[s, j], vc[s, j]), (int(t), mt[s, j], vt[s, j]), planned_n_per_arm=n)
            naive[s] |= not d["fixed"]["low"] <= 0 <= d["fixed"]["high"]
            always[s] |= not d["always_valid"]["low"] <= 0 <= d["always_valid"]["high"]
    assert naive.mean() > 0.08  # ~0.19 expected with 10 looks
    assert always.mean() < 0.05


def test_mean_difference_without_an_interval():
    assert mean_difference((1, 3.0, np.nan), (5, 4.0, 1.0))["fixed"] is None
    flat = mean_difference((40, 5.0, 0.0), (40, 5.0, 0.0))
    assert flat["estimate"] == 0 and flat["always_valid"] is None and "do not vary" in flat["note"]
    small = mean_difference((10, 3.0, 1.0), (10, 3.5, 1.0))
    assert small["always_valid"] is not None and "not reliable" in small["note"]


def test_latest_score_per_response_counts_once():
    t0 = datetime(2026, 11, 26, tzinfo=UTC)
    rows = [{"response_id": 1, "name": "stars", "value": 2.0, "data_type": "numeric", "created_at": t0},
            {"response_id": 1, "name": "stars", "value": 5.0, "data_type": "numeric", "created_at": t0 + timedelta(1)},
            {"response_id": 1, "name": "stars", "value": 1.0, "data_type": "numeric", "created_at": None},
            {"response_id": 1, "name": "judge_score", "value": 0.25, "data_type": "numeric", "created_at": t0},
            {"response_id": 2, "name": "stars", "value": float("nan"), "data_type": "numeric", "created_at": t0},
            {"response_id": 2, "name": "thumbs", "value": 1.0, "data_type": "boolean", "created_at": t0},
            {"response_id": 3, "name": "stars", "value": 1.0, "data_type": "categorical", "created_at": t0}]
    kept = {(r["response_id"], r["name"]): r["score"] for r in latest_score_per_response(rows)}
    assert kept == {(1, "stars"): 5.0, (1, "judge_score"): 0.25}
    out = analyze_feedback([{**r, "variant": "int4", "segment": "chat"} for r in rows], "fp32", "int4")
    stars = out["numeric"]["metrics"]["stars"]["variants"]["int4"]
    assert stars["n"] == 1 and stars["mean"] == 5.0  # the changed score counts once, at its latest value
    assert out["n_numeric"] == 2 and out["n_boolean"] == 1 and out["n_other"] == 2  # nan and categorical


def _scores(variant, segment, n, mean, name="stars", seed=0):
    rng = np.random.default_rng([seed, n, int(mean * 100), len(variant), len(segment)])
    t0 = datetime(2026, 11, 26, tzinfo=UTC)
    return [{"response_id": f"{variant}-{segment}-{i}", "variant": variant, "segment": segment, "name": name,
             "value": float(v), "data_type": "numeric", "created_at": t0 + timedelta(seconds=i)}
            for i, v in enumerate(rng.normal(mean, 1.0, n))]


def test_analyze_numeric_names_segments_and_warn():
    rows = (_scores("fp32", "code", 300, 3.8) + _scores("int4", "code", 300, 3.0)
            + _scores("fp32", "chat", 300, 3.5) + _scores("int4", "chat", 300, 3.5)
            + _scores("fp32", "chat", 200, 0.7, name="judge_score") + _scores("int4", "chat", 200, 0.7,
                                                                             name="judge_score"))
    out = analyze_numeric(rows, control="fp32", treatment="int4")
    assert set(out["metrics"]) == {"judge_score", "stars"} and out["n_scores"] == 1600
    stars, judge = out["metrics"]["stars"], out["metrics"]["judge_score"]
    assert stars["variants"]["fp32"]["n"] == 600 and stars["segments"]["code"]["int4"]["n"] == 300
    assert stars["status"] == "WARN" and stars["difference"]["always_valid"]["high"] < 0
    assert "lower mean stars" in stars["note"] and stars["higher_is_better"]
    assert judge["status"] == "OK" and judge["difference"]["always_valid"]["low"] < 0 < judge["difference"][
        "always_valid"]["high"]
    effects = {e["segment"]: e for e in stars["segment_effects"]}
    assert effects["code"]["q_value"] < 0.001 and effects["chat"]["q_value"] > 0.05
    np.testing.assert_allclose([effects["chat"]["q_value"], effects["code"]["q_value"]],
                               benjamini_hochberg([effects["chat"]["p_value"], effects["code"]["p_value"]]))
    assert analyze_feedback(rows, "fp32", "int4")["numeric"]["metrics"]["stars"]["status"] == "WARN"
    better = analyze_numeric([{**r, "variant": {"fp32": "int4", "int4": "fp32"}[r["variant"]]} for r in rows],
                             "fp32", "int4")
    assert better["metrics"]["stars"]["status"] == "OK"  # higher is better: a better treatment does not warn
    few = analyze_numeric(_scores("fp32", "chat", MIN_PER_ARM - 1, 4.5) + _scores("int4", "chat", MIN_PER_ARM - 1, 1.0),
                          "fp32", "int4")
    assert few["metrics"]["stars"]["status"] == "OK"  # too few scores to judge


def test_the_scipy_statistics_equal_the_formulas_they_replaced():
    """Wilson, Benjamini-Hochberg and Welch come from scipy now; they match the formulas written out before."""
    from ligero.eval.stats import wilson_interval

    for k, n, level in [(0, 10, 0.95), (3, 10, 0.9), (50, 100, 0.95), (999, 1000, 0.99), (7, 7, 0.95)]:
        z = sps.norm.ppf(1 - (1 - level) / 2)
        p, denom = k / n, 1 + z * z / n
        center, half = (p + z * z / (2 * n)) / denom, z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
        assert wilson_interval(k, n, level) == pytest.approx((max(0, center - half), min(1, center + half)),
                                                             rel=1e-12, abs=1e-15)
    p = np.random.default_rng(0).random(40) ** 3
    order = np.argsort(p)
    q = np.minimum(1, np.minimum.accumulate((p[order] * p.size / np.arange(1, p.size + 1))[::-1])[::-1])
    expected = np.empty_like(q)
    expected[order] = q
    np.testing.assert_allclose(benjamini_hochberg(p), expected, rtol=1e-12)
    (n_c, m_c, v_c), (n_t, m_t, v_t) = (12, 3.1, 1.7), (30, 3.6, 0.8)
    a, b = v_c / n_c, v_t / n_t
    df = (a + b) ** 2 / (a * a / (n_c - 1) + b * b / (n_t - 1))
    q = sps.t.ppf(0.975, df)
    w = welch((n_c, m_c, v_c), (n_t, m_t, v_t))
    d, se = m_t - m_c, np.sqrt(a + b)
    assert (w["low"], w["high"], w["p_value"]) == pytest.approx((d - q * se, d + q * se,
                                                                  2 * sps.t.sf(abs(d) / se, df)), rel=1e-10)
