"""The audit's sample-size budgets, by name (a light module: the command line lists them without importing torch)."""

from __future__ import annotations

from ligero.errors import LigeroError

# llama.cpp's types people deploy (Q8_0, Q4_K_M, Q4_0) beside Ligero's schemes: int4 (group 32, asymmetric: GGUF
# Q4_1's grid), SmoothQuant W8A8, NVFP4 and ternary.
# (Learned rounding and a quantized KV cache stay in the catalog, not in the default run: AdaRound alone takes ~4 min
# to build, a fifth of the standard budget.)
DEFAULT_VARIANTS = ("q8_0", "q4_k_m", "q4_0", "int4", "w8a8", "nvfp4", "b158")

# A run's sample sizes come in three budgets. Each metric declares its own sizes (Metric.budget_quick,
# budget_full = standard, budget_thorough = what grows beyond standard); these belong to building variants and
# comparing them. The standard time is measured (docs/audit-smollm2.md); the others are estimates for the default
# run (the baseline, the file as shipped and 7 variants) on 2 idle CPU cores, from per-item timings (e.g. 0.11 s per
# CrowS-Pairs pair, 0.15 s per BBQ question, 0.3 s per toxicity prompt and sample pair); every run records what each
# metric took (phase_seconds).
BUDGETS = {
    "quick": "a smoke run (CI): a few items per metric, about 3 min; detects only large changes",
    "standard": "the default: CrowS-Pairs 200 pairs, StereoSet 100, WinoBias 100, BBQ 36, toxicity 100 prompts x "
                "2 samples; 19 min measured for the default 9 models on 2 idle CPU cores",
    "thorough": "every CrowS-Pairs pair, StereoSet item, WinoBias sentence and BBQ question, toxicity 400 prompts x "
                "4 samples, 4x the perplexity tokens: about 3 hours on 2 CPU cores",
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
