"""Memory: stored weights plus the KV cache at a given context (quantized caches counted packed)."""

from __future__ import annotations

from ligero.eval.metrics.base import MeasureContext, Metric, number
from ligero.eval.speed import kv_cache_mb
from ligero.models.transformer import stored_bytes


class Memory(Metric):
    name = "memory"
    title = "memory"
    budget_full = {"kv_context": 1024}  # tokens in the cache when its memory is measured
    budget_quick = {"kv_context": 256}

    def measure(self, ctx: MeasureContext) -> dict:
        context = ctx.budget["kv_context"]
        return {"memory_mb": {"weights": stored_bytes(ctx.model) / 1e6, "kv_cache": kv_cache_mb(ctx.model, context),
                              "context_tokens": context}}

    def row(self, result: dict, comparison: dict | None) -> dict:
        return {"memory_mb": result["memory_mb"]["weights"] + result["memory_mb"]["kv_cache"]}

    def card_fields(self, result: dict, row: dict, comparison: dict | None) -> dict[str, dict]:
        return {"hardware": {"memory_mb": result["memory_mb"]}}

    def card_schema(self) -> dict[str, dict]:
        memory = {"type": "object", "required": ["weights", "kv_cache", "context_tokens"],
                  "properties": {"weights": {"type": "number", "minimum": 0},
                                 "kv_cache": {"type": "number", "minimum": 0},
                                 "context_tokens": {"type": "integer", "minimum": 1}}}
        return {"hardware": {"required": ["memory_mb"], "properties": {"memory_mb": memory}}}

    def card_markdown(self, card: dict) -> dict[str, list[str]]:
        m = card["hardware"]["memory_mb"]
        return {"hardware": [f"- Memory: weights {number(m['weights'], 1)} MB + KV cache {number(m['kv_cache'], 1)} MB "
                             f"at {m['context_tokens']} tokens."]}

    def report_columns(self):
        return [("mem MB", lambda r: f"{r['memory_mb']:.0f}")]

    def report_legend(self, budget) -> str:
        return f"mem: weights + KV cache at {budget['kv_context']} tokens"
