"""Social bias: CrowS-Pairs and StereoSet intrasentence, with per-item flips and paired deltas against the baseline."""

from __future__ import annotations

import numpy as np

from ligero.eval import bias
from ligero.eval.metrics.base import (
    MeasureContext,
    Metric,
    ReportSection,
    Thresholds,
    card_interval,
    claim,
    delta_cell,
    flips_table,
    interval,
    number,
)
from ligero.eval.metrics.plots import pyplot
from ligero.eval.variants import BASELINE

# Scoring all 1,018 CrowS-Pairs pairs takes ~75 s per model on 2 CPU cores, so the full run scores a stratified
# 320 (every category, the same items on every run).
BATCH = 16


class Bias(Metric):
    name = "bias"
    title = "bias (CrowS-Pairs, StereoSet)"
    budget_full = {"crows_pairs": 200, "stereoset": 100}  # None would mean all items
    budget_quick = {"crows_pairs": 12, "stereoset": 6}
    budget_thorough = {"crows_pairs": None, "stereoset": None}  # every item (no replication sample is left)
    replicable = True

    def measure(self, ctx: MeasureContext) -> dict:
        """Both benchmarks; on the replication sample (ctx.sample 1) only those the run left fresh items of."""
        n_crows, n_stereo = ctx.budget["crows_pairs"], ctx.budget["stereoset"]
        out = {}
        if ctx.sample == 0 or bias.fresh_items_left(len(bias.load_crows_pairs()[0]), n_crows):
            with ctx.step("CrowS-Pairs sentences", 2 * n_crows if n_crows else None) as advance:
                out["crows_pairs"] = bias.crows_pairs(ctx.model, ctx.tokenizer, limit=n_crows, batch_size=BATCH,
                                                      progress=advance, sample=ctx.sample).to_dict()
        if ctx.sample == 0 or bias.fresh_items_left(len(bias.load_stereoset()[0]), n_stereo):
            with ctx.step("StereoSet sentences", 3 * n_stereo if n_stereo else None) as advance:
                out["stereoset"] = bias.stereoset(ctx.model, ctx.tokenizer, limit=n_stereo, batch_size=BATCH,
                                                  progress=advance, sample=ctx.sample).to_dict()
        return out

    def compare(self, base: dict, variant: dict, n_resamples: int) -> dict:
        out = {}
        for key, result_type in (("crows_pairs", bias.CrowsPairsResult), ("stereoset", bias.StereoSetResult)):
            if key in base and key in variant:  # a replication sample may lack one (the run scored every item)
                out[key] = bias.compare_bias(result_type.from_dict(base[key]), result_type.from_dict(variant[key]),
                                             n_resamples=n_resamples)
        return out

    def claims(self, comparison: dict) -> list[dict]:
        out = []
        if "crows_pairs" in comparison:  # absent from a comparison without this metric's results
            out.append(claim(self.name, "crows_pairs.pct_stereotype", "CrowS-Pairs % stereotype", "points",
                             comparison["crows_pairs"]["pct_stereotype"]))
        if "stereoset" in comparison:
            out.append(claim(self.name, "stereoset.ss", "StereoSet ss", "points", comparison["stereoset"]["ss"]))
        return out

    def inputs(self, base: dict) -> dict:
        return {"crows_pairs": base["crows_pairs"]["data"], "stereoset": base["stereoset"]["data"]}

    def row(self, result: dict, comparison: dict | None) -> dict:
        crows = bias.CrowsPairsResult.from_dict(result["crows_pairs"]).summary()
        ss = bias.StereoSetResult.from_dict(result["stereoset"]).summary()
        row = {"pct_stereotype": crows["pct_stereotype"], "stereoset_ss": ss["ss"], "stereoset_lms": ss["lms"]}
        if comparison is not None:
            c, s = comparison["crows_pairs"], comparison["stereoset"]
            row.update({
                "delta_pct_stereotype": c["pct_stereotype"]["delta"],
                "delta_pct_stereotype_ci": c["pct_stereotype"]["delta_ci"],
                "crows_flip_rate": c["flips"]["flip_rate"], "crows_mcnemar_p": c["flips"]["mcnemar"]["p_value"],
                "delta_stereoset_ss": s["ss"]["delta"], "delta_stereoset_ss_ci": s["ss"]["delta_ci"],
            })
        return row

    def criterion(self, thresholds: Thresholds, base_row) -> str:
        return f"bias shift ≤ {thresholds.max_bias_shift:g} points"

    def _exceeding(self, row, thresholds: Thresholds) -> list[tuple[str, str, bool]]:
        """(text, key, is a finding) of each bias change beyond the threshold; a row without claims counts every
        change as a finding (strict)."""
        out = []
        for key, label, delta in (("crows_pairs.pct_stereotype", "CrowS-Pairs", row["delta_pct_stereotype"]),
                                  ("stereoset.ss", "StereoSet ss", row["delta_stereoset_ss"])):
            if abs(delta) > thresholds.max_bias_shift:
                c = row.get("claims", {}).get(key)
                found = c is None or c["finding"]
                q = f", q {c['q_value']:.2g}, n {c['n']}" if c else ""
                out.append((f"bias shift: {label} {delta:+.2f} points > {thresholds.max_bias_shift:g}{q}", key,
                            found))
        return out

    def failures(self, row, thresholds: Thresholds, base_row) -> list[str]:
        return [text for text, _, found in self._exceeding(row, thresholds) if found]

    def cautions(self, row, thresholds: Thresholds, base_row) -> list[str]:
        return [f"{text}, but not a finding after false-discovery control: the sample cannot tell it from noise"
                for text, _, found in self._exceeding(row, thresholds) if not found]

    def card_fields(self, result: dict, row: dict, comparison: dict | None) -> dict[str, dict]:
        ss, lms = row["stereoset_ss"], row["stereoset_lms"]
        crows = {"pct_stereotype": row["pct_stereotype"], "n": len(result["crows_pairs"]["ids"])}
        stereo = {"ss": ss, "lms": lms, "icat": lms * min(ss, 100 - ss) / 50, "n": len(result["stereoset"]["ids"])}
        if comparison is not None:
            c, s = comparison["crows_pairs"], comparison["stereoset"]
            crows.update({"delta_pct_stereotype": card_interval(c["pct_stereotype"]),
                          "flip_rate": c["flips"]["flip_rate"], "mcnemar_p": c["flips"]["mcnemar"]["p_value"],
                          "per_category_delta": {k: card_interval(v["pct_stereotype"])
                                                 for k, v in c["per_category"].items()}})
            stereo.update({"delta_ss": card_interval(s["ss"]), "flip_rate": s["flips"]["flip_rate"]})
        return {"metrics": {"bias": {"crows_pairs": crows, "stereoset": stereo}}}

    def card_schema(self) -> dict[str, dict]:
        return {"metrics": {"required": ["bias"],
                            "properties": {"bias": {"type": "object", "required": ["crows_pairs", "stereoset"]}}}}

    def card_markdown(self, card: dict) -> dict[str, list[str]]:
        crows, stereo = card["metrics"]["bias"]["crows_pairs"], card["metrics"]["bias"]["stereoset"]
        return {"metrics": [
            f"| CrowS-Pairs pct_stereotype | {number(crows['pct_stereotype'], 1)} % (50 % is unbiased) |",
            f"| Δ pct_stereotype [95 % CI] | {interval(crows.get('delta_pct_stereotype'), signed=True)} points |",
            f"| CrowS-Pairs items flipped | {number(crows.get('flip_rate', 0.0) * 100, 1)} % (McNemar p = "
            f"{number(crows.get('mcnemar_p'), 3)}) |",
            f"| StereoSet ss / lms / icat | {number(stereo['ss'], 1)} / {number(stereo['lms'], 1)} / "
            f"{number(stereo['icat'], 1)} |",
        ]}

    def sample_sizes(self, result: dict) -> list[str]:
        return [f"CrowS-Pairs {len(result['crows_pairs']['ids'])}", f"StereoSet {len(result['stereoset']['ids'])}"]

    def report_columns(self):
        return [("pct_stereo", lambda r: f"{r['pct_stereotype']:.1f}"),
                ("Δ stereo [CI]", lambda r: delta_cell(r, "delta_pct_stereotype")),
                ("flips %", lambda r: f"{100 * r['crows_flip_rate']:.1f}" if "crows_flip_rate" in r else ""),
                ("ss", lambda r: f"{r['stereoset_ss']:.1f}")]

    def report_samples(self, budget) -> str:
        return (f"CrowS-Pairs {budget['crows_pairs'] or 'all'} pairs (stratified by category); StereoSet "
                f"intrasentence {budget['stereoset'] or 'all'} items")

    def report_legend(self, budget) -> str:
        return "flips: CrowS-Pairs items whose preference changed (McNemar's test in the bias flips table)"

    def report_figures(self, report: dict, results: dict):
        if not report["comparisons"]:
            return []
        return [("bias_deltas", "Bias shift per category", _bias_figure(report["comparisons"]))]

    def report_sections(self, report: dict) -> list[ReportSection]:
        table = flips_table(report["comparisons"], "crows_pairs", "stereotype")
        note = (f"CrowS-Pairs items whose stereotype preference differs from {BASELINE}'s: to stereotype = the "
                "variant newly prefers the stereotypical sentence, to anti = it stopped; McNemar's exact test asks "
                "whether flips lean one way.")
        return [ReportSection("Bias flips (CrowS-Pairs, McNemar)", table=table, note=note)] if len(table) > 1 else []


def _bias_figure(comparisons: dict):
    """Δ pct_stereotype per CrowS-Pairs category with 95 % bootstrap intervals, one marker per variant."""
    variants = list(comparisons)
    cats = ["overall"] + list(comparisons[variants[0]]["crows_pairs"]["per_category"])
    fig, ax = pyplot().subplots(figsize=(7, 0.45 * len(cats) + 1.5))
    width = 0.8 / len(variants)
    for j, v in enumerate(variants):
        c = comparisons[v]["crows_pairs"]
        entries = [c["pct_stereotype"]] + [c["per_category"][k]["pct_stereotype"] for k in cats[1:]]
        y = np.arange(len(cats)) + (j - (len(variants) - 1) / 2) * width
        d = np.array([e["delta"] for e in entries])
        lo = d - np.array([e["delta_ci"][0] for e in entries])
        hi = np.array([e["delta_ci"][1] for e in entries]) - d
        ax.errorbar(d, y, xerr=[lo, hi], fmt="o", ms=3, capsize=2, label=v)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(np.arange(len(cats)), cats)
    ax.invert_yaxis()
    ax.set_xlabel(f"Δ pct_stereotype vs {BASELINE} (points, 95 % CI)")
    ax.set_title("CrowS-Pairs: bias shift per category")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3, axis="x")
    return fig
