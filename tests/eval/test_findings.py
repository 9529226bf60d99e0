"""False-discovery control of the audit's claims: Benjamini-Hochberg on a published table, power against closed
forms, and simulated audits (no true change: findings stay rare; an injected shift of known size is found)."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from ligero.card.report import replication_section
from ligero.errors import LigeroError
from ligero.eval.audit import Audit
from ligero.eval.bias import (
    CROWS_CATEGORIES,
    STEREOSET_BIAS_TYPES,
    CrowsPairsResult,
    StereoSetResult,
    load_crows_pairs,
    stratified_subset,
)
from ligero.eval.findings import findings
from ligero.eval.metrics.bias import Bias
from ligero.eval.metrics.toxicity import Toxicity
from ligero.eval.stats import (
    benjamini_hochberg,
    detectable_difference,
    fewest_one_way_flips,
    mcnemar,
    paired_binary_test,
)
from ligero.eval.toxicity import TOXIC_THRESHOLD, PromptRecord, ToxicityResult, load_prompts, toxicity_metrics
from ligero.eval.variants import BASELINE

# Benjamini & Hochberg (1995), section 4: 15 p-values from a study of myocardial infarction treatments; at q = 0.05
# the procedure rejects the four smallest (Bonferroni only the three smallest).
BH_1995 = [0.0001, 0.0004, 0.0019, 0.0095, 0.0201, 0.0278, 0.0298, 0.0344, 0.0459, 0.3240, 0.4262, 0.5719, 0.6528,
           0.7590, 1.0000]


def test_benjamini_hochberg_rejects_what_the_paper_rejects():
    out = benjamini_hochberg(BH_1995, q=0.05)
    assert out["discoveries"] == [True] * 4 + [False] * 11
    # adjusted p-values by hand: min over j >= i of m * p_(j) / j
    m = len(BH_1995)
    by_hand = [min(m * BH_1995[j] / (j + 1) for j in range(i, m)) for i in range(m)]
    assert out["q_values"] == pytest.approx([min(1.0, x) for x in by_hand], rel=1e-9)
    assert out["q_values"][4] == pytest.approx(15 * 0.0201 / 5)  # 0.0603 > 0.05: the fifth is not rejected


def test_benjamini_hochberg_keeps_input_order_and_refuses_bad_p_values():
    shuffled = [BH_1995[i] for i in (14, 0, 7, 3, 1)]
    out = benjamini_hochberg(shuffled, q=0.05)
    assert [round(x, 6) for x in out["q_values"]] == [1.0, 0.0005, 0.043, round(0.0095 * 5 / 3, 6), 0.001]
    with pytest.raises(LigeroError, match=r"\[0, 1\]"):
        benjamini_hochberg([0.1, 1.2])
    assert benjamini_hochberg([])["m"] == 0


def detectable_proportion(p: float, n: int) -> float:
    """The audit's detectable difference for a Bernoulli item's spread."""
    return detectable_difference(math.sqrt(p * (1 - p)), n)


def test_detectable_proportion_is_the_closed_form():
    for p, n in ((0.5, 100), (0.3, 400), (0.62, 1018)):
        closed = (sps.norm.ppf(0.975) + sps.norm.ppf(0.8)) * math.sqrt(p * (1 - p) / n)
        assert detectable_proportion(p, n) == pytest.approx(closed, rel=1e-12)
    assert detectable_proportion(0.5, 100) == pytest.approx(0.1401, abs=1e-4)  # 2.8016 * 0.05
    assert fewest_one_way_flips(0.05) == 6 and mcnemar(0, 6)["p_value"] < 0.05 < mcnemar(0, 5)["p_value"]


def test_a_change_of_the_detectable_size_is_found_four_times_in_five():
    rng = np.random.default_rng(0)
    n, sd = 200, 0.3
    effect = detectable_difference(sd, n)
    hits = [sps.ttest_1samp(rng.normal(effect, sd, n), 0).pvalue < 0.05 for _ in range(2000)]
    assert np.mean(hits) == pytest.approx(0.8, abs=0.03)
    # a Bernoulli share shifted by its detectable size, tested against where it started
    p, n = 0.3, 400
    shift = detectable_proportion(p, n)
    draws = rng.binomial(n, p + shift, size=4000) / n
    z = (draws - p) / math.sqrt(p * (1 - p) / n)
    assert np.mean(np.abs(z) > sps.norm.ppf(0.975)) == pytest.approx(0.8, abs=0.04)


def test_paired_binary_test_floors_what_a_small_sample_can_show():
    base = [True] * 10 + [False] * 10
    out = paired_binary_test(base, base, scale=100.0)
    assert out["p_value"] == 1.0 and out["detectable"] == pytest.approx(100 * 6 / 20)


# --- simulated audits -----------------------------------------------------------------------------------------


N_CROWS, N_STEREO, N_PROMPTS, SAMPLES = 320, 150, 100, 4


def _toxicity(latent: np.ndarray, seed: int) -> dict:
    """Scores of SAMPLES continuations per prompt: the prompt's propensity plus sampling noise of this seed."""
    rng = np.random.default_rng(seed)
    scores = np.clip(latent[:, None] + rng.normal(0, 0.15, (len(latent), SAMPLES)), 0, 1)
    m = toxicity_metrics(scores, n_resamples=50)
    prompts = [PromptRecord(i, "p", 0.5, 0.5, ["c"] * SAMPLES, list(map(float, row))) for i, row in enumerate(scores)]
    return ToxicityResult(len(latent), SAMPLES, 20, 1.0, 0.9, 0, TOXIC_THRESHOLD, m["expected_max_toxicity"],
                          m["expected_max_toxicity_ci"], m["toxicity_probability"], m["toxicity_probability_ci"],
                          m["toxic_fraction"], m["toxic_fraction_ci"], 0.5, "toxicity.jsonl", "x", "fake", 0.0,
                          prompts).to_dict()


def _model(item_bias: dict, seed: int, shift: float = 0.0, toxicity_shift: float = 0.0) -> dict:
    """One model's results: the items' own preferences (shared by every model: the same items) plus this model's
    perturbation (its seed: a quantization's rounding), optionally shifted toward the stereotype / toxicity."""
    rng = np.random.default_rng(seed)
    crows_gap = item_bias["crows"] + rng.normal(0, 0.5, N_CROWS) + shift
    stereo_gap = item_bias["stereo"] + rng.normal(0, 0.05, N_STEREO) + shift / 10
    crows = CrowsPairsResult(list(range(N_CROWS)), [CROWS_CATEGORIES[i % 9] for i in range(N_CROWS)],
                             list(map(float, crows_gap)), [0.0] * N_CROWS, {"sha256": "x"})
    stereo = StereoSetResult(list(range(N_STEREO)), [f"t{i % 30}" for i in range(N_STEREO)],
                             [STEREOSET_BIAS_TYPES[i % 4] for i in range(N_STEREO)], list(map(float, stereo_gap)),
                             [0.0] * N_STEREO, [-1.0] * N_STEREO, {"sha256": "x"})
    return {"crows_pairs": crows.to_dict(), "stereoset": stereo.to_dict(),
            "toxicity": _toxicity(np.clip(item_bias["toxicity"] + toxicity_shift, 0, 1), seed + 10_000)}


def _run(seed: int, variants: int = 3, shift: float = 0.0, toxicity_shift: float = 0.0) -> dict:
    rng = np.random.default_rng(seed)
    items = {"crows": rng.normal(0.3, 2.0, N_CROWS), "stereo": rng.normal(0.02, 0.2, N_STEREO),
             "toxicity": rng.beta(2, 5, N_PROMPTS)}
    base = _model(items, seed * 100)
    comparisons = {}
    for v in range(variants):
        variant = _model(items, seed * 100 + v + 1, shift if v == 0 else 0.0, toxicity_shift if v == 0 else 0.0)
        comparisons[f"v{v}"] = {**Bias().compare(base, variant, 50), **Toxicity().compare(base, variant, 50)}
    return findings(comparisons)


def test_a_simulated_audit_without_true_changes_rarely_reports_findings():
    runs = [_run(seed) for seed in range(100)]
    assert all(r["m"] == 12 for r in runs)  # 3 variants x (CrowS, StereoSet, two toxicity metrics)
    with_findings = sum(r["n_findings"] > 0 for r in runs)
    assert with_findings <= 5, with_findings
    # uncorrected, the same runs are full of "significant" changes: the correction is doing the work
    uncorrected = sum(any(c["p_value"] < 0.05 for c in r["claims"]) for r in runs)
    assert uncorrected >= 20


def test_an_injected_shift_of_known_size_is_found():
    """Variant v0 is shifted toward the stereotype and toward toxicity (+0.08 expected maximum toxicity); v1 and v2
    are not. BH controls the share of false findings among the findings (not the chance of any), so the test
    counts them over the runs."""
    found, false = [], 0
    for seed in range(10):
        run = _run(seed, toxicity_shift=0.08, shift=1.5)
        by_key = {(c["variant"], c["key"]): c for c in run["claims"]}
        tox = by_key[("v0", "toxicity.expected_max_toxicity")]
        assert tox["delta"] == pytest.approx(0.08, abs=0.03)
        assert tox["detectable"] < 0.08  # the sample is big enough for this shift
        found += [tox["finding"], by_key[("v0", "crows_pairs.pct_stereotype")]["finding"]]
        false += sum(c["finding"] for c in run["claims"] if c["variant"] != "v0")
    assert all(found)
    assert false / (false + sum(found)) <= 0.05


# --- replication ------------------------------------------------------------------------------------------------


def _replicating_audit(fresh_results: dict) -> Audit:
    """An Audit whose fresh-sample measurements are the given results (no model is loaded)."""
    audit = Audit.__new__(Audit)
    audit.budget = {"bootstrap": 50}
    audit.measure_fresh = lambda name, metrics: fresh_results[name]
    return audit


@pytest.mark.parametrize("shift_holds", [True, False])
def test_a_finding_is_re_tested_on_a_fresh_sample(shift_holds):
    run = _run(1, variants=2, toxicity_shift=0.1)
    emt = next(c for c in run["claims"] if c["variant"] == "v0" and c["key"] == "toxicity.expected_max_toxicity")
    assert emt["finding"]
    rng = np.random.default_rng(99)  # other prompts, other seeds
    items = {"crows": rng.normal(0.3, 2.0, N_CROWS), "stereo": rng.normal(0.02, 0.2, N_STEREO),
             "toxicity": rng.beta(2, 5, N_PROMPTS)}
    fresh = {BASELINE: _model(items, 7), "v0": _model(items, 8, toxicity_shift=0.1 if shift_holds else 0.0)}
    report = {"findings": run, "variants": [BASELINE, "v0", "v1"]}
    out = _replicating_audit(fresh).replicate_findings(report)
    tested = {c["key"]: c for c in out["claims"] if c["variant"] == "v0"}
    assert "toxicity.expected_max_toxicity" in tested and all(c["variant"] == "v0" for c in out["claims"])
    assert tested["toxicity.expected_max_toxicity"]["held"] is shift_holds


def test_replication_samples_share_no_item_with_the_run():
    pairs, _ = load_crows_pairs()
    first = stratified_subset(pairs, lambda p: p.category, 320)
    second = stratified_subset(pairs, lambda p: p.category, 320, sample=1)
    assert len(second) == 320 and not {p.id for p in first} & {p.id for p in second}
    assert {p.category for p in second} == {p.category for p in first}
    prompts = [load_prompts(20, sample=s).prompts for s in (0, 1)]
    assert len(prompts[1]) == 20 and not {p.index for p in prompts[0]} & {p.index for p in prompts[1]}
    with pytest.raises(LigeroError, match="needs a limit"):
        stratified_subset(pairs, lambda p: p.category, None, sample=1)


def test_run_and_audit_take_replicate():
    from ligero.cli import build_parser

    assert build_parser().parse_args(["run", "--replicate"]).replicate
    assert not build_parser().parse_args(["audit", "--model", "smollm2-135m"]).replicate


def test_a_finding_on_every_item_of_a_dataset_is_reported_untestable_not_dropped():
    """A budget that scores all of a dataset (thorough: every CrowS-Pairs pair) leaves no fresh items: the
    replication sample skips that set, and the report lists the finding as not re-testable, with why."""
    from types import SimpleNamespace

    from ligero.eval.metrics.winobias import WinoBias

    everything = SimpleNamespace(sample=1, budget={"crows_pairs": None, "stereoset": None, "winobias": None})
    assert Bias().measure(everything) == {} and WinoBias().measure(everything) == {}
    run = _run(1, variants=1, shift=2.0, toxicity_shift=0.1)
    crows = next(c for c in run["claims"] if c["key"] == "crows_pairs.pct_stereotype")
    assert crows["finding"]
    rng = np.random.default_rng(5)
    items = {"crows": rng.normal(0.3, 2.0, N_CROWS), "stereo": rng.normal(0.02, 0.2, N_STEREO),
             "toxicity": rng.beta(2, 5, N_PROMPTS)}
    fresh = {name: {k: v for k, v in _model(items, seed, toxicity_shift=0.1 * (name == "v0")).items()
                    if k != "crows_pairs"} for name, seed in ((BASELINE, 3), ("v0", 4))}
    out = _replicating_audit(fresh).replicate_findings({"findings": run, "variants": [BASELINE, "v0"]})
    assert [c["key"] for c in out["untestable"]] == ["crows_pairs.pct_stereotype"]
    assert "every item" in out["untestable"][0]["reason"]
    assert "toxicity.expected_max_toxicity" in {c["key"] for c in out["claims"]}
    section = replication_section({"replication": out})
    assert any("was not re-tested" in item for item in section.items)
