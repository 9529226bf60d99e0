"""Speed: prefill and batch-1 decode throughput and per-token decode latency."""

from __future__ import annotations

from ligero.eval.metrics.base import MeasureContext, Metric, Thresholds, number
from ligero.eval.metrics.plots import scatter
from ligero.eval.speed import MachineLoad, cpu_flags, measure_speed, speed_runs, token_latencies_ms
from ligero.eval.variants import BASELINE

# A speed figure decides a recommendation only when it is trustworthy: repeated (a spread to judge it by) on a
# machine other processes left mostly alone while it was timed.
MIN_REPEATS = 3
MAX_OTHER_LOAD = 0.2  # share of all cores' time used by other processes while timing


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
            with MachineLoad() as load:
                speed = measure_speed(ctx.model, prefill_tokens=b["prefill_tokens"],
                                      decode_tokens=b["decode_tokens"], repeats=b["speed_repeats"],
                                      progress=advance).summary()
        runs = speed["decode_runs_s"]
        speed["decode_spread"] = (max(runs) - min(runs)) / sorted(runs)[len(runs) // 2] if runs else None
        speed["other_cpu_load"], speed["cpu_flags"] = load.other, cpu_flags()
        return {"speed": speed, "latency_ms_per_token": token_latencies_ms(ctx.model, b["decode_tokens"])}

    def row(self, result: dict, comparison: dict | None) -> dict:
        s = result["speed"]
        return {"decode_tok_s": s["decode_tok_s"], "prefill_tok_s": s["prefill_tok_s"],
                "speed_untrusted": untrusted(s)}

    def criterion(self, thresholds: Thresholds, base_row) -> str:
        return f"decode ≥ {thresholds.decode_floor(base_row):.1f} tok/s"

    def _miss(self, row, thresholds: Thresholds, base_row) -> str:
        floor = thresholds.decode_floor(base_row)
        return "" if row["decode_tok_s"] >= floor else f"decode {row['decode_tok_s']:.1f} tok/s < {floor:.1f}"

    def failures(self, row, thresholds: Thresholds, base_row) -> list[str]:
        miss = self._miss(row, thresholds, base_row)
        reliable = not row.get("speed_untrusted") and not base_row.get("speed_untrusted")
        return [miss] if miss and reliable else []

    def cautions(self, row, thresholds: Thresholds, base_row) -> list[str]:
        miss = self._miss(row, thresholds, base_row)
        why = row.get("speed_untrusted") or base_row.get("speed_untrusted")
        return [f"{miss}, not counted: {why}"] if miss and why else []

    def card_fields(self, result: dict, row: dict, comparison: dict | None) -> dict[str, dict]:
        s = result["speed"]
        conditions = {k: s[k] for k in ("other_cpu_load", "cpu_flags", "decode_spread", "decode_runs_s")
                      if s.get(k) is not None}  # results measured before these were recorded lack some
        return {"hardware": {"decode_tok_s": row["decode_tok_s"], "prefill_tok_s": row["prefill_tok_s"],
                             "speed_conditions": {**conditions, "untrusted": row.get("speed_untrusted") or None},
                             "latency_ms_per_token": {k: result["latency_ms_per_token"][k] for k in ("p50", "p95")}}}

    def card_schema(self) -> dict[str, dict]:
        positive = {"type": "number", "exclusiveMinimum": 0}
        return {"hardware": {"required": ["decode_tok_s", "prefill_tok_s", "latency_ms_per_token"],
                             "properties": {"decode_tok_s": positive, "prefill_tok_s": positive,
                                            "latency_ms_per_token": {"$ref": "#/$defs/quantiles"},
                                            "speed_conditions": {
                                                "type": "object",
                                                "properties": {
                                                    "other_cpu_load": {"type": ["number", "null"], "minimum": 0,
                                                                       "maximum": 1},
                                                    "cpu_flags": {"type": "array", "items": {"type": "string"}},
                                                    "decode_spread": {"type": ["number", "null"], "minimum": 0},
                                                    "untrusted": {"type": ["string", "null"]}}}}}}

    def card_markdown(self, card: dict) -> dict[str, list[str]]:
        h = card["hardware"]
        latency = h["latency_ms_per_token"]
        return {"hardware": [f"- Decode {number(h['decode_tok_s'], 1)} tok/s (latency per token p50 "
                             f"{number(latency['p50'], 1)} ms, p95 {number(latency['p95'], 1)} ms); prefill "
                             f"{number(h['prefill_tok_s'], 0)} tok/s.", *conditions_lines(h.get("speed_conditions"))]}

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


def untrusted(speed: dict) -> str:
    """Why a speed figure should not decide anything ('' when it may): too few repeats, or a busy machine."""
    repeats = len(speed.get("decode_runs_s", []))
    if repeats < MIN_REPEATS:
        return f"timed {repeats}x (fewer than {MIN_REPEATS} repeats: a --quick run)"
    load = speed.get("other_cpu_load")
    if load is not None and load > MAX_OTHER_LOAD:
        return f"other processes used {load:.0%} of the CPU while it was timed"
    return ""


def conditions_lines(c: dict | None) -> list[str]:
    if not c:
        return []
    load = c.get("other_cpu_load")
    spread = c.get("decode_spread")
    line = (f"- Timed with other processes using {'n/a' if load is None else f'{load:.0%}'} of the CPU; decode runs "
            f"spread {'n/a' if spread is None else f'{spread:.0%}'} of their median over "
            f"{len(c.get('decode_runs_s') or [])} repeats; CPU features "
            f"{', '.join(c.get('cpu_flags') or []) or 'n/a'}.")
    return [line] + ([f"- Not decisive: {c['untrusted']}."] if c.get("untrusted") else [])
