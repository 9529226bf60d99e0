"""benchmarks/export_ppl.py's paired comparison of two engines' per-token log-probabilities, on hand-made
numbers (the benchmark itself needs llama.cpp and is not run here)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def export_ppl():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("export_ppl", ROOT / "benchmarks" / "export_ppl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_gap_is_the_ratio_of_the_two_perplexities():
    rng = np.random.default_rng(0)
    ours = -rng.exponential(3.0, size=4 * 50)
    theirs = ours + rng.normal(0.002, 0.01, size=ours.size)  # llama.cpp a little more confident on average
    gap = export_ppl().paired_gap(theirs, ours, [50] * 4)
    ppl = lambda lp: math.exp(-lp.mean())  # noqa: E731
    assert gap["delta_pct"] == pytest.approx(100 * (ppl(theirs) / ppl(ours) - 1), rel=1e-9)
    lo, hi = gap["ci95_pct"]
    assert lo < gap["delta_pct"] < hi
    assert gap["tokens_differing"] == int((np.abs(theirs - ours) > 1e-4).sum())


def test_the_interval_comes_from_windows_not_tokens():
    """A whole window moved one way is one draw: its 50 tokens must not shrink the interval as 50 draws would."""
    ours = np.full(200, -2.0)
    theirs = ours.copy()
    theirs[:50] -= 0.01  # one window of four differs, every token the same way
    gap = export_ppl().paired_gap(theirs, ours, [50] * 4)
    lo, hi = gap["ci95_pct"]
    assert lo < 0 < hi  # one window in four: not distinguishable from no gap
    assert gap["tokens_differing"] == 50
    identical = export_ppl().paired_gap(ours, ours, [50] * 4)
    assert identical["delta_pct"] == 0 and identical["ci95_pct"] == [0.0, 0.0]
