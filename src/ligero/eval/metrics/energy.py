"""Energy per 1,000 decoded tokens (batch 1, greedy), from CodeCarbon: read from energy counters where the machine
has them, an estimate (labelled) where it does not (ligero.eval.energy)."""

from __future__ import annotations

from ligero.eval.energy import decode_energy, energy_text
from ligero.eval.metrics.base import MeasureContext, Metric, number


class Energy(Metric):
    name = "energy"
    title = "energy per 1,000 decoded tokens (CodeCarbon)"
    timed = True
    budget_full = {"energy_tokens": 64}
    budget_quick = {"energy_tokens": 8}

    def measure(self, ctx: MeasureContext) -> dict:
        n = ctx.budget["energy_tokens"]
        with ctx.step(f"energy ({n} decoded tokens)", None):
            return {"energy": decode_energy(ctx.model, n)}

    def row(self, result: dict, comparison: dict | None) -> dict:
        e = result.get("energy")  # results measured before energy was recorded lack it
        return {"wh_per_1k_tokens": e["wh_per_1k_tokens"] if e else None,
                "energy_estimate": e["estimate"] if e else None}

    def card_fields(self, result: dict, row: dict, comparison: dict | None) -> dict[str, dict]:
        e = result.get("energy")
        if not e:
            return {}
        return {"hardware": {"energy_per_1k_tokens": {
            "wh": e["wh_per_1k_tokens"], "cpu_wh": e["cpu_wh_per_1k_tokens"], "ram_wh": e["ram_wh_per_1k_tokens"],
            "gpu_wh": e["gpu_wh_per_1k_tokens"], "estimate": e["estimate"], "tokens": e["tokens"],
            "how": energy_text(e)}}}

    def card_schema(self) -> dict[str, dict]:
        wh = {"type": "number", "minimum": 0}
        return {"hardware": {"properties": {"energy_per_1k_tokens": {
            "type": "object", "required": ["wh", "estimate", "how"],
            "properties": {"wh": wh, "cpu_wh": wh, "ram_wh": wh, "gpu_wh": wh, "estimate": {"type": "boolean"},
                           "tokens": {"type": "integer", "minimum": 1}, "how": {"type": "string"}}}}}}

    def card_markdown(self, card: dict) -> dict[str, list[str]]:
        e = card["hardware"].get("energy_per_1k_tokens")
        return {"hardware": [f"- Energy: {e['how']}."]} if e else {}

    def report_columns(self):
        def cell(r: dict) -> str:
            if r.get("wh_per_1k_tokens") is None:
                return "n/a"
            return f"{number(r['wh_per_1k_tokens'], 3)}{'*' if r.get('energy_estimate') else ''}"

        return [("Wh / 1k tok", cell)]

    def report_legend(self, budget) -> str:
        return ("Wh / 1k tok: energy per 1,000 batch-1 decoded tokens from CodeCarbon; * = an estimate (CPU load x "
                "the processor's rated TDP, RAM from a constant model: time re-scaled, not read from energy counters)")

    def report_samples(self, budget) -> str:
        return f"energy over {budget['energy_tokens']} decoded tokens"
