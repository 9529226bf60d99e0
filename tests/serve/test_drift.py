"""Drift statistics: PSI, Jensen-Shannon and KS on reference-quantile bins, card thresholds, per-signal comparison."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon as scipy_js

from ligero.errors import LigeroError
from ligero.serve.drift import (
    SIGNALS,
    auto_bins,
    bin_cuts,
    compare_profile,
    drift_status,
    histograms,
    jensen_shannon,
    ks,
    psi,
    worst,
)

# The card's thresholds (ligero.card.build.DRIFT_TESTS), copied so this test does not import the model registry.
DRIFT_TESTS = [
    {"statistic": "psi", "warn": 0.1, "alert": 0.25},
    {"statistic": "jensen_shannon", "warn": 0.05, "alert": 0.1},
    {"statistic": "ks_p_value", "warn": 0.05, "alert": 0.001},
]
PSI, JS, KS = DRIFT_TESTS


def test_identical_samples_do_not_drift():
    x = np.random.default_rng(0).normal(size=500)
    assert psi(x, x) == pytest.approx(0.0, abs=1e-12)
    assert jensen_shannon(x, x) == pytest.approx(0.0, abs=1e-12)
    d, p = ks(x, x)
    assert d == 0.0 and p == pytest.approx(1.0)


def test_shifted_normal_alerts_and_same_distribution_is_ok():
    rng = np.random.default_rng(1)
    ref, same, shifted = rng.normal(0, 1, 2000), rng.normal(0, 1, 2000), rng.normal(1, 1, 2000)
    big = psi(ref, shifted)
    assert big > 0.25 and drift_status(big, PSI) == "ALERT"
    small = psi(ref, same)
    assert small < 0.1 and drift_status(small, PSI) == "OK"
    assert drift_status(jensen_shannon(ref, same), JS) == "OK"
    assert drift_status(jensen_shannon(ref, shifted), JS) in ("WARN", "ALERT")
    assert drift_status(ks(ref, shifted)[1], KS) == "ALERT"


def test_jensen_shannon_is_a_base2_divergence_in_unit_interval():
    rng = np.random.default_rng(2)
    ref = rng.normal(size=1000)
    values = [jensen_shannon(ref, rng.normal(mu, 1, 1000)) for mu in (0.0, 0.5, 1.0, 3.0, 50.0)]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert values == sorted(values)  # grows with the shift
    # divergence = squared scipy distance (base 2) on the same histograms
    prod = rng.normal(1, 1, 1000)
    p, q = histograms(ref, prod)
    assert jensen_shannon(ref, prod) == pytest.approx(scipy_js(p, q, base=2) ** 2, rel=1e-9)


def test_ties_merge_bins_and_new_values_count():
    rng = np.random.default_rng(3)
    ref = np.where(rng.random(1000) < 0.8, 32, rng.integers(1, 32, 1000))  # output lengths pinned at the cap
    cuts = bin_cuts(ref, 10)
    assert len(cuts) == len(set(cuts)) < 9 and cuts[-1] == 32
    same = np.where(rng.random(1000) < 0.8, 32, rng.integers(1, 32, 1000))
    assert psi(ref, same) < 0.1
    longer = ref + 40  # production past anything in the reference lands in the open last bin
    assert psi(ref, longer) > 0.25
    assert psi(np.zeros(50), np.zeros(50)) == pytest.approx(0.0, abs=1e-12)  # a constant reference still works


def test_ks_p_value_behaviour():
    rng = np.random.default_rng(4)
    ref = rng.normal(size=300)
    p_values = [ks(ref, rng.normal(size=300))[1] for _ in range(40)]
    assert 0.2 < float(np.median(p_values)) < 0.8  # roughly uniform under no drift
    assert ks(ref, rng.normal(1.0, 1, 300))[1] < 1e-6
    assert drift_status(0.2, KS) == "OK" and drift_status(0.01, KS) == "WARN" and drift_status(1e-5, KS) == "ALERT"


def test_status_thresholds_and_bad_tests():
    assert drift_status(0.1, PSI) == "WARN" and drift_status(0.0999, PSI) == "OK"
    assert drift_status(0.25, PSI) == "ALERT"
    assert drift_status(None, PSI) == "INSUFFICIENT" and drift_status(float("nan"), KS) == "INSUFFICIENT"
    with pytest.raises(LigeroError, match="inverted"):
        drift_status(0.1, {"statistic": "psi", "warn": 0.3, "alert": 0.1})
    with pytest.raises(LigeroError, match="inverted"):
        drift_status(0.1, {"statistic": "ks_p_value", "warn": 0.001, "alert": 0.05})
    with pytest.raises(LigeroError, match="unknown drift statistic"):
        drift_status(0.1, {"statistic": "wasserstein", "warn": 1, "alert": 2})
    assert worst(["OK", "WARN", "INSUFFICIENT"]) == "WARN"
    assert worst(["OK", "INSUFFICIENT"]) == "OK"
    assert worst(["INSUFFICIENT"]) == worst([]) == "INSUFFICIENT"
    assert worst(["WARN", "ALERT", "OK"]) == "ALERT"


def _profile(rng, n):
    draws = {
        "output_length": rng.integers(5, 33, n), "mean_logprob": rng.normal(-2, 0.4, n),
        "toxicity_score": rng.beta(1, 40, n), "prompt_length": rng.integers(8, 40, n),
        "latency_ms": rng.lognormal(np.log(800), 0.3, n),
    }
    return draws, {k: {"values": [float(x) for x in v], "mean": float(np.mean(v)), "p50": float(np.median(v)),
                       "p95": float(np.quantile(v, 0.95))} for k, v in draws.items()}


def test_compare_profile_per_signal():
    rng = np.random.default_rng(5)
    _, reference = _profile(rng, 1000)
    same, _ = _profile(rng, 1000)
    out = compare_profile(reference, {k: list(v) for k, v in same.items()}, DRIFT_TESTS)
    assert set(out["signals"]) == set(SIGNALS)
    assert all(r["bins"] == 10 and r["psi"] < 0.1 for r in out["signals"].values())
    assert all(set(r["tests"]) == {"psi", "jensen_shannon", "ks_p_value"} for r in out["signals"].values())

    shifted = dict(same, prompt_length=same["prompt_length"] + 30, toxicity_score=rng.beta(8, 2, 1000))
    out = compare_profile(reference, shifted, DRIFT_TESTS)
    assert out["status"] == "ALERT"
    assert out["signals"]["prompt_length"]["status"] == out["signals"]["toxicity_score"]["status"] == "ALERT"
    assert out["signals"]["mean_logprob"]["psi"] < 0.1

    few = {k: list(v[:20]) for k, v in shifted.items()}  # obvious drift, but too little traffic to act on
    out = compare_profile(reference, few, DRIFT_TESTS)
    assert out["status"] == "INSUFFICIENT"
    assert all(r["status"] == "INSUFFICIENT" and r["ks_p_value"] is not None for r in out["signals"].values())


def test_small_reference_falls_back_to_ks():
    rng = np.random.default_rng(6)
    _, reference = _profile(rng, 12)  # a full audit's profile has 12 responses
    prod, _ = _profile(rng, 500)
    out = compare_profile(reference, prod, DRIFT_TESTS)
    row = out["signals"]["mean_logprob"]
    assert row["psi"] is None and row["tests"]["psi"]["status"] == "INSUFFICIENT"
    assert row["ks_p_value"] is not None and row["status"] in ("OK", "WARN", "ALERT")
    assert any("PSI/JS not computed" in n for n in row["notes"])
    assert auto_bins(12, 500) == 0 and auto_bins(2000, 2000) == 10 and auto_bins(100, 100) == 2
