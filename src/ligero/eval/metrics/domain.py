"""Domain perplexity: what a fine-tuning run was for. Only in the audit of an adapter (`ligero audit --adapter`):
every model's perplexity on the held-out documents of the adapter's domain, the baseline (the base model before
fine-tuning) included, with ΔPPL's paired test as for the evaluation split. A fall is the specialization's gain; the
evaluation split's ΔPPL (the quality metric) is what it cost in general text (forgetting)."""

from __future__ import annotations

from ligero.eval.metrics.base import MeasureContext, Metric, claim, number
from ligero.eval.metrics.quality import delta_ppl_test, delta_ppl_text
from ligero.eval.perplexity import make_windows
from ligero.eval.quality import base_logprobs, compare_models

CARD_FIELDS = ("ppl", "ppl_base", "delta_ppl_pct", "tokens", "heldout_sha256")


class DomainPerplexity(Metric):
    name = "domain"
    title = "perplexity on the fine-tuning domain's held-out text"
    budget_full = {"domain_tokens": 4096}
    budget_quick = {"domain_tokens": 512}
    budget_thorough = {"domain_tokens": 16384}

    @staticmethod
    def windows(ctx: MeasureContext) -> tuple[list[int], list[list[int]]]:
        ids = ctx.shared["domain_ids"][: ctx.budget["domain_tokens"]]
        return ids, make_windows(ids, ctx.budget["ppl_ctx"], bos=ctx.bos)

    def prepare(self, ctx: MeasureContext) -> None:
        if "domain_ids" not in ctx.shared:
            return
        _, windows = self.windows(ctx)
        with ctx.step("baseline log-probs on the domain", len(windows)) as advance:
            ctx.shared["domain_baseline_logprobs"] = base_logprobs(ctx.base_model, windows, progress=advance)

    def measure(self, ctx: MeasureContext) -> dict:
        if "domain_ids" not in ctx.shared:
            return {}
        ids, windows = self.windows(ctx)
        with ctx.step("domain perplexity", len(windows)) as advance:
            result = compare_models(None, ctx.model, ids, ctx=ctx.budget["ppl_ctx"], bos=ctx.bos,
                                    base_lp=ctx.shared["domain_baseline_logprobs"],
                                    base_bytes=ctx.shared["baseline_bytes"], progress=advance)
        summary = result.summary()
        return {"domain": {k: summary[k] for k in ("ppl", "ppl_base", "delta_ppl_pct", "tokens", "nll_diff_blocks")
                           if k in summary} | {"heldout_sha256": ctx.shared["domain_sha256"]}}

    def compare(self, base: dict, variant: dict, n_resamples: int) -> dict:
        test = delta_ppl_test(variant["domain"]) if "domain" in variant else None
        return {"domain_ppl": test} if test else {}

    def claims(self, comparison: dict) -> list[dict]:
        if "domain_ppl" not in comparison:
            return []
        return [claim(self.name, "domain.delta_ppl_pct", "Δ domain PPL", "%", comparison["domain_ppl"])]

    def row(self, result: dict, comparison: dict | None) -> dict:
        d = result.get("domain")
        return {"domain_ppl": d["ppl"], "domain_delta_ppl_pct": d["delta_ppl_pct"]} if d else {}

    def card_fields(self, result: dict, row: dict, comparison: dict | None) -> dict[str, dict]:
        d = result.get("domain")
        return {"metrics": {"domain_perplexity": {k: d[k] for k in CARD_FIELDS}}} if d else {}

    def card_schema(self) -> dict[str, dict]:
        positive = {"type": "number", "exclusiveMinimum": 0}
        return {"metrics": {"properties": {"domain_perplexity": {
            "type": "object", "required": list(CARD_FIELDS),
            "properties": {"ppl": positive, "ppl_base": positive, "delta_ppl_pct": {"type": "number"},
                           "tokens": {"type": "integer", "minimum": 1}, "heldout_sha256": {"type": "string"}}}}}}

    def card_markdown(self, card: dict) -> dict[str, list[str]]:
        d = card["metrics"].get("domain_perplexity")
        if not d:
            return {}
        return {"metrics": [f"| domain perplexity (base before fine-tuning) | {number(d['ppl'])} "
                            f"({number(d['ppl_base'])}), {delta_ppl_text(d['delta_ppl_pct'])}, on {d['tokens']} "
                            "held-out tokens |"]}

    def sample_sizes(self, result: dict) -> list[str]:
        d = result.get("domain")
        return [f"domain perplexity {d['tokens']} held-out tokens"] if d else []

    def report_columns(self):
        return [("domain PPL", lambda r: f"{r['domain_ppl']:.4g}" if "domain_ppl" in r else ""),
                ("Δ domain PPL %", lambda r: delta_ppl_text(r["domain_delta_ppl_pct"], unit="")
                 if "domain_delta_ppl_pct" in r else "")]
