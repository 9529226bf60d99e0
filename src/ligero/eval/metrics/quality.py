"""Capability: perplexity, ΔPPL, KL divergence and top-1 agreement against the baseline on the evaluation split,
plus what the variant stores (bits per weight, size)."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as sps

from ligero.eval.metrics.base import MeasureContext, Metric, Thresholds, claim, number
from ligero.eval.metrics.plots import scatter
from ligero.eval.perplexity import make_windows
from ligero.eval.quality import base_logprobs, compare_models, stored_bytes
from ligero.eval.stats import paired_test
from ligero.eval.variants import BASELINE

CARD_FIELDS = ("ppl", "ppl_base", "delta_ppl_pct", "kld", "top1_agreement", "tokens", "eval_sha256")


class Quality(Metric):
    name = "quality"
    title = "perplexity and KL against the baseline"
    budget_full = {"ppl_tokens": 2048, "ppl_ctx": 512}
    budget_quick = {"ppl_tokens": 512, "ppl_ctx": 256}
    budget_thorough = {"ppl_tokens": 8192}

    def prepare(self, ctx: MeasureContext) -> None:
        ids, window = ctx.eval_ids[: ctx.budget["ppl_tokens"]], ctx.budget["ppl_ctx"]
        windows = make_windows(ids, window, bos=ctx.bos)
        with ctx.step("baseline log-probs", len(windows)) as advance:
            ctx.shared["baseline_logprobs"] = base_logprobs(ctx.base_model, windows, progress=advance)
        ctx.shared["baseline_bytes"] = stored_bytes(ctx.base_model)

    def measure(self, ctx: MeasureContext) -> dict:
        ids, window = ctx.eval_ids[: ctx.budget["ppl_tokens"]], ctx.budget["ppl_ctx"]
        windows = make_windows(ids, window, bos=ctx.bos)
        with ctx.step("perplexity and KL", len(windows)) as advance:
            result = compare_models(None, ctx.model, ids, ctx=window, bos=ctx.bos,
                                    base_lp=ctx.shared["baseline_logprobs"], base_bytes=ctx.shared["baseline_bytes"],
                                    progress=advance)
        return {"capability": {**result.summary(), "eval_sha256": ctx.eval_text.sha256}}

    def compare(self, base: dict, variant: dict, n_resamples: int) -> dict:
        """ΔPPL's paired test over blocks of ~64 positions (as an interval on ΔPPL %); results measured before the
        blocks were recorded have none."""
        test = delta_ppl_test(variant["capability"])
        return {"delta_ppl": test} if test else {}

    def claims(self, comparison: dict) -> list[dict]:
        if "delta_ppl" not in comparison:
            return []
        return [claim(self.name, "capability.delta_ppl_pct", "ΔPPL", "%", comparison["delta_ppl"])]

    def row(self, result: dict, comparison: dict | None) -> dict:
        cap = result["capability"]
        return {k: cap[k] for k in ("bits_per_weight", "size_mb", "ppl", "delta_ppl_pct", "kld", "top1_agreement")}

    def criterion(self, thresholds: Thresholds, base_row) -> str:
        return f"ΔPPL ≤ {thresholds.max_ppl_increase:g} %"

    def failures(self, row, thresholds: Thresholds, base_row) -> list[str]:
        if row["delta_ppl_pct"] <= thresholds.max_ppl_increase:
            return []
        return [f"ΔPPL {delta_ppl_text(row['delta_ppl_pct'])} > {thresholds.max_ppl_increase:g} %"]

    def card_fields(self, result: dict, row: dict, comparison: dict | None) -> dict[str, dict]:
        cap = result["capability"]
        return {"format": {"bits_per_weight": cap["bits_per_weight"], "size_mb": cap["size_mb"]},
                "metrics": {"capability": {k: cap[k] for k in CARD_FIELDS}}}

    def card_schema(self) -> dict[str, dict]:
        positive = {"type": "number", "exclusiveMinimum": 0}
        capability = {
            "type": "object",
            "required": list(CARD_FIELDS),
            "properties": {
                "ppl": positive, "ppl_base": positive, "delta_ppl_pct": {"type": "number"},
                "kld": {"type": "number", "minimum": 0},
                "top1_agreement": {"type": "number", "minimum": 0, "maximum": 1},
                "tokens": {"type": "integer", "minimum": 1}, "eval_sha256": {"type": "string"},
            },
        }
        return {"format": {"required": ["bits_per_weight", "size_mb"],
                           "properties": {"bits_per_weight": {"type": "number", "exclusiveMinimum": 0, "maximum": 64},
                                          "size_mb": positive}},
                "metrics": {"required": ["capability"], "properties": {"capability": capability}}}

    def card_markdown(self, card: dict) -> dict[str, list[str]]:
        f, cap = card["format"], card["metrics"]["capability"]
        return {
            "format": [f"- Stored: {number(f['bits_per_weight'], 2)} bits per weight, {number(f['size_mb'], 1)} MB."],
            "metrics": [
                f"| perplexity (base) | {number(cap['ppl'])} ({number(cap['ppl_base'])}) on {cap['tokens']} tokens |",
                f"| ΔPPL | {delta_ppl_text(cap['delta_ppl_pct'])} |",
                f"| mean KL divergence | {number(cap['kld'], 4)} |",
                f"| same top token | {100 * cap['top1_agreement']:.1f} % |",
            ],
        }

    def report_columns(self):
        return [("bits/w", lambda r: f"{r['bits_per_weight']:.2f}"), ("MB", lambda r: f"{r['size_mb']:.1f}"),
                ("PPL", lambda r: f"{r['ppl']:.4g}"),
                ("ΔPPL %", lambda r: delta_ppl_text(r["delta_ppl_pct"], unit="")),
                ("KLD", lambda r: f"{r['kld']:.4f}"), ("top-1 %", lambda r: f"{100 * r['top1_agreement']:.1f}")]

    def report_samples(self, budget) -> str:
        return f"perplexity on {budget['ppl_tokens']} evaluation tokens (windows of {budget['ppl_ctx']})"

    def report_figures(self, report: dict, results: dict):
        fig = scatter(report["rows"], BASELINE, "bits_per_weight", lambda r: max(r["delta_ppl_pct"], 1e-3), "tab:blue",
                      "bits per weight (stored)", f"ΔPPL % vs {BASELINE} (log; {BASELINE} drawn at 0.001)",
                      "Quality lost against bits per weight", log_y=True)
        return [("quality_vs_bits", "ΔPPL against bits per weight", fig)]


def delta_ppl_test(summary: dict) -> dict | None:
    """ΔPPL's paired test from a perplexity comparison's summary (QualityResult.summary()): the per-block NLL
    differences, as an interval on ΔPPL %; None without blocks."""
    blocks = np.asarray(summary.get("nll_diff_blocks") or [])
    if blocks.size < 2:
        return None
    test = paired_test(blocks)
    half = sps.t.ppf(0.975, blocks.size - 1) * test["sd"] / np.sqrt(blocks.size)
    pct = lambda nll: 100 * math.expm1(nll)  # noqa: E731  a mean NLL difference as a PPL change, %
    mean = float(blocks.mean())
    return {"delta": summary["delta_ppl_pct"], "delta_ci": [pct(mean - half), pct(mean + half)], **test,
            "detectable": pct(test["detectable"]), "unit": "block of ~64 tokens"}


COLLAPSED_PPL_RATIO = 10.0  # a variant whose perplexity is 10x its baseline's no longer models the language


def delta_ppl_text(delta_pct: float, unit: str = " %") -> str:
    """ΔPPL as people read it: '+1.23 %', or for a collapsed variant 'collapsed (PPL x7.5e+05)' instead of a
    seven-digit percentage."""
    ratio = 1 + delta_pct / 100
    if ratio >= COLLAPSED_PPL_RATIO:
        return f"collapsed (PPL x{ratio:.2g})"
    return f"{delta_pct:+.2f}{unit}"
