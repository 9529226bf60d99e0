"""Speed: prefill and batch-1 decode throughput and per-token decode latency."""

from __future__ import annotations

from ligero.eval.metrics.base import MeasureContext, Metric, Thresholds, number
from ligero.eval.metrics.plots import scatter
from ligero.eval.speed import measure_speed, speed_runs, token_latencies_ms
from ligero.eval.variants import BASELINE


class Speed(Metric):
    name = "speed"
    title = "speed"
    timed = True
    budget_full = {"prefill_tokens": 256, "decode_tokens": 32, "speed_repeats": 3}
    budget_quick = {"prefill_tokens": 32, "decode_tokens": 8, "speed_repeats": 1}

    def measure(self, ctx: MeasureContext) -> dict:
        b = ctx.budget
        with ctx.step(f"speed (prefill {b['prefill_tokens']}, decode {b['decode_tokens']})",
                      speed_runs(b["speed_repeats"])) as advance:
            speed = measure_speed(ctx.model, prefill_tokens=b["prefill_tokens"], decode_tokens=b["decode_tokens"],
                                  repeats=b["speed_repeats"], progress=advance).summary()
        return {"speed": speed, "latency_ms_per_token": token_latencies_ms(ctx.model, b["decode_tokens"])}

    def row(self, result: dict, comparison: dict | None) -> dict:
        return {"decode_tok_s": result["speed"]["decode_tok_s"], "prefill_tok_s": result["speed"]["prefill_tok_s"]}

    def criterion(self, thresholds: Thresholds, base_row) -> str:
        return f"decode ≥ {thresholds.decode_floor(base_row):.1f} tok/s"

    def failures(self, row, thresholds: Thresholds, base_row) -> list[str]:
        floor = thresholds.decode_floor(base_row)
        return [] if row["decode_tok_s"] >= floor else [f"decode {row['decode_tok_s']:.1f} tok/s < {floor:.1f}"]

    def card_fields(self, result: dict, row: dict, comparison: dict | None) -> dict[str, dict]:
        return {"hardware": {"decode_tok_s": row["decode_tok_s"], "prefill_tok_s": row["prefill_tok_s"],
                             "latency_ms_per_token": {k: result["latency_ms_per_token"][k] for k in ("p50", "p95")}}}

    def card_schema(self) -> dict[str, dict]:
        positive = {"type": "number", "exclusiveMinimum": 0}
        return {"hardware": {"required": ["decode_tok_s", "prefill_tok_s", "latency_ms_per_token"],
                             "properties": {"decode_tok_s": positive, "prefill_tok_s": positive,
                                            "latency_ms_per_token": {"$ref": "#/$defs/quantiles"}}}}

    def card_markdown(self, card: dict) -> dict[str, list[str]]:
        h = card["hardware"]
        latency = h["latency_ms_per_token"]
        return {"hardware": [f"- Decode {number(h['decode_tok_s'], 1)} tok/s (latency per token p50 "
                             f"{number(latency['p50'], 1)} ms, p95 {number(latency['p95'], 1)} ms); prefill "
                             f"{number(h['prefill_tok_s'], 0)} tok/s."]}

    def report_columns(self):
        return [("decode tok/s", lambda r: f"{r['decode_tok_s']:.1f}"),
                ("prefill tok/s", lambda r: f"{r['prefill_tok_s']:.0f}")]

    def report_samples(self, budget) -> str:
        return (f"prefill {budget['prefill_tokens']} tokens, decode {budget['decode_tokens']} tokens × "
                f"{budget['speed_repeats']}")

    def report_figures(self, report: dict, results: dict):
        fig = scatter(report["rows"], BASELINE, "size_mb", "decode_tok_s", "tab:green", "size MB (stored)",
                      "decode tok/s (batch 1)", "Decode speed against size")
        return [("speed_vs_size", "Decode speed against size", fig)]
