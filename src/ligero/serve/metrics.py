"""Prometheus series of `ligero serve` (GET /metrics): requests, latency, time to first token, tokens, guardrail
actions and feedback, plus the engines' queue depth, batch rows and batch count read at scrape time."""

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
    """Engine state read at scrape time: waiting requests, rows being decoded, batches decoded so far."""

    def __init__(self, engines: dict[str, Engine]):
        self.engines = engines

    def collect(self):
        depth = GaugeMetricFamily("ligero_queue_depth", "Requests waiting for a batch", labels=["variant"])
        rows = GaugeMetricFamily("ligero_batch_rows", "Rows in the batch being decoded now", labels=["variant"])
        batches = CounterMetricFamily("ligero_batches", "Batches decoded", labels=["variant"])
        for name, engine in self.engines.items():
            depth.add_metric([name], engine.queue_depth)
            rows.add_metric([name], engine.running)
            batches.add_metric([name], engine.batches)
        yield from (depth, rows, batches)
