"""`ligero serve`: an OpenAI-compatible HTTP API over one model's variants, with guardrails, A/B assignment by user,
feedback capture and a store that every request, response, decision and assignment is committed to.

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with `stream: true` as server-sent events),
GET /v1/models, POST /v1/feedback, GET /health, GET /metrics (Prometheus text format).

Model names: the model id (e.g. "smollm2-135m") lets the A/B experiment pick the variant for the request's user
(X-User-Id header or the `user` field; no user -> the first variant, outside the experiment); "<model>:<variant>"
asks for one variant directly. Every answer says which variant served it (its `model` field and X-Ligero-Variant).

A request's records are committed before it is acknowledged: before the JSON answer is sent, or before a stream's
final chunk and `[DONE]`. A crash can lose an unacknowledged request, never an acknowledged one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ligero.errors import LigeroError
from ligero.models.generate import SamplingConfig
from ligero.serve.abtest import Experiment, SegmentRule, assign, segment_of
from ligero.serve.engine import Engine, Job
from ligero.serve.guardrails import (
    ApiKeys,
    AuthError,
    Decision,
    Guardrails,
    OutputGuard,
    check_body_size,
    check_prompt,
    clip_max_tokens,
    score_texts,
)
from ligero.serve.store import Store, key_fingerprint, new_request_id, new_response_id

log = logging.getLogger("ligero.serve")
USER_HEADER = "x-user-id"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)
FINISH = {"eos": "stop", "length": "length"}  # the engine's reasons -> OpenAI's finish_reason


# --- errors ---------------------------------------------------------------------------------------------------------


class ApiError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers

    def response(self) -> JSONResponse:
        kind = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                413: "invalid_request_error", 429: "rate_limit_error"}.get(self.status, "server_error")
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# --- request bodies -------------------------------------------------------------------------------------------------


class _Body(BaseModel):
    # Unknown fields are ignored, as clients send options Ligero has no use for (e.g. stream_options' extras).
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)  # int64, as OpenAI; torch rejects larger seeds
    user: str | None = Field(default=None, max_length=256)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("Ligero returns one choice per request; send n = 1 (or several requests)")
        return n

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [s for s in ([stop] if isinstance(stop, str) else stop or []) if s]  # "" would stop at once
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        return stops


class CompletionBody(_Body):
    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ValueError("send one prompt per request (a string or a list of one string)")
            return prompt[0]
        return prompt


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported ({'type': 'text', 'text': ...})")
            parts.append(part["text"])
        return "".join(parts)


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class FeedbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    response_id: str = Field(min_length=1, max_length=128)
    value: bool | float | Literal["up", "down", "thumbs_up", "thumbs_down"]
    comment: str | None = Field(default=None, max_length=4000)
    source: Literal["human", "model", "code"] = "human"
    name: str = Field(default="user_feedback", min_length=1, max_length=64)
    data_type: Literal["boolean", "numeric", "categorical"] | None = None


def _validation_message(exc: ValidationError) -> tuple[str, str | None]:
    err = exc.errors()[0]
    param = ".".join(str(p) for p in err["loc"]) or None
    msg = err["msg"].removeprefix("Value error, ")
    return f"{param}: {msg}" if param else msg, param


# --- server state ---------------------------------------------------------------------------------------------------


@dataclass
class Variant:
    name: str
    scheme: str
    engine: Engine


@dataclass
class ServerConfig:
    model_id: str
    variants: dict[str, Variant]  # first = control (users without an id get it)
    tokenizer: Any
    store: Store
    guardrails: Guardrails = field(default_factory=Guardrails)
    split: list[float] | None = None
    experiment_name: str | None = None
    segment_rules: list[SegmentRule] = field(default_factory=list)
    api_keys: ApiKeys | None = None
    server_id: str = "ligero"
    context: int = 8192

    def experiment(self) -> Experiment | None:
        if len(self.variants) < 2:
            return None
        names = list(self.variants)
        split = self.split or [100 / len(names)] * len(names)
        return Experiment(self.experiment_name or f"{self.model_id}-ab", names, split)


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


@dataclass
class Prepared:
    """A validated generation request, before it reaches a model."""

    endpoint: str  # "completions" | "chat"
    request_id: str
    response_id: str
    variant: str
    model_name: str  # echoed in the answer: "<model>:<variant>"
    experiment: str | None
    user: str | None
    segment: str | None
    api_key_id: str | None
    prompt_ids: list[int]
    prompt_chars: int
    max_tokens: int
    sampling: SamplingConfig
    stops: list[str]
    stream: bool
    include_usage: bool
    decisions: list[Decision]
    started: float
    created: int


# --- the app --------------------------------------------------------------------------------------------------------


def create_app(cfg: ServerConfig) -> FastAPI:
    app = FastAPI(title="Ligero", docs_url=None, redoc_url=None)
    engines = {name: v.engine for name, v in cfg.variants.items()}
    metrics = Metrics(engines)
    limiter = cfg.guardrails.rate_limiter()
    experiment = cfg.experiment()
    model_names = {cfg.model_id: None, **{f"{cfg.model_id}:{name}": name for name in cfg.variants}}
    app.state.cfg, app.state.metrics = cfg, metrics

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception):
        log.exception("unexpected error")
        return ApiError(500, f"internal error ({type(exc).__name__}); the server log has the details").response()

    # --- helpers ---------------------------------------------------------------------------------------------------

    def authenticate(request: Request) -> str | None:
        """The API key's fingerprint (None when auth is off)."""
        if cfg.api_keys is None:
            return None
        try:
            return key_fingerprint(cfg.api_keys.check(request.headers.get("authorization")))
        except AuthError as exc:
            raise ApiError(401, str(exc), "invalid_api_key") from None

    async def read_json(request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and check_body_size(cfg.guardrails, int(declared)):
            raise ApiError(413, f"request body of {declared} bytes exceeds the limit of "
                                f"{cfg.guardrails.max_body_bytes} bytes; send a smaller request", "body_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if check_body_size(cfg.guardrails, len(body)):
                raise ApiError(413, f"request body exceeds the limit of {cfg.guardrails.max_body_bytes} bytes; "
                                    f"send a smaller request", "body_too_large")
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
            raise ApiError(400, f"the request body is not valid JSON ({exc}); send a JSON object",
                           "invalid_json") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object", "invalid_json")
        return data

    async def record_rejection(endpoint: str, request_id: str, status: int, decision: Decision | None,
                               model: str = "", variant: str = "", api_key_id: str | None = None,
                               user: str | None = None, prompt_tokens: int = 0) -> None:
        """A request refused before generation: recorded (with its guardrail decision) before the error is sent."""
        def write():
            cfg.store.record_request(endpoint=endpoint, model=model, variant=variant, prompt_tokens=prompt_tokens,
                                     prompt_chars=0,
                                     max_tokens=0, stream=False, status="blocked" if decision else "error",
                                     http_status=status, server_id=cfg.server_id, user_id=user,
                                     api_key_id=api_key_id, request_id=request_id)
            if decision:
                cfg.store.record_guardrail(request_id=request_id, rule=decision.rule, action=decision.action,
                                           detail=decision.detail)
        await asyncio.to_thread(write)
        metrics.requests.labels(variant or "-", endpoint, "blocked" if decision else "error").inc()
        if decision:
            metrics.guardrails.labels(variant or "-", decision.rule, decision.action).inc()

    def choose_variant(model: str, user: str | None, segment: str | None) -> tuple[str, str | None]:
        """(variant, experiment name or None) for the requested model name."""
        if model not in model_names:
            raise ApiError(404, f"model {model!r} is not served here; GET /v1/models lists "
                                f"{', '.join(model_names)}", "model_not_found", "model")
        direct = model_names[model]
        if direct is not None:
            return direct, None
        if experiment is None or not user:
            return next(iter(cfg.variants)), None
        planned = assign(experiment, user)
        stored = cfg.store.record_assignment(experiment=experiment.name, user_id=user, variant=planned,
                                             server_id=cfg.server_id, segment=segment)
        return stored, experiment.name

    async def prepare(request: Request, endpoint: str) -> Prepared:
        started, request_id = time.perf_counter(), new_request_id()
        key_id = authenticate(request)
        if limiter is not None:
            wait = limiter.acquire(key_id or (request.client.host if request.client else "unknown"))
            if wait > 0:
                await record_rejection(endpoint, request_id, 429, Decision("rate_limit", "block",
                                       f"retry after {wait:.1f} s"), api_key_id=key_id)
                raise ApiError(429, f"rate limit of {cfg.guardrails.rate_limit_per_minute:g} requests per minute "
                                    f"reached; retry after {math.ceil(wait)} s", "rate_limit_exceeded",
                               headers={"Retry-After": str(math.ceil(wait))})
        try:
            data = await read_json(request)
            body = (ChatBody if endpoint == "chat" else CompletionBody).model_validate(data)
        except ApiError as exc:
            decision = Decision("max_body_bytes", "block", exc.message) if exc.status == 413 else None
            await record_rejection(endpoint, request_id, exc.status, decision, api_key_id=key_id)
            raise
        except ValidationError as exc:
            message, param = _validation_message(exc)
            await record_rejection(endpoint, request_id, 400, None, model=str(data.get("model", ""))[:200],
                                   api_key_id=key_id)
            raise ApiError(400, message, "invalid_request", param) from None
        user = request.headers.get(USER_HEADER) or body.user
        try:
            if user is not None and len(user) > 256:
                raise ValueError("the user id (X-User-Id or user) is longer than 256 characters; send a shorter id")
            segment = segment_of(request.headers, user, cfg.segment_rules)
            if endpoint == "chat":
                prompt = cfg.tokenizer.apply_chat_template([{"role": m.role, "content": m.text()}
                                                            for m in body.messages])
            else:
                prompt = body.prompt
        except (LigeroError, ValueError) as exc:
            await record_rejection(endpoint, request_id, 400, None, model=body.model, api_key_id=key_id, user=user)
            raise ApiError(400, str(exc), "invalid_request") from None
        try:
            variant, exp_name = await asyncio.to_thread(choose_variant, body.model, user, segment)
        except ApiError as exc:
            await record_rejection(endpoint, request_id, exc.status, None, model=body.model, api_key_id=key_id,
                                   user=user)
            raise
        ids = cfg.tokenizer.encode(prompt)
        blocked = check_prompt(cfg.guardrails, prompt, len(ids))
        if blocked is None and len(ids) >= cfg.context:
            blocked = Decision("max_prompt_tokens", "block", f"{len(ids)} tokens >= the model's context "
                                                             f"{cfg.context}")
        if not ids:
            await record_rejection(endpoint, request_id, 400, None, body.model, variant, key_id, user)
            raise ApiError(400, "the prompt is empty; send some text", "invalid_request", "prompt")
        if blocked is not None:
            await record_rejection(endpoint, request_id, 400, blocked, body.model, variant, key_id, user, len(ids))
            code = "content_filter" if blocked.rule == "banned_pattern" else "context_length_exceeded"
            raise ApiError(400, f"request blocked by the {blocked.rule} guardrail ({blocked.detail})", code, "prompt")
        requested = body.max_completion_tokens if endpoint == "chat" and body.max_completion_tokens else body.max_tokens
        max_tokens, clip = clip_max_tokens(cfg.guardrails, requested)
        max_tokens = min(max_tokens, cfg.context - len(ids))
        seed = body.seed if body.seed is not None else secrets.randbits(31)
        return Prepared(
            endpoint=endpoint, request_id=request_id, response_id=new_response_id(endpoint), variant=variant,
            model_name=f"{cfg.model_id}:{variant}", experiment=exp_name, user=user, segment=segment,
            api_key_id=key_id, prompt_ids=ids, prompt_chars=len(prompt), max_tokens=max_tokens,
            sampling=SamplingConfig(temperature=body.temperature, top_p=body.top_p, seed=seed), stops=body.stop or [],
            stream=body.stream, include_usage=bool((body.stream_options or {}).get("include_usage")),
            decisions=[clip] if clip else [], started=started, created=int(time.time()))

    async def generate(p: Prepared, outcome: dict):
        """Yield released text deltas; fill `outcome` (tokens, finish reason, guard) when the output ends."""
        engine = cfg.variants[p.variant].engine
        job = Job(p.prompt_ids, p.max_tokens, p.sampling, asyncio.get_running_loop())
        guard = OutputGuard(cfg.guardrails, score_texts)
        hold = max([len(s) - 1 for s in p.stops] + [0])  # text that could still grow into a stop string
        tokens, logprobs, reason = [], [], None
        outcome.update(tokens=tokens, logprobs=logprobs, guard=guard)
        engine.submit(job)
        try:
            while reason is None:
                # Take every event already waiting: one decode and one guard check for all of them keeps this
                # thread's share of the GIL (which the decoding thread needs) small.
                events = [await job.events.get()]
                while not job.events.empty():
                    events.append(job.events.get_nowait())
                for event in events:
                    if event[0] == "error":
                        raise ApiError(500, f"generation failed ({event[1]})", "generation_error")
                    if event[0] == "token":
                        if not tokens:
                            metrics.first_token.labels(p.variant).observe(time.perf_counter() - p.started)
                        tokens.append(event[1])
                        logprobs.append(event[2])
                    else:
                        reason = FINISH.get(event[1], "stop")
                text = outcome["full_text"] = cfg.tokenizer.decode(tokens)  # commit scores it when the guard did not
                cuts = [c for c in (text.find(s) for s in p.stops) if c >= 0]
                if cuts:
                    text, reason = text[: min(cuts)], "stop"
                final = reason is not None
                visible = text if final else text[: len(text) - hold].rstrip("\ufffd")
                # Scoring (a few ms) runs off the event loop; a push with nothing to score stays on it.
                scores = guard.needs_scoring(visible, final)
                step = (await asyncio.to_thread(guard.push, visible, final) if scores else guard.push(visible, final)) \
                    if visible or final else None
                if step is not None and step.release:
                    yield step.release
                if guard.blocked:
                    reason = "content_filter"
            outcome["finish_reason"] = reason
        finally:
            job.cancelled.set()  # stop the row whatever ended this (a stop string, a block, a client that left)

    async def commit(p: Prepared, outcome: dict, status: str = "ok") -> None:
        """Write the request, its response and its guardrail decisions; returns once all are committed."""
        guard: OutputGuard = outcome["guard"]
        tokens, logprobs = outcome["tokens"], outcome["logprobs"]
        latency_ms = 1000 * (time.perf_counter() - p.started)
        decisions = p.decisions + guard.decisions
        if guard.score is not None:
            tox = guard.score
        else:
            tox = (await asyncio.to_thread(score_texts, [outcome.get("full_text", "")]))[0]

        def write():
            s = cfg.store
            s.record_request(endpoint=p.endpoint, model=cfg.model_id, variant=p.variant,
                             prompt_tokens=len(p.prompt_ids), prompt_chars=p.prompt_chars, max_tokens=p.max_tokens,
                             stream=p.stream, status="blocked" if guard.blocked else status, http_status=200,
                             server_id=cfg.server_id, experiment=p.experiment, user_id=p.user, segment=p.segment,
                             api_key_id=p.api_key_id, request_id=p.request_id)
            s.record_response(response_id=p.response_id, request_id=p.request_id, variant=p.variant,
                              output_tokens=len(tokens), latency_ms=latency_ms, finish_reason=outcome["finish_reason"],
                              guardrail_action=guard.action,
                              mean_logprob=sum(logprobs) / len(logprobs) if logprobs else None, toxicity_score=tox,
                              output_text=guard.released)
            for d in decisions:
                s.record_guardrail(request_id=p.request_id, rule=d.rule, action=d.action, detail=d.detail,
                                   response_id=p.response_id if d.rule in ("toxicity", "banned_pattern") else None)
        await asyncio.to_thread(write)
        metrics.requests.labels(p.variant, p.endpoint, "blocked" if guard.blocked else "ok").inc()
        metrics.latency.labels(p.variant, p.endpoint).observe(latency_ms / 1000)
        metrics.tokens.labels(p.variant, "prompt").inc(len(p.prompt_ids))
        metrics.tokens.labels(p.variant, "completion").inc(len(tokens))
        for d in decisions:
            metrics.guardrails.labels(p.variant, d.rule, d.action).inc()

    def usage(p: Prepared, outcome: dict) -> dict:
        n = len(outcome["tokens"])
        return {"prompt_tokens": len(p.prompt_ids), "completion_tokens": n, "total_tokens": len(p.prompt_ids) + n}

    def headers(p: Prepared) -> dict[str, str]:
        return {"X-Ligero-Variant": p.variant, "X-Ligero-Request-Id": p.request_id}

    def chunk(p: Prepared, delta: str | None, finish: str | None, first: bool = False) -> dict:
        base = {"id": p.response_id, "created": p.created, "model": p.model_name}
        if p.endpoint == "chat":
            d = {} if delta is None else {"content": delta}
            if first:
                d = {"role": "assistant", "content": ""}
            return {**base, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}]}
        return {**base, "object": "text_completion",
                "choices": [{"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}]}

    def sse(data: dict | str) -> str:
        return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"

    async def respond(request: Request, endpoint: str):
        p = await prepare(request, endpoint)
        outcome: dict = {}
        if not p.stream:
            text = "".join([delta async for delta in generate(p, outcome)])
            await commit(p, outcome)
            finish, u = outcome["finish_reason"], usage(p, outcome)
            base = {"id": p.response_id, "created": p.created, "model": p.model_name, "usage": u}
            if endpoint == "chat":
                body = {**base, "object": "chat.completion", "choices": [{
                    "index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": finish}]}
            else:
                body = {**base, "object": "text_completion",
                        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
            return JSONResponse(body, headers=headers(p))

        async def events():
            finished = False
            try:
                if endpoint == "chat":
                    yield sse(chunk(p, None, None, first=True))
                async for delta in generate(p, outcome):
                    yield sse(chunk(p, delta, None))
                await commit(p, outcome)
                finished = True
                yield sse(chunk(p, None, outcome["finish_reason"]))
                if p.include_usage:
                    yield sse({"id": p.response_id, "object": chunk(p, None, None)["object"], "created": p.created,
                               "model": p.model_name, "choices": [], "usage": usage(p, outcome)})
                yield sse("[DONE]")
            except ApiError as exc:
                outcome["http_status"] = exc.status
                yield sse({"error": {"message": exc.message, "type": "server_error", "code": exc.code}})
            finally:
                if not finished and "guard" in outcome:  # the client left (or generation failed): keep a record
                    asyncio.get_running_loop().run_in_executor(None, _record_abandoned, cfg, p, outcome)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={**headers(p), "Cache-Control": "no-cache"})

    # --- routes ----------------------------------------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await respond(request, "completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await respond(request, "chat")

    @app.get("/v1/models")
    async def models(request: Request):
        authenticate(request)
        created = int(time.time())
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "ligero"}
                                           for name in model_names]}

    @app.post("/v1/feedback")
    async def feedback(request: Request):
        authenticate(request)
        data = await read_json(request)
        try:
            body = FeedbackBody.model_validate(data)
        except ValidationError as exc:
            message, param = _validation_message(exc)
            raise ApiError(400, message, "invalid_request", param) from None
        value, data_type = body.value, body.data_type
        if isinstance(value, str):
            value, data_type = value in ("up", "thumbs_up"), data_type or "boolean"
        elif isinstance(value, bool):
            data_type = data_type or "boolean"
        else:
            data_type = data_type or "numeric"
        try:
            fid = await asyncio.to_thread(cfg.store.record_feedback, body.response_id, value, source=body.source,
                                  comment=body.comment, name=body.name, data_type=data_type)
        except LigeroError as exc:
            status = 404 if "unknown response id" in str(exc) else 400
            raise ApiError(status, str(exc), "invalid_feedback") from None
        metrics.feedback.labels(body.source).inc()
        return {"object": "feedback", "id": fid, "response_id": body.response_id, "value": float(value),
                "data_type": data_type, "source": body.source}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": cfg.model_id, "variants": {n: v.scheme for n, v in cfg.variants.items()},
                "experiment": experiment.name if experiment else None, "server_id": cfg.server_id}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _record_abandoned(cfg: ServerConfig, p: Prepared, outcome: dict) -> None:
    """A stream that ended before its acknowledgement is recorded as an error: HTTP 499 when the client closed it,
    the error's status when generation failed. The client was never told it succeeded."""
    try:
        tokens = outcome.get("tokens", [])
        cfg.store.record_request(endpoint=p.endpoint, model=cfg.model_id, variant=p.variant,
                                 prompt_tokens=len(p.prompt_ids), prompt_chars=p.prompt_chars,
                                 max_tokens=p.max_tokens, stream=True, status="error",
                                 http_status=outcome.get("http_status", 499),
                                 server_id=cfg.server_id, experiment=p.experiment, user_id=p.user,
                                 segment=p.segment, api_key_id=p.api_key_id, request_id=p.request_id)
        log.info("request %s: client disconnected after %d tokens", p.request_id, len(tokens))
    except Exception:  # the record may already exist (the commit ran, then the client left); nothing to add
        log.debug("abandoned request %s not recorded", p.request_id, exc_info=True)
