"""Drift of production traffic against a deployment card's reference profile: PSI, Jensen-Shannon and KS.

Everything here is a pure function of numbers, so `ligero monitor` and its tests share one definition.

Binning. PSI and Jensen-Shannon compare histograms on bins cut at the *reference* quantiles, so each bin holds about
the same share of the reference. Duplicate cut points (ties: output lengths pinned at max_new_tokens, toxicity
scores of 0.0) are merged, so a heavily tied value gets a bin of its own instead of several empty ones. Bins are
right-closed: (-inf, c1], (c1, c2], ..., (ck, +inf), and the outer bins are open so production values beyond the
reference's range are counted, not dropped.

Sampling noise. With B bins, n reference and m production values drawn from the *same* distribution, PSI is about
chi-square with B - 1 degrees of freedom times (1/n + 1/m), so its expected value is (B - 1)(1/n + 1/m). A card's
reference profile is small (40 responses in a full audit), so `compare_profile` picks the number of bins from the
sample sizes (at least 20 values per bin in the effective size nm/(n+m), which keeps the expected no-drift PSI under
0.05, half the usual warn threshold) and reports the binned tests as INSUFFICIENT when even two bins are not
supported. The KS p-value accounts for the sample sizes itself and is always computed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from scipy import stats as sps

from ligero.errors import LigeroError

SIGNALS = ("output_length", "mean_logprob", "toxicity_score", "prompt_length", "latency_ms")
EPSILON = 1e-4  # added to every bin proportion before PSI's log ratio, so an empty bin costs a finite amount
MIN_PRODUCTION = 30  # fewer production values than this: the signal is INSUFFICIENT (reported, never alerts)
MIN_PER_BIN = 20  # values per bin in the effective sample size nm/(n+m) before PSI/JS are trusted
MAX_BINS = 10
LOWER_IS_WORSE = {"ks_p_value"}  # alert when the value falls *below* the threshold
KNOWN_TESTS = {"psi", "jensen_shannon", "ks_p_value"}
SEVERITY = {"OK": 0, "INSUFFICIENT": 0, "WARN": 1, "ALERT": 2}


def _clean(values: Iterable, what: str) -> np.ndarray:
    """1-D float array without NaN/inf or None (a response that was never scored has no toxicity)."""
    x = np.asarray([np.nan if v is None else v for v in values], dtype=np.float64).reshape(-1)
    x = x[np.isfinite(x)]
    if x.size == 0:
        raise LigeroError(f"{what} has no finite values; drift needs at least one")
    return x


def bin_cuts(reference: Sequence[float], bins: int = MAX_BINS) -> np.ndarray:
    """Interior cut points at the reference's 1/bins, 2/bins, ... quantiles, duplicates merged (ties)."""
    if bins < 2:
        raise LigeroError(f"drift histograms need at least 2 bins, got {bins}")
    ref = _clean(reference, "the reference sample")
    return np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)[1:-1]))


def histograms(reference: Sequence[float], production: Sequence[float], bins: int = MAX_BINS,
               ) -> tuple[np.ndarray, np.ndarray]:
    """Bin proportions (each sums to 1) of both samples on the reference-quantile bins; no epsilon added."""
    ref, prod = _clean(reference, "the reference sample"), _clean(production, "the production sample")
    cuts = bin_cuts(ref, bins)
    # side="left": index i means cuts[i-1] < x <= cuts[i], i.e. right-closed bins, so a tied value sits in one bin
    k = cuts.size + 1
    p = np.bincount(np.searchsorted(cuts, ref, side="left"), minlength=k) / ref.size
    q = np.bincount(np.searchsorted(cuts, prod, side="left"), minlength=k) / prod.size
    return p, q


def psi(reference: Sequence[float], production: Sequence[float], bins: int = MAX_BINS) -> float:
    """Population stability index sum((q - p) * ln(q / p)) over the reference-quantile bins.

    p and q are the reference and production proportions. An empty bin would make the log ratio infinite, so
    EPSILON (1e-4) is added to every proportion and each histogram renormalised: an empty reference bin that gets
    5 % of production then costs 0.05 * ln(0.05 / 1e-4) = 0.31, i.e. one such bin alone is a major shift (> 0.25).
    Identical samples give exactly 0. Natural log, as in the usual 0.1 / 0.25 rule of thumb.
    """
    p, q = histograms(reference, production, bins)
    p, q = (p + EPSILON) / (1 + EPSILON * p.size), (q + EPSILON) / (1 + EPSILON * q.size)
    return float(np.sum((q - p) * np.log(q / p)))


def jensen_shannon(reference: Sequence[float], production: Sequence[float], bins: int = MAX_BINS) -> float:
    """Jensen-Shannon *divergence* in bits (base 2, so it lies in [0, 1]) on the same bins as `psi`.

    JSD = (KL(p || m) + KL(q || m)) / 2 with m = (p + q) / 2; empty bins need no epsilon (0 log 0 = 0). This is the
    divergence, not the distance sqrt(JSD) that scipy.spatial.distance.jensenshannon returns: for small shifts
    PSI ~ 8 ln(2) JSD ~ 5.5 JSD, so the card's JS thresholds (warn 0.05, alert 0.1) sit near PSI 0.28 / 0.55, while on
    the distance scale they would sit near PSI 0.014 / 0.055, inside the sampling noise of any realistic reference.
    """
    p, q = histograms(reference, production, bins)
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

    return float(min(1.0, max(0.0, (kl(p) + kl(q)) / 2)))


def ks(reference: Sequence[float], production: Sequence[float]) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov (statistic D, two-sided p-value) via scipy.stats.ks_2samp.

    With ties (integer lengths) the p-value is conservative (too large), so KS under-alerts on discrete signals;
    PSI/JS cover those.
    """
    ref, prod = _clean(reference, "the reference sample"), _clean(production, "the production sample")
    res = sps.ks_2samp(ref, prod)
    return float(res.statistic), float(res.pvalue)


def _check_test(test: Mapping) -> tuple[str, float, float]:
    try:
        stat, warn, alert = test["statistic"], float(test["warn"]), float(test["alert"])
    except (KeyError, TypeError, ValueError) as exc:
        raise LigeroError(f"drift test {test!r} needs statistic, warn and alert numbers; fix the card's "
                          "monitoring.drift_tests") from exc
    if stat not in KNOWN_TESTS:
        raise LigeroError(f"unknown drift statistic {stat!r}; use one of {sorted(KNOWN_TESTS)} in the card")
    if (warn < alert) if stat in LOWER_IS_WORSE else (warn > alert):
        order = "warn > alert (a p-value alerts below)" if stat in LOWER_IS_WORSE else "warn <= alert"
        raise LigeroError(f"drift test {stat}: thresholds warn={warn}, alert={alert} are inverted; need {order}")
    return stat, warn, alert


def drift_status(value: float | None, test: Mapping) -> str:
    """OK / WARN / ALERT for one statistic against one card test; a missing value is INSUFFICIENT.

    Distances (psi, jensen_shannon) are flagged at or above the threshold; the KS p-value strictly below it.
    """
    stat, warn, alert = _check_test(test)
    if value is None or not math.isfinite(value):
        return "INSUFFICIENT"
    if stat in LOWER_IS_WORSE:
        return "ALERT" if value < alert else "WARN" if value < warn else "OK"
    return "ALERT" if value >= alert else "WARN" if value >= warn else "OK"


def worst(statuses: Iterable[str]) -> str:
    """The most severe status; INSUFFICIENT never outranks OK, and only all-INSUFFICIENT stays INSUFFICIENT."""
    statuses = list(statuses)
    if not statuses or all(s == "INSUFFICIENT" for s in statuses):
        return "INSUFFICIENT"
    return max((s for s in statuses if s != "INSUFFICIENT"), key=SEVERITY.__getitem__)


def auto_bins(n_reference: int, n_production: int, max_bins: int = MAX_BINS) -> int:
    """Bins supported by the sample sizes: MIN_PER_BIN values per bin in nm/(n+m), at most max_bins (may be < 2)."""
    if n_reference <= 0 or n_production <= 0:
        return 0
    effective = n_reference * n_production / (n_reference + n_production)
    return int(min(max_bins, effective // MIN_PER_BIN))


def _reference_values(reference_profile: Mapping, signal: str) -> list | None:
    dist = reference_profile.get(signal)
    if isinstance(dist, Mapping):
        return dist.get("values")
    return None


def compare_profile(reference_profile: Mapping, production: Mapping[str, Sequence[float]],
                    drift_tests: Sequence[Mapping], bins: int | None = None,
                    min_production: int = MIN_PRODUCTION) -> dict:
    """Per signal: sample sizes, means, PSI, JS, KS and a status per card test; the signal's status is the worst.

    `bins=None` chooses the bins from the sample sizes (see `auto_bins`); an int forces that many. A signal with
    fewer than `min_production` production values is INSUFFICIENT: its numbers are still shown when computable but
    it does not warn or alert (too little traffic to tell drift from noise). The overall status is the worst signal.
    """
    for test in drift_tests:
        _check_test(test)
    if not drift_tests:
        raise LigeroError("the card has no monitoring.drift_tests; add at least one (psi, jensen_shannon, ks_p_value)")
    signals: dict[str, dict] = {}
    for signal in SIGNALS:
        ref_values = _reference_values(reference_profile, signal)
        prod = [v for v in production.get(signal, []) if v is not None and math.isfinite(v)]
        row: dict = {"n_reference": 0, "n_production": len(prod), "mean_reference": None,
                     "mean_production": float(np.mean(prod)) if prod else None,
                     "p95_production": float(np.quantile(prod, 0.95)) if prod else None,
                     "bins": None, "psi": None, "jensen_shannon": None, "ks_statistic": None, "ks_p_value": None,
                     "tests": {}, "notes": []}
        ref = [v for v in (ref_values or []) if v is not None and math.isfinite(v)]
        if not ref:
            row["notes"].append("the card's reference profile has no values for this signal")
        else:
            row.update(n_reference=len(ref), mean_reference=float(np.mean(ref)),
                       p95_reference=float(np.quantile(ref, 0.95)))
        if ref and prod:
            d, p_value = ks(ref, prod)
            row.update(ks_statistic=d, ks_p_value=p_value)
            n_bins = bins if bins is not None else auto_bins(len(ref), len(prod))
            if n_bins >= 2:
                row.update(bins=n_bins, psi=psi(ref, prod, n_bins), jensen_shannon=jensen_shannon(ref, prod, n_bins))
            else:
                row["notes"].append(f"PSI/JS not computed: {len(ref)} reference and {len(prod)} production values "
                                    f"do not fill 2 bins of {MIN_PER_BIN}; rebuild the card with more profile "
                                    "prompts (KS still applies)")
        enough = len(prod) >= min_production and bool(ref)
        if ref and len(prod) < min_production:
            row["notes"].append(f"only {len(prod)} production values (< {min_production}): reported, not alerted")
        for test in drift_tests:
            stat = test["statistic"]
            value = row["ks_p_value"] if stat == "ks_p_value" else row[stat]
            status = drift_status(value, test) if enough else "INSUFFICIENT"
            row["tests"][stat] = {"value": value, "warn": test["warn"], "alert": test["alert"], "status": status}
        row["status"] = worst(t["status"] for t in row["tests"].values()) if enough else "INSUFFICIENT"
        signals[signal] = row
    return {"signals": signals, "status": worst(r["status"] for r in signals.values()),
            "min_production": min_production, "epsilon": EPSILON,
            "jensen_shannon": "divergence, base 2, in [0, 1]"}
