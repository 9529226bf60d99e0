"""The audit's sample-size budgets, by name (a light module: the command line lists them without importing torch)."""

from __future__ import annotations

from ligero.errors import LigeroError

# A run's sample sizes come in three budgets. Each metric declares its own sizes (Metric.budget_quick,
# budget_full = standard, budget_thorough = what grows beyond standard); these belong to building variants and
# comparing them. The times are the default run's (the baseline and 8 variants) on 2 CPU cores, measured in
# docs/audit-smollm2.md.
BUDGETS = {
    "quick": "a smoke run (CI): a few items per metric, about 3 min; detects only large changes",
    "standard": "the default: samples sized to fit 20 min on 2 CPU cores",
    "thorough": "every CrowS-Pairs pair, WinoBias sentence and StereoSet item, 4x the toxicity prompts and "
                "perplexity tokens: about an hour on 2 CPU cores",
}
BUILD_BUDGETS = {
    "quick": {"calib_windows": 1, "adaround_iters": 4, "lsq_steps": 2, "bootstrap": 300},
    "standard": {"calib_windows": 8, "adaround_iters": 40, "lsq_steps": 60, "bootstrap": 1000},
    "thorough": {"calib_windows": 8, "adaround_iters": 40, "lsq_steps": 60, "bootstrap": 2000},
}


def check_budget(budget: str) -> str:
    if budget not in BUDGETS:
        raise LigeroError(f"unknown budget '{budget}'; use one of: {', '.join(BUDGETS)}")
    return budget
