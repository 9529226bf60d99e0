"""`ligero serve`: an OpenAI-compatible HTTP API over one model's variants, with guardrails, A/B assignment by user,
feedback capture and a store that every request, response, decision and assignment is committed to.

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with `stream: true` as server-sent events),
GET /v1/models, POST /v1/feedback, GET /health, GET /metrics (Prometheus text format).

Model names: the model id (e.g. "smollm2-135m") lets the A/B experiment pick the variant for the request's user
(X-User-Id header or the `user` field; no user -> the first variant, outside the experiment); "<model>:<variant>"
asks for one variant directly. Every answer says which variant served it (its `model` field and X-Ligero-Variant).

This module only wires the parts together: the wire format is in `schemas`, the request path (prepare -> generate ->
commit) in `pipeline`, API keys and rate limits in `access`, the Prometheus series in `metrics`.
"""

from __future__ import annotations

import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import Response

from ligero.serve.access import AccessControl
from ligero.serve.config import ServerConfig
from ligero.serve.metrics import CONTENT_TYPE, Metrics
from ligero.serve.pipeline import RequestPipeline, authenticate, record_feedback
from ligero.serve.schemas import ApiError, ModelCard, ModelList

log = logging.getLogger("ligero.serve")


def create_app(cfg: ServerConfig) -> FastAPI:
    app = FastAPI(title="Ligero", docs_url=None, redoc_url=None)
    metrics = Metrics({name: v.engine for name, v in cfg.variants.items()})
    access = AccessControl(cfg.api_keys, cfg.guardrails.rate_limiter(), cfg.public_metrics)
    pipeline = RequestPipeline(cfg, metrics, access)
    app.state.cfg, app.state.metrics = cfg, metrics

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception):
        log.exception("unexpected error")
        return ApiError(500, f"internal error ({type(exc).__name__}); the server log has the details").response()

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await pipeline.respond(request, "completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await pipeline.respond(request, "chat")

    @app.get("/v1/models")
    async def models(request: Request):
        authenticate(access, request)
        created = int(time.time())
        return ModelList(data=[ModelCard(id=name, created=created) for name in pipeline.model_names]).model_dump()

    @app.post("/v1/feedback")
    async def feedback(request: Request):
        return (await record_feedback(cfg, metrics, access, request)).model_dump()

    @app.get("/health")
    async def health():
        experiment = pipeline.experiment
        return {"status": "ok", "model": cfg.model_id, "variants": {n: v.scheme for n, v in cfg.variants.items()},
                "experiment": experiment.name if experiment else None, "server_id": cfg.server_id,
                "defaults": cfg.defaults.describe(),
                "watermark": cfg.watermark.key.public() if cfg.watermark is not None else None}

    @app.get("/metrics")
    async def prometheus(request: Request):
        if not access.public_metrics:
            authenticate(access, request)
        return Response(metrics.text(), media_type=CONTENT_TYPE)

    return app
