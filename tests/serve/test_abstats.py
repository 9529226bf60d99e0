"""A/B statistics: Wilson rates, the always-valid difference under peeking, SRM, Benjamini-Hochberg, segments."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from scipy import stats as sps

from ligero.errors import LigeroError
from ligero.serve.abstats import (
    always_valid_halfwidth,
    analyze_feedback,
    benjamini_hochberg,
    difference,
    latest_per_response,
    planned_information,
    rho2_for,
    srm,
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
        assert av["low"] < fx["low"] <= d["estimate"] <= fx["high"] < av["high"]
        assert av["p_value"] >= fx["p_value"]
    assert difference((0, 0), (3, 5))["fixed"] is None


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
