"""Prometheus series of `ligero serve` (GET /metrics): requests, latency, time to first token, tokens, guardrail
actions and feedback, plus each engine's state read at scrape time, named after llama.cpp server's gauges where they
mean the same: requests processing (rows held) and deferred (waiting for a row), busy rows per decode step, KV cache
use, decode steps run."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ligero.serve.engine import Engine

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """Prometheus series, in a registry of the app's own (several apps may live in one test process)."""

    def __init__(self, engines: dict[str, Engine]):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("ligero_requests", "Generation requests by outcome", ["variant", "endpoint", "status"],
                                registry=r)
        self.latency = Histogram("ligero_request_latency_seconds", "Request latency until the answer is complete",
                                 ["variant", "endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.first_token = Histogram("ligero_time_to_first_token_seconds", "Time until the first generated token",
                                     ["variant"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("ligero_tokens", "Tokens processed", ["variant", "kind"], registry=r)
        self.guardrails = Counter("ligero_guardrail_actions", "Guardrail decisions", ["variant", "rule", "action"],
                                  registry=r)
        self.feedback = Counter("ligero_feedback", "Feedback records", ["source"], registry=r)
        r.register(EngineCollector(engines))

    def text(self) -> bytes:
        """The Prometheus text exposition of every series."""
        return generate_latest(self.registry)


class EngineCollector:
    """Engine state read at scrape time."""

    def __init__(self, engines: dict[str, Engine]):
        self.engines = engines

    def collect(self):
        processing = GaugeMetricFamily("ligero_requests_processing", "Requests holding a batch row now",
                                       labels=["variant"])
        deferred = GaugeMetricFamily("ligero_requests_deferred", "Requests waiting for a batch row",
                                     labels=["variant"])
        busy = GaugeMetricFamily("ligero_busy_slots_per_decode", "Mean rows decoded per decode step since start",
                                 labels=["variant"])
        kv_tokens = GaugeMetricFamily("ligero_kv_cache_tokens", "Positions held in the KV cache", labels=["variant"])
        kv_ratio = GaugeMetricFamily("ligero_kv_cache_usage_ratio", "KV cache positions held / allocated",
                                     labels=["variant"])
        steps = CounterMetricFamily("ligero_decode_steps", "Decode steps run", labels=["variant"])
        rows = CounterMetricFamily("ligero_decode_rows", "Rows decoded, summed over the decode steps",
                                   labels=["variant"])
        reused = CounterMetricFamily("ligero_prompt_tokens_reused", "Prompt tokens whose keys a batch row still "
                                     "held (a shared prefix), not prefilled again", labels=["variant"])
        for name, e in self.engines.items():
            processing.add_metric([name], e.running)
            deferred.add_metric([name], e.queue_depth)
            busy.add_metric([name], e.busy_per_step)
            held, capacity = e.cache_tokens, e.cache_capacity  # counted once per scrape
            kv_tokens.add_metric([name], held)
            kv_ratio.add_metric([name], min(1.0, held / capacity) if capacity else 0.0)
            steps.add_metric([name], e.batches)
            rows.add_metric([name], e.stepped_rows)
            reused.add_metric([name], e.reused_tokens)
        yield from (processing, deferred, busy, kv_tokens, kv_ratio, steps, rows, reused)
