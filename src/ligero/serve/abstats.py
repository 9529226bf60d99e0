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

Numeric feedback (a score: 1-5 stars, a judge model's 0-1 grade) gets the same treatment for the mean score per
feedback name: Student-t intervals per arm, Welch's fixed-horizon interval for the difference, and the same
normal-mixture sequence with I = 1 / (s_C^2 / n_C + s_T^2 / n_T) from the sample variances. Higher is better.

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


def _possible(bound: float) -> float:
    """A bound of an interval for a difference of two proportions, clipped to the differences that can occur."""
    return float(min(1.0, max(-1.0, bound)))


def difference(control: tuple[int, int], treatment: tuple[int, int], alpha: float = 0.05,
               planned_n_per_arm: int = 1000) -> dict:
    """Treatment - control positive rate: fixed-horizon (Wald) and always-valid intervals, both at level 1 - alpha.

    `control` and `treatment` are (positives, n). The variance uses the Agresti-Caffo adjusted rates
    (s + 1) / (n + 2), so an arm with all-positive (or all-negative) feedback does not get a zero-width interval;
    the estimate itself is the raw difference. Both intervals are clipped to [-1, 1], the differences that can occur
    (with little feedback the always-valid one would otherwise reach far beyond).
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
    low, high = sps.norm.interval(1 - alpha, loc=d, scale=se)
    p_fixed = float(2 * sps.norm.sf(abs(d) / se))
    info = 1 / var
    rho2 = rho2_for(planned_information(planned_n_per_arm), alpha)
    half = always_valid_halfwidth(info, alpha, rho2)
    out = {
        "estimate": d, "se": se, "n_control": int(n_c), "n_treatment": int(n_t), "alpha": alpha,
        "fixed": {"low": _possible(low), "high": _possible(high), "p_value": p_fixed},
        "always_valid": {"low": _possible(d - half), "high": _possible(d + half),
                         "p_value": always_valid_p(d, info, rho2), "planned_n_per_arm": planned_n_per_arm,
                         "rho2": rho2},
    }
    if min(n_c, n_t) < MIN_PER_ARM:
        out["note"] = f"fewer than {MIN_PER_ARM} responses with feedback in an arm: the intervals are not reliable"
    return out


def moments(values: Iterable[float]) -> tuple[int, float, float]:
    """(n, mean, sample variance with ddof = 1) of scores; the mean is nan for none, the variance below 2."""
    x = np.asarray(list(values), dtype=float)
    mean = float(x.mean()) if x.size else math.nan
    var = float(x.var(ddof=1)) if x.size > 1 else math.nan
    return int(x.size), mean, var


def _t_row(n: int, mean: float, var: float, level: float) -> dict:
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "low": None, "high": None}
    if n < 2:  # one score has a mean but no spread, so no interval
        return {"n": n, "mean": mean, "sd": None, "low": None, "high": None}
    sd = math.sqrt(var)
    low, high = sps.t.interval(level, n - 1, loc=mean, scale=sd / math.sqrt(n))
    return {"n": n, "mean": mean, "sd": sd, "low": float(low), "high": float(high)}


def t_interval(values: Iterable[float], level: float = 0.95) -> dict:
    """Mean score with its Student-t interval mean +- t_{n-1} sd / sqrt(n) (n < 2 gives no interval, not an error)."""
    _check_alpha(1 - level)
    return _t_row(*moments(values), level)


def welch(control: tuple[int, float, float], treatment: tuple[int, float, float], alpha: float = 0.05) -> dict:
    """Welch's fixed-horizon interval and p-value for mean_T - mean_C (unequal variances, Satterthwaite df).

    Arms are (n, mean, variance) as `moments` returns; each needs n >= 2 and the variances must not both be 0.
    The p-value is scipy's `ttest_ind_from_stats`; it does not return the degrees of freedom the interval needs, so
    those are computed here.
    """
    (n_c, m_c, v_c), (n_t, m_t, v_t) = control, treatment
    a, b = v_c / n_c, v_t / n_t
    df = (a + b) ** 2 / (a * a / (n_c - 1) + b * b / (n_t - 1))
    d = m_t - m_c
    low, high = sps.t.interval(1 - alpha, df, loc=d, scale=math.sqrt(a + b))
    test = sps.ttest_ind_from_stats(m_t, math.sqrt(v_t), n_t, m_c, math.sqrt(v_c), n_c, equal_var=False)
    return {"low": float(low), "high": float(high), "p_value": float(test.pvalue), "df": df}


def mean_difference(control: tuple[int, float, float], treatment: tuple[int, float, float], alpha: float = 0.05,
                    planned_n_per_arm: int = 1000) -> dict:
    """Treatment - control mean score: Welch's fixed-horizon interval and an always-valid one, at level 1 - alpha.

    `control` and `treatment` are (n, mean, variance) as `moments` returns. The always-valid interval is the
    boolean path's normal-mixture boundary in information time I = 1 / (s_C^2 / n_C + s_T^2 / n_T).
    """
    _check_alpha(alpha)
    (n_c, m_c, v_c), (n_t, m_t, v_t) = control, treatment
    out = {"estimate": None, "n_control": int(n_c), "n_treatment": int(n_t), "alpha": alpha, "fixed": None,
           "always_valid": None}
    if min(n_c, n_t) < 2:
        return {**out, "estimate": m_t - m_c if min(n_c, n_t) else None,
                "note": "an arm has fewer than 2 scores: no interval"}
    var = v_c / n_c + v_t / n_t
    d = m_t - m_c
    if not var > 0:
        return {**out, "estimate": d, "note": "the scores do not vary in either arm: no interval"}
    # The variance is a plug-in estimate (in I and in rho^2), so the sequence is asymptotically valid (Waudby-Smith
    # et al. 2021), not exactly valid at every small n. Tuning rho^2 at the pooled per-response variance puts the
    # mixture on the data's scale, i.e. fixes it in response counts, so 1-5 stars and 0-1 grades are tuned alike.
    info = 1 / var
    rho2 = rho2_for(planned_information(planned_n_per_arm, (v_c + v_t) / 2), alpha)
    half = always_valid_halfwidth(info, alpha, rho2)
    out.update({
        "estimate": d, "se": math.sqrt(var), "fixed": welch(control, treatment, alpha),
        "always_valid": {"low": d - half, "high": d + half, "p_value": always_valid_p(d, info, rho2),
                         "planned_n_per_arm": planned_n_per_arm, "rho2": rho2},
    })
    if min(n_c, n_t) < MIN_PER_ARM:
        out["note"] = f"fewer than {MIN_PER_ARM} scores in an arm: the intervals are not reliable"
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
    """Benjamini-Hochberg adjusted p-values (q-values: q_(i) = min_{j >= i} p_(j) m / j, capped at 1), by scipy's
    `false_discovery_control`."""
    p = np.asarray(p_values, dtype=float)
    if p.ndim != 1 or np.any((p < 0) | (p > 1)) or np.any(np.isnan(p)):
        raise LigeroError("Benjamini-Hochberg needs a 1-D list of p-values in [0, 1]")
    if p.size == 0:  # scipy refuses an empty list; no tests, no q-values
        return p
    return sps.false_discovery_control(p, method="bh")


def _positive(row: Mapping) -> bool | None:
    """Thumbs up (value >= 0.5) for boolean feedback; None for numeric/categorical rows (not a rate)."""
    value, kind = row.get("value"), (row.get("data_type") or "boolean").lower()
    if kind not in ("boolean", "bool") or value is None:
        return None
    try:
        return float(value) >= 0.5
    except (TypeError, ValueError):
        return None


def _score(row: Mapping) -> float | None:
    """The finite value of a numeric feedback row; None for boolean/categorical rows and unreadable values."""
    if (row.get("data_type") or "").lower() != "numeric" or row.get("value") is None:
        return None
    try:
        value = float(row["value"])
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _keep_latest(rows: Iterable[Mapping], extract, field: str) -> list[dict]:
    """One row per (response, feedback name) that `extract` reads: the latest, with what it read stored as `field`."""
    best: dict[tuple, dict] = {}
    for row in rows:
        value = extract(row)
        if value is None:
            continue
        key = (row.get("response_id"), row.get("name"))
        stamp = row.get("created_at")
        if key not in best or (stamp is not None and (best[key]["created_at"] is None
                                                      or stamp >= best[key]["created_at"])):
            best[key] = {**row, field: value}
    return list(best.values())


def latest_per_response(rows: Iterable[Mapping]) -> list[dict]:
    """One boolean feedback row per (response, feedback name): the latest, so a changed vote counts once."""
    return _keep_latest(rows, _positive, "positive")


def latest_score_per_response(rows: Iterable[Mapping]) -> list[dict]:
    """One numeric feedback row per (response, feedback name), value in "score": the latest, so a changed score
    counts once."""
    return _keep_latest(rows, _score, "score")


def _group(items: Iterable[Mapping], field: str) -> tuple[dict, dict]:
    """`field` of each row grouped per variant and per segment x variant."""
    per_variant: dict[str, list] = defaultdict(list)
    per_segment: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for row in items:
        variant, segment = row.get("variant") or "(unknown)", row.get("segment") or NO_SEGMENT
        per_variant[variant].append(row[field])
        per_segment[segment][variant].append(row[field])
    return per_variant, per_segment


def _segment_effects(per_segment: Mapping, control: str, treatment: str, compare) -> list[dict]:
    """Fixed-horizon difference in each segment that has both arms, with Benjamini-Hochberg q-values across them."""
    effects = []
    for segment, groups in sorted(per_segment.items()):
        if control in groups and treatment in groups:
            d = compare(groups[control], groups[treatment])
            fixed = d.get("fixed") or {}
            effects.append({"segment": segment, "estimate": d["estimate"], "n_control": d["n_control"],
                            "n_treatment": d["n_treatment"], "low": fixed.get("low"), "high": fixed.get("high"),
                            "p_value": fixed.get("p_value"), "q_value": None})
    tested = [e for e in effects if e["p_value"] is not None]  # a segment without an interval has no p-value
    for e, q in zip(tested, benjamini_hochberg([e["p_value"] for e in tested])):
        e["q_value"] = float(q)
    return effects


def _worse(diff: Mapping) -> bool:
    """Enough feedback in both arms and the always-valid interval for treatment - control entirely below 0."""
    av = diff.get("always_valid")
    return bool(av) and min(diff["n_control"], diff["n_treatment"]) >= MIN_PER_ARM and av["high"] < 0


def _metric(items: list[dict], field: str, summarize, compare, control: str | None, treatment: str | None,
            what: str) -> dict:
    """Per-variant and per-segment summaries, the treatment - control difference, segment effects and status."""
    per_variant, per_segment = _group(items, field)
    metric: dict = {
        "variants": {v: summarize(x) for v, x in sorted(per_variant.items())},
        "segments": {s: {v: summarize(x) for v, x in sorted(vx.items())} for s, vx in sorted(per_segment.items())},
        "control": control, "treatment": treatment, "difference": None, "segment_effects": [], "status": "OK",
    }
    if control and treatment and control in per_variant and treatment in per_variant:
        diff = compare(per_variant[control], per_variant[treatment])
        metric["difference"] = diff
        if _worse(diff):
            metric["status"] = "WARN"
            metric["note"] = f"{treatment} has a lower {what} than {control} (always-valid interval below 0)"
        metric["segment_effects"] = _segment_effects(per_segment, control, treatment, compare)
    elif control or treatment:
        metric["note"] = f"no feedback for both {control} and {treatment} yet"
    return metric


def _by_name(items: Iterable[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for row in items:
        out[row.get("name") or "feedback"].append(row)
    return dict(sorted(out.items()))


def analyze_numeric(rows: Iterable[Mapping], control: str | None, treatment: str | None, alpha: float = 0.05,
                    planned_n_per_arm: int = 1000) -> dict:
    """Per numeric feedback name (e.g. "stars", "judge_score"): mean scores, the difference, segment effects.

    Higher scores are taken to be better: a treatment whose always-valid interval for the difference of means lies
    entirely below 0 is a WARN. Uses the latest score per response and name.
    """
    scores = latest_score_per_response(rows)

    def compare(c: list, t: list) -> dict:
        return mean_difference(moments(c), moments(t), alpha, planned_n_per_arm)

    metrics = {name: {**_metric(items, "score", t_interval, compare, control, treatment, f"mean {name}"),
                      "higher_is_better": True}
               for name, items in _by_name(scores).items()}
    return {"metrics": metrics, "n_scores": len(scores), "higher_is_better": True,
            "unit": "response with a score (latest score per response and name)"}


def analyze_feedback(rows: Iterable[Mapping], control: str | None, treatment: str | None, alpha: float = 0.05,
                     planned_n_per_arm: int = 1000) -> dict:
    """Per feedback name: rates per variant and per segment x variant, the difference, and segment effects.

    Rows need response_id, variant, segment, name, value, data_type and created_at. Boolean feedback becomes a
    positive rate ("metrics"); numeric feedback a mean score ("numeric", see `analyze_numeric`); categorical
    feedback is counted only. Segment effects use fixed-horizon p-values (one look per report) with
    Benjamini-Hochberg q-values across segments.
    """
    rows = list(rows)
    boolean = latest_per_response(rows)

    def compare(c: list, t: list) -> dict:
        return difference((sum(c), len(c)), (sum(t), len(t)), alpha, planned_n_per_arm)

    def summarize(x: list) -> dict:
        return wilson(sum(x), len(x))

    metrics = {name: _metric(items, "positive", summarize, compare, control, treatment, f"{name} rate")
               for name, items in _by_name(boolean).items()}
    numeric = analyze_numeric(rows, control, treatment, alpha, planned_n_per_arm)
    return {"metrics": metrics, "numeric": numeric, "n_rows": len(rows), "n_boolean": len(boolean),
            "n_numeric": numeric["n_scores"],
            "n_not_boolean": sum(1 for r in rows if _positive(r) is None),
            "n_other": sum(1 for r in rows if _positive(r) is None and _score(r) is None),
            "unit": "response with feedback (latest vote per response and name)"}
