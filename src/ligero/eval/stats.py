"""Small statistics for paired comparisons of two models on the same items.

McNemar's test and the flip table count items whose binary outcome changed; the paired bootstrap resamples
items with the same indices for every array, so per-item correlation between the two models is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats as sps

from ligero.errors import LigeroError


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise LigeroError(f"confidence level must be between 0 and 1 (e.g. 0.95), got {level}")


def mcnemar(b: int, c: int) -> dict:
    """McNemar's test on the two discordant counts of a paired 2x2 table.

    The p-value is exact (two-sided binomial on b + c trials at 0.5), which stays valid for the small counts
    a per-category split produces; the continuity-corrected chi-square is reported alongside for reference.
    """
    if int(b) != b or int(c) != c or b < 0 or c < 0:
        raise LigeroError(f"McNemar needs two non-negative integer counts, got b={b}, c={c}")
    b, c = int(b), int(c)
    n = b + c
    if n == 0:  # no discordant pairs: no evidence of any change
        return {"b": 0, "c": 0, "statistic": 0.0, "p_value": 1.0, "exact": True}
    statistic = max(abs(b - c) - 1, 0) ** 2 / n  # clamped so b == c gives 0, not 1/n
    p_value = float(sps.binomtest(c, n, 0.5, alternative="two-sided").pvalue)
    return {"b": b, "c": c, "statistic": float(statistic), "p_value": min(p_value, 1.0), "exact": True}


def flip_table(base: Sequence[bool], variant: Sequence[bool]) -> dict:
    """2x2 counts of a paired binary outcome, and the share of items whose outcome changed."""
    a, v = np.asarray(base, dtype=bool), np.asarray(variant, dtype=bool)
    if a.ndim != 1 or a.shape != v.shape:
        raise LigeroError(f"flip table needs two 1-D sequences of equal length, got {a.shape} and {v.shape}")
    if a.size == 0:
        raise LigeroError("flip table needs at least one item; both sequences are empty")
    table = {
        "both": int(np.sum(a & v)),
        "base_only": int(np.sum(a & ~v)),
        "variant_only": int(np.sum(~a & v)),
        "neither": int(np.sum(~a & ~v)),
        "n": int(a.size),
    }
    table["flip_rate"] = (table["base_only"] + table["variant_only"]) / table["n"]
    return table


def flip_rate(base: Sequence[bool], variant: Sequence[bool]) -> float:
    """Share of items whose binary outcome differs between the two runs."""
    return flip_table(base, variant)["flip_rate"]


def _mean_last_axis(x: np.ndarray) -> np.ndarray:
    return x.mean(axis=-1)


def bootstrap_ci(*arrays: Sequence, statistic: Callable[..., np.ndarray] | None = None, n_resamples: int = 1000,
                 level: float = 0.95, seed: int = 0) -> dict:
    """Percentile bootstrap interval of `statistic` over items.

    All arrays describe the same items (same length) and are resampled with the same indices, so a paired
    difference such as `lambda base, variant: f(variant) - f(base)` keeps each item's pairing.
    `statistic` gets 2-D arrays [resamples, items] and returns one value per row; the default is the mean of
    a single array. All resamples are drawn at once (one index matrix) and depend only on `seed`.

    Not scipy.stats.bootstrap: it would draw other resamples, so every published interval would move, and its paired
    mode resamples an index for the statistic to apply instead of handing it the [resamples, items] batch.
    """
    if not arrays:
        raise LigeroError("bootstrap needs at least one array of values")
    data = [np.asarray(a) for a in arrays]
    n = len(data[0])
    if any(d.ndim != 1 or len(d) != n for d in data):
        raise LigeroError(f"bootstrap arrays must be 1-D and of equal length, got lengths {[d.shape for d in data]}")
    if n == 0:
        raise LigeroError("bootstrap needs at least one item; the arrays are empty")
    if n_resamples < 1:
        raise LigeroError(f"bootstrap needs at least one resample, got n_resamples={n_resamples}")
    _check_level(level)
    statistic = statistic or _mean_last_axis

    estimate = float(np.asarray(statistic(*(d[None, :] for d in data))).reshape(-1)[0])
    idx = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))
    values = np.asarray(statistic(*(d[idx] for d in data)), dtype=float).reshape(-1)
    if values.shape != (n_resamples,):
        raise LigeroError(f"bootstrap statistic must return one value per resample, got shape {values.shape}")
    values = values[np.isfinite(values)]  # a resample can miss every item a statistic needs
    if values.size == 0:
        low = high = float("nan")
    else:
        tail = 100 * (1 - level) / 2
        low, high = (float(x) for x in np.percentile(values, [tail, 100 - tail]))
    return {"estimate": estimate, "low": low, "high": high, "level": level, "n_resamples": n_resamples,
            "seed": seed}


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (sensible near 0 and 1, unlike the normal one), by scipy."""
    if n <= 0 or not 0 <= successes <= n:
        raise LigeroError(f"Wilson interval needs 0 <= successes <= n and n > 0, got successes={successes}, n={n}")
    _check_level(level)
    ci = sps.binomtest(int(successes), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return max(0.0, float(ci.low)), min(1.0, float(ci.high))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (family-wise error control over all the tests given), in input order."""
    p = [float(x) for x in p_values]
    if any(not 0 <= x <= 1 for x in p):
        raise LigeroError("p-values must lie in [0, 1]")
    order = sorted(range(len(p)), key=p.__getitem__)
    adjusted, running = [0.0] * len(p), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        adjusted[i] = running
    return adjusted


def benjamini_hochberg(p_values: Sequence[float], q: float = 0.05) -> dict:
    """Benjamini-Hochberg over a family of tests: adjusted p-values (q-values, by scipy) in input order and which
    tests are discoveries at false-discovery rate `q` (adjusted p <= q)."""
    p = np.asarray([float(x) for x in p_values], dtype=float)
    if p.ndim != 1 or np.any(~np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise LigeroError("p-values must be finite and lie in [0, 1]")
    _check_level(1 - q)
    if p.size == 0:
        return {"q_values": [], "discoveries": [], "q": q, "m": 0}
    adjusted = sps.false_discovery_control(p, method="bh")
    return {"q_values": [float(x) for x in adjusted], "discoveries": [bool(x <= q) for x in adjusted], "q": q,
            "m": int(p.size)}


def paired_p_value(differences: Sequence[float]) -> float:
    """Two-sided p-value that paired per-item differences have mean zero: the paired t-test (by scipy), which is
    what the bootstrap's interval approximates for a mean; 1.0 when every difference is zero."""
    d = np.asarray(differences, dtype=float)
    if d.ndim != 1 or d.size < 2:
        raise LigeroError(f"a paired test needs at least two per-item differences, got {d.size}")
    if not np.any(d != d[0]):  # constant: t undefined; no spread means no evidence unless all equal and nonzero
        return 1.0 if d[0] == 0 else 0.0
    return float(sps.ttest_1samp(d, 0.0).pvalue)


def detectable_difference(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true mean difference a two-sided paired test at level `alpha` detects with probability `power`,
    given the per-item differences' standard deviation `sd` over `n` items (normal approximation):
    (z_{1-alpha/2} + z_{power}) * sd / sqrt(n)."""
    if n < 1 or sd < 0:
        raise LigeroError(f"detectable difference needs n >= 1 and sd >= 0, got n={n}, sd={sd}")
    _check_level(1 - alpha)
    _check_level(power)
    return float((sps.norm.ppf(1 - alpha / 2) + sps.norm.ppf(power)) * sd / np.sqrt(n))


def fewest_one_way_flips(alpha: float = 0.05) -> int:
    """The fewest discordant pairs, all leaning one way, that McNemar's exact test calls significant at `alpha`
    (two-sided p = 2 * 0.5^d): 6 at 0.05. A sample of n paired binary outcomes cannot show a net change below
    this count / n, however little else moves."""
    _check_level(1 - alpha)
    return int(np.ceil(np.log2(2 / alpha)))


def paired_test(differences: Sequence[float], alpha: float = 0.05, power: float = 0.8) -> dict:
    """A paired comparison's test and what its sample can show: the paired t-test's p-value, the per-item
    differences' spread and the smallest mean difference detectable at `power` (same units as the differences)."""
    d = np.asarray(differences, dtype=float)
    sd = float(d.std(ddof=1)) if d.size > 1 else 0.0
    return {"test": "paired t", "p_value": paired_p_value(d), "n": int(d.size), "sd": sd,
            "detectable": detectable_difference(sd, int(d.size), alpha, power)}


def paired_binary_test(base: Sequence[bool], variant: Sequence[bool], scale: float = 1.0, alpha: float = 0.05,
                       power: float = 0.8) -> dict:
    """The same for a binary outcome per item (a share, times `scale`: 100 for percentage points): McNemar's exact
    p-value, and a detectable change no smaller than the fewest one-way flips McNemar can call significant."""
    table = flip_table(base, variant)
    d = scale * (np.asarray(variant, dtype=float) - np.asarray(base, dtype=float))
    n = table["n"]
    sd = float(d.std(ddof=1)) if n > 1 else 0.0
    floor = scale * fewest_one_way_flips(alpha) / n
    return {"test": "McNemar exact", "p_value": mcnemar(table["base_only"], table["variant_only"])["p_value"],
            "n": n, "sd": sd, "detectable": max(detectable_difference(sd, n, alpha, power), min(scale, floor))}
