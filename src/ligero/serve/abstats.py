"""A/B analysis of production feedback: positive rates, an always-valid interval for the difference, SRM, segments.

The experiment is watched (`ligero monitor` runs from cron), so a fixed-horizon interval checked at every run would
find a "significant" difference far more often than 5 % of the time when there is none. The difference
treatment - control therefore gets an anytime-valid confidence sequence (valid at every peek at once); the
fixed-horizon interval is shown beside it for comparison only.

Confidence sequence: the two-sided normal-mixture (Robbins) boundary, in the asymptotic form of Waudby-Smith,
Arbour, Sinha, Kennedy & Ramdas (2021), "Time-uniform central limit theory and asymptotic confidence sequences"
(arXiv:2103.06476; the Gaussian-mixture AsympCS, as in the authors' R code `std_conjmix_margin` and
`best_rho2_approx`). It is the normal-mixture boundary of Howard, Ramdas, McAuliffe & Sekhon (2021),
"Time-uniform, nonparametric, nonasymptotic confidence sequences", and the interval that inverts the mSPRT of
Johari, Pekelis & Walsh, "Always valid inference" (2017/2022). For the mean of t observations with standard
deviation sigma:

    mean_t +- sigma * sqrt( 2 (t rho^2 + 1) / (t^2 rho^2) * log( sqrt(t rho^2 + 1) / alpha ) )

and rho^2 = (2 log(1/alpha) + log(1 + 2 log(1/alpha))) / t_opt makes it tightest near t_opt. The difference of two
proportions d = p_T - p_C is a mean in "information time": with v = Var(d) its information is I = 1/v, and the
formula above is applied with sigma = 1 and t = I. Its validity is asymptotic (plug-in variance, CLT), which is why
the unit of analysis must be reasonably large before the interval is trusted; see `MIN_PER_ARM`.

The always-valid p-value is min(1, 1 / M) with the mixture martingale M = (1 + I rho^2)^(-1/2)
exp(rho^2 I^2 d^2 / (2 (1 + I rho^2))); it is below alpha exactly when the sequence excludes 0.

Unit of analysis: one response with feedback. Users are randomized, not responses, so responses of one user are
correlated and the intervals are somewhat too narrow when a few users give most of the feedback.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from scipy import stats as sps

from ligero.errors import LigeroError
from ligero.eval.stats import wilson_interval

SRM_P = 0.001  # sample-ratio mismatch threshold (the card's plan: p < 0.001 stops the test)
MIN_PER_ARM = 30  # below this, per-arm feedback is reported but the difference is not interpreted
NO_SEGMENT = "(none)"


def _check_alpha(alpha: float) -> None:
    if not 0 < alpha < 1:
        raise LigeroError(f"alpha must be between 0 and 1 (e.g. 0.05), got {alpha}")


def wilson(successes: int, n: int, level: float = 0.95) -> dict:
    """Positive rate with a Wilson score interval (n = 0 gives an empty row, not an error)."""
    if n == 0:
        return {"n": 0, "positive": 0, "rate": None, "low": None, "high": None}
    low, high = wilson_interval(int(successes), int(n), level)
    return {"n": int(n), "positive": int(successes), "rate": successes / n, "low": low, "high": high}


def rho2_for(planned_information: float, alpha: float = 0.05) -> float:
    """Mixture parameter rho^2 making the sequence tightest at `planned_information` (Waudby-Smith et al. 2021)."""
    _check_alpha(alpha)
    if planned_information <= 0:
        raise LigeroError(f"planned information must be positive, got {planned_information}")
    a = math.log(1 / alpha)
    return (2 * a + math.log(1 + 2 * a)) / planned_information


def always_valid_halfwidth(information: float, alpha: float, rho2: float) -> float:
    """Half-width, in units of the estimate, of the normal-mixture confidence sequence at information I = 1/var."""
    t = information
    return math.sqrt(2 * (t * rho2 + 1) / (t * t * rho2) * math.log(math.sqrt(t * rho2 + 1) / alpha))


def always_valid_p(estimate: float, information: float, rho2: float) -> float:
    """min(1, 1/M) for H0: difference = 0, M the normal-mixture martingale (anytime-valid p-value)."""
    t = information
    log_m = -0.5 * math.log1p(t * rho2) + rho2 * (t * estimate) ** 2 / (2 * (1 + t * rho2))
    return float(min(1.0, math.exp(-log_m)))


def planned_information(planned_n_per_arm: int, variance_per_unit: float = 0.25) -> float:
    """Information 1/Var(p_T - p_C) at the planned size; 0.25 is the largest Bernoulli variance (p = 0.5)."""
    if planned_n_per_arm < 1:
        raise LigeroError(f"planned sample size per arm must be >= 1, got {planned_n_per_arm}")
    return planned_n_per_arm / (2 * variance_per_unit)


def difference(control: tuple[int, int], treatment: tuple[int, int], alpha: float = 0.05,
               planned_n_per_arm: int = 1000) -> dict:
    """Treatment - control positive rate: fixed-horizon (Wald) and always-valid intervals, both at level 1 - alpha.

    `control` and `treatment` are (positives, n). The variance uses the Agresti-Caffo adjusted rates
    (s + 1) / (n + 2), so an arm with all-positive (or all-negative) feedback does not get a zero-width interval;
    the estimate itself is the raw difference.
    """
    _check_alpha(alpha)
    (s_c, n_c), (s_t, n_t) = control, treatment
    if n_c <= 0 or n_t <= 0:
        return {"estimate": None, "n_control": n_c, "n_treatment": n_t, "fixed": None, "always_valid": None,
                "note": "an arm has no feedback yet"}
    if not (0 <= s_c <= n_c and 0 <= s_t <= n_t):
        raise LigeroError(f"positives must lie between 0 and n, got control {control}, treatment {treatment}")
    d = s_t / n_t - s_c / n_c
    pc, pt = (s_c + 1) / (n_c + 2), (s_t + 1) / (n_t + 2)
    var = pc * (1 - pc) / n_c + pt * (1 - pt) / n_t
    se = math.sqrt(var)
    z = float(sps.norm.ppf(1 - alpha / 2))
    p_fixed = float(2 * sps.norm.sf(abs(d) / se))
    info = 1 / var
    rho2 = rho2_for(planned_information(planned_n_per_arm), alpha)
    half = always_valid_halfwidth(info, alpha, rho2)
    out = {
        "estimate": d, "se": se, "n_control": int(n_c), "n_treatment": int(n_t), "alpha": alpha,
        "fixed": {"low": d - z * se, "high": d + z * se, "p_value": p_fixed},
        "always_valid": {"low": d - half, "high": d + half, "p_value": always_valid_p(d, info, rho2),
                         "planned_n_per_arm": planned_n_per_arm, "rho2": rho2},
    }
    if min(n_c, n_t) < MIN_PER_ARM:
        out["note"] = f"fewer than {MIN_PER_ARM} responses with feedback in an arm: the intervals are not reliable"
    return out


def srm(observed: Mapping[str, int], planned: Mapping[str, float], threshold: float = SRM_P) -> dict:
    """Sample-ratio mismatch: chi-square goodness of fit of units per variant against the planned split.

    `planned` holds weights (50/50 or 0.5/0.5 alike); variants observed but not planned are listed, not tested.
    A flagged SRM means the assignment or logging is broken, so no A/B result can be trusted until it is fixed.
    """
    if not planned or any(w < 0 for w in planned.values()) or sum(planned.values()) <= 0:
        raise LigeroError(f"planned split {dict(planned)} needs non-negative weights with a positive sum")
    names = [v for v in planned if planned[v] > 0]
    counts = np.array([int(observed.get(v, 0)) for v in names], dtype=float)
    total = counts.sum()
    weights = np.array([planned[v] for v in names], dtype=float)
    expected = total * weights / weights.sum()
    out = {"observed": {v: int(c) for v, c in zip(names, counts)},
           "expected": {v: float(e) for v, e in zip(names, expected)},
           "unplanned": {v: int(c) for v, c in observed.items() if v not in planned or planned[v] <= 0},
           "threshold": threshold}
    if total == 0 or len(names) < 2:
        return {**out, "chi2": None, "p_value": None, "flagged": False, "note": "no assigned units to test"}
    chi2, p = sps.chisquare(counts, expected)
    return {**out, "chi2": float(chi2), "p_value": float(p), "flagged": bool(p < threshold)}


def benjamini_hochberg(p_values: Sequence[float]) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values): q_(i) = min_{j >= i} p_(j) m / j, capped at 1."""
    p = np.asarray(p_values, dtype=float)
    if p.ndim != 1 or np.any((p < 0) | (p > 1)) or np.any(np.isnan(p)):
        raise LigeroError("Benjamini-Hochberg needs a 1-D list of p-values in [0, 1]")
    m = p.size
    if m == 0:
        return p
    order = np.argsort(p)
    scaled = p[order] * m / np.arange(1, m + 1)
    q = np.minimum(1.0, np.minimum.accumulate(scaled[::-1])[::-1])
    out = np.empty(m)
    out[order] = q
    return out


def _positive(row: Mapping) -> bool | None:
    """Thumbs up (value >= 0.5) for boolean feedback; None for numeric/categorical rows (not a rate)."""
    value, kind = row.get("value"), (row.get("data_type") or "boolean").lower()
    if kind not in ("boolean", "bool") or value is None:
        return None
    try:
        return float(value) >= 0.5
    except (TypeError, ValueError):
        return None


def latest_per_response(rows: Iterable[Mapping]) -> list[dict]:
    """One boolean feedback row per (response, feedback name): the latest, so a changed vote counts once."""
    best: dict[tuple, dict] = {}
    for row in rows:
        positive = _positive(row)
        if positive is None:
            continue
        key = (row.get("response_id"), row.get("name"))
        stamp = row.get("created_at")
        if key not in best or (stamp is not None and (best[key]["created_at"] is None
                                                      or stamp >= best[key]["created_at"])):
            best[key] = {**row, "positive": positive}
    return list(best.values())


def analyze_feedback(rows: Iterable[Mapping], control: str | None, treatment: str | None, alpha: float = 0.05,
                     planned_n_per_arm: int = 1000) -> dict:
    """Per feedback name: rates per variant and per segment x variant, the difference, and segment effects.

    Rows need response_id, variant, segment, name, value, data_type and created_at. Numeric and categorical feedback
    is counted but not turned into a rate. Segment effects use fixed-horizon p-values (one look per report) with
    Benjamini-Hochberg q-values across segments.
    """
    rows = list(rows)
    boolean = latest_per_response(rows)
    by_name: dict[str, list[dict]] = defaultdict(list)
    for row in boolean:
        by_name[row.get("name") or "feedback"].append(row)
    metrics = {}
    for name, items in sorted(by_name.items()):
        counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        seg_counts: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
        for row in items:
            variant, segment = row.get("variant") or "(unknown)", row.get("segment") or NO_SEGMENT
            for c in (counts[variant], seg_counts[segment][variant]):
                c[0] += int(row["positive"])
                c[1] += 1
        metric: dict = {
            "variants": {v: wilson(*c) for v, c in sorted(counts.items())},
            "segments": {s: {v: wilson(*c) for v, c in sorted(vc.items())} for s, vc in sorted(seg_counts.items())},
            "control": control, "treatment": treatment, "difference": None, "segment_effects": [], "status": "OK",
        }
        if control and treatment and control in counts and treatment in counts:
            diff = difference(tuple(counts[control]), tuple(counts[treatment]), alpha, planned_n_per_arm)
            metric["difference"] = diff
            av = diff.get("always_valid")
            if av and min(diff["n_control"], diff["n_treatment"]) >= MIN_PER_ARM and av["high"] < 0:
                metric["status"] = "WARN"
                metric["note"] = (f"{treatment} has a lower {name} rate than {control} (always-valid interval "
                                  "below 0)")
            effects = []
            for segment, vc in sorted(seg_counts.items()):
                if control in vc and treatment in vc:
                    d = difference(tuple(vc[control]), tuple(vc[treatment]), alpha, planned_n_per_arm)
                    effects.append({"segment": segment, "estimate": d["estimate"], "n_control": d["n_control"],
                                    "n_treatment": d["n_treatment"], "low": d["fixed"]["low"],
                                    "high": d["fixed"]["high"], "p_value": d["fixed"]["p_value"]})
            if effects:
                for e, q in zip(effects, benjamini_hochberg([e["p_value"] for e in effects])):
                    e["q_value"] = float(q)
            metric["segment_effects"] = effects
        elif control or treatment:
            metric["note"] = f"no feedback for both {control} and {treatment} yet"
        metrics[name] = metric
    return {"metrics": metrics, "n_rows": len(rows), "n_boolean": len(boolean),
            "n_not_boolean": sum(1 for r in rows if _positive(r) is None),
            "unit": "response with feedback (latest vote per response and name)"}
