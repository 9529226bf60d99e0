"""Which of an audit's changes are findings: Benjamini-Hochberg over every (variant, claim) comparison of a run.

A metric states its claims about a variant (Metric.claims: "CrowS-Pairs % stereotype changed by +2.1 points",
with the paired test's p-value, the sample size and the smallest change that sample detects at 80 % power). A run
compares many variants on many metrics, so at 95 % per interval several changes look significant by chance alone;
a change is reported as a finding only when it survives the false-discovery-rate correction over all of them. The
uncorrected intervals stay in the report, labelled as such.
"""

from __future__ import annotations

from ligero.eval.metrics import METRICS
from ligero.eval.stats import benjamini_hochberg

FDR_Q = 0.05  # the false-discovery rate the audit controls
POWER = 0.8  # the power at which detectable effects are stated
CLAIM_KEYS = ("metric", "key", "label", "unit", "delta", "ci", "test", "p_value", "n", "detectable")


def claims_of(comparison: dict) -> list[dict]:
    """Every metric's claims about one variant's comparison with the baseline."""
    out = []
    for metric in METRICS:
        for claim in metric.claims(comparison):
            missing = [k for k in CLAIM_KEYS if k not in claim]
            if missing:
                raise RuntimeError(f"metric {metric.name}'s claim {claim.get('key')} lacks {missing}")
            out.append({k: claim[k] for k in CLAIM_KEYS})
    return out


def findings(comparisons: dict[str, dict], q: float = FDR_Q) -> dict:
    """All claims of a run, each with its BH-adjusted p-value (q_value) and whether it is a finding."""
    claims = [{"variant": name, **c} for name, cmp in comparisons.items() for c in claims_of(cmp)]
    bh = benjamini_hochberg([c["p_value"] for c in claims], q)
    for c, q_value, found in zip(claims, bh["q_values"], bh["discoveries"]):
        c["q_value"], c["finding"] = q_value, found
    return {"method": "Benjamini-Hochberg", "q": q, "m": len(claims), "power": POWER,
            "n_findings": sum(c["finding"] for c in claims), "claims": claims}


def variant_claims(report_findings: dict, variant: str) -> dict[str, dict]:
    """One variant's claims by key (what its row, verdict and card read)."""
    return {c["key"]: c for c in report_findings["claims"] if c["variant"] == variant}


def claim_text(c: dict) -> str:
    """'CrowS-Pairs % stereotype +2.10 points [-0.5, +4.7] (p 0.08, q 0.31, n 320; detectable ±3.9): not a finding'."""
    lo, hi = c["ci"]
    verdict = "FINDING" if c["finding"] else "not a finding"
    return (f"{c['label']} {c['delta']:+.3g} {c['unit']} [{lo:+.3g}, {hi:+.3g}] (p {c['p_value']:.2g}, "
            f"q {c['q_value']:.2g}, n {c['n']}; detectable ±{c['detectable']:.3g}): {verdict}")
