"""Gender bias in pronoun resolution: WinoBias, which pronoun a model finds likelier for an occupation, against the
baseline item by item (flips, McNemar) — scored as CrowS-Pairs is (ligero.eval.bias)."""

from __future__ import annotations

from ligero.eval import bias
from ligero.eval.metrics.base import (
    MeasureContext,
    Metric,
    ReportSection,
    claim,
    delta_cell,
    flips_table,
    number,
)

BATCH = 16


class WinoBias(Metric):
    name = "winobias"
    title = "gender bias in pronoun resolution (WinoBias)"
    budget_full = {"winobias": 100}  # of 761 sentences, stratified by pronoun
    budget_quick = {"winobias": 12}
    budget_thorough = {"winobias": None}
    replicable = True

    def measure(self, ctx: MeasureContext) -> dict:
        n = ctx.budget["winobias"]
        if ctx.sample == 1 and not bias.fresh_items_left(len(bias.load_winobias()[0]), n):
            return {}  # the run scored every sentence: nothing fresh to replicate on
        with ctx.step("WinoBias sentences", 2 * n if n else None) as advance:
            result = bias.winobias(ctx.model, ctx.tokenizer, limit=n, batch_size=BATCH, progress=advance,
                                   sample=ctx.sample)
        return {"winobias": result.to_dict()}

    def compare(self, base: dict, variant: dict, n_resamples: int) -> dict:
        if "winobias" not in base or "winobias" not in variant:
            return {}
        return {"winobias": bias.compare_winobias(bias.WinoBiasResult.from_dict(base["winobias"]),
                                                  bias.WinoBiasResult.from_dict(variant["winobias"]),
                                                  n_resamples=n_resamples)}

    def claims(self, comparison: dict) -> list[dict]:
        if "winobias" not in comparison:  # a comparison without this metric's results
            return []
        return [claim(self.name, "winobias.pct_pro", "WinoBias % pro-stereotypical pronoun", "points",
                      comparison["winobias"]["pct_pro"])]

    def inputs(self, base: dict) -> dict:
        return {"winobias": base["winobias"]["data"]}

    def row(self, result: dict, comparison: dict | None) -> dict:
        summary = bias.WinoBiasResult.from_dict(result["winobias"]).summary()
        row = {"winobias_pct_pro": summary["pct_pro"]}
        if comparison is not None:
            c = comparison["winobias"]["pct_pro"]
            row.update({"delta_winobias_pct_pro": c["delta"], "delta_winobias_pct_pro_ci": c["delta_ci"]})
        return row

    def card_fields(self, result: dict, row: dict, comparison: dict | None) -> dict[str, dict]:
        summary = bias.WinoBiasResult.from_dict(result["winobias"]).summary()
        return {"metrics": {"winobias": {**summary, "delta_pct_pro": row.get("delta_winobias_pct_pro")}}}

    def card_schema(self) -> dict[str, dict]:
        pct = {"type": ["number", "null"], "minimum": 0, "maximum": 100}
        return {"metrics": {"properties": {"winobias": {
            "type": "object", "required": ["n", "pct_pro"],
            "properties": {"n": {"type": "integer", "minimum": 1}, "pct_pro": pct, "pct_pro_female": pct,
                           "pct_pro_male": pct, "delta_pct_pro": {"type": ["number", "null"]}}}}}}

    def card_markdown(self, card: dict) -> dict[str, list[str]]:
        w = card["metrics"].get("winobias")
        if not w:
            return {}
        delta = "" if w.get("delta_pct_pro") is None else f" (Δ {w['delta_pct_pro']:+.1f})"
        return {"metrics": [f"| WinoBias: pro-stereotypical pronoun preferred (50 = no gap) | "
                            f"{number(w['pct_pro'], 1)} %{delta} on {w['n']} sentences (she/her "
                            f"{number(w['pct_pro_female'], 1)} %, he/his/him {number(w['pct_pro_male'], 1)} %) |"]}

    def sample_sizes(self, result: dict) -> list[str]:
        return [f"WinoBias {len(result['winobias']['ids'])} sentences"]

    def report_columns(self):
        return [("WinoBias pro %", lambda r: f"{r['winobias_pct_pro']:.1f}"),
                ("Δ WinoBias", lambda r: delta_cell(r, "delta_winobias_pct_pro", 1))]

    def report_samples(self, budget) -> str:
        return f"WinoBias {budget['winobias'] or 'all 761'} sentences"

    def report_sections(self, report: dict) -> list[ReportSection]:
        table = flips_table(report["comparisons"], "winobias", "pro-stereotype")
        return [ReportSection("WinoBias: pronoun preferences that changed", table=table,
                              note="Sentences whose preferred pronoun differs from the baseline's: to pro-stereotype = "
                                   "the variant newly prefers the pronoun the occupation's stereotype expects.")]
