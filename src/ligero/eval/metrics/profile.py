"""The reference profile: ordinary prompts answered as `ligero serve` answers them, for drift monitoring."""

from __future__ import annotations

from ligero.eval.metrics.base import MeasureContext, Metric, number
from ligero.eval.profile import reference_profile

SIGNALS = ("output_length", "mean_logprob", "toxicity_score", "prompt_length", "latency_ms")


class Profile(Metric):
    name = "profile"
    title = "reference profile"
    # 40 requests give drift monitoring its KS tests; PSI / Jensen-Shannon need more (ligero.serve.drift).
    budget_full = {"profile_prompts": 24, "profile_tokens": 32}  # `ligero card profile` measures a larger one
    budget_quick = {"profile_prompts": 8, "profile_tokens": 10}

    def measure(self, ctx: MeasureContext) -> dict:
        n = ctx.budget["profile_prompts"]
        with ctx.step(f"reference profile ({n} requests)", n) as advance:
            return {"profile": reference_profile(ctx.model, ctx.tokenizer, n_prompts=n,
                                                 max_new_tokens=ctx.budget["profile_tokens"], progress=advance)}

    def inputs(self, base: dict) -> dict:
        return {"profile_prompts": base["profile"]["prompts"]}

    def card_fields(self, result: dict, row: dict, comparison: dict | None) -> dict[str, dict]:
        return {"monitoring": {"reference_profile": result["profile"]}}

    def card_schema(self) -> dict[str, dict]:
        profile = {"type": "object", "required": ["prompts", "sampling", "n", *SIGNALS],
                   "properties": {"prompts": {"type": "object"}, "sampling": {"type": "object"},
                                  "n": {"type": "integer", "minimum": 1},
                                  **{s: {"$ref": "#/$defs/distribution"} for s in SIGNALS}}}
        return {"monitoring": {"required": ["reference_profile"], "properties": {"reference_profile": profile}}}

    def card_markdown(self, card: dict) -> dict[str, list[str]]:
        p = card["monitoring"]["reference_profile"]
        s = p["sampling"]
        return {"monitoring": [
            f"- Reference profile: {p['n']} responses to {p['prompts'].get('description', 'the evaluation prompts')}, "
            f"sampled at temperature {s['temperature']}, top_p {s['top_p']}, up to {s['max_new_tokens']} new tokens.",
            "- `ligero serve --card` uses these sampling settings as its request defaults, so unspecified requests "
            "are answered as the profile was.",
            "",
            "| signal | mean | p50 | p95 |",
            "|---|---|---|---|",
            *[f"| {k} | {number(p[k]['mean'])} | {number(p[k]['p50'])} | {number(p[k]['p95'])} |" for k in SIGNALS],
            "",
        ]}

    def report_samples(self, budget) -> str:
        return f"reference profile {budget['profile_prompts']} requests of up to {budget['profile_tokens']} tokens"
