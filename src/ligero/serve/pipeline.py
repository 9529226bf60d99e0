"""The path of one generation request through `ligero serve`: prepare -> generate -> commit, then the answer.

- prepare: access (API key, rate limit), the body (size, read timeout, JSON, schema), the user, segment and variant,
  the prompt's guardrails, and the sampling settings (the request's, else the server's defaults).
- generate: the variant's engine decodes the request in a batch; its tokens pass the stop strings and the output
  guard, which releases text word by word.
- commit: the request, its response and its guardrail decisions are written to the store before the client is told
  the request succeeded (before the JSON answer, or before a stream's final chunk and `[DONE]`).

Every refused request is recorded too, with only values that passed their checks: a rejected request cannot make the
server store what it sent (an unknown model name, an over-long user id).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from ligero.errors import LigeroError
from ligero.models.generate import SamplingConfig
from ligero.serve.abtest import assign, segment_of
from ligero.serve.access import AccessControl, AuthError
from ligero.serve.config import ServerConfig
from ligero.serve.engine import EngineBusy, Job
from ligero.serve.guardrails import (
    BatchScorer,
    Decision,
    Guardrails,
    OutputGuard,
    check_body_size,
    check_prompt,
    clip_max_tokens,
    score_texts,
)
from ligero.serve.logprobs import LogprobTracker
from ligero.serve.metrics import Metrics
from ligero.serve.schemas import (
    ApiError,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Delta,
    FeedbackAnswer,
    FeedbackRequest,
    GenerationRequest,
    Usage,
    WatermarkInfo,
    validation_error,
)
from ligero.serve.store import new_request_id, new_response_id
from ligero.vision.images import image_from_url
from ligero.vision.model import IMAGE_MARK

log = logging.getLogger("ligero.serve")
USER_HEADER = "x-user-id"
MAX_USER_CHARS = 256
MAX_LENGTH_DIGITS = 18  # a Content-Length longer than this is refused without parsing (or echoing) it
FINISH = {"eos": "stop", "length": "length"}  # the engine's reasons -> OpenAI's finish_reason
CLIENT_CLOSED = 499  # nginx's status for a client that closed the connection before the answer
BUSY_RETRY_S = 1  # Retry-After of a 429 for a full waiting queue


def authenticate(access: AccessControl, request: Request) -> str | None:
    """The API key's fingerprint (None when auth is off); a 401 when the key is missing or unknown."""
    try:
        return access.authenticate(request.headers.get("authorization"))
    except AuthError as exc:
        raise ApiError(401, str(exc), "invalid_api_key") from None


async def read_json(request: Request, guardrails: Guardrails, timeout_s: float) -> dict:
    """The body as a JSON object: at most the guardrails' max_body_bytes (413), all of it within `timeout_s` (408),
    not abandoned by the client while it was being sent (499)."""
    declared = request.headers.get("content-length", "")
    too_large = f"exceeds the limit of {guardrails.max_body_bytes} bytes; send a smaller request"
    if declared.isdigit() and (len(declared) > MAX_LENGTH_DIGITS or check_body_size(guardrails, int(declared))):
        what = f"request body of {declared} bytes" if len(declared) <= MAX_LENGTH_DIGITS else "request body"
        raise ApiError(413, f"{what} {too_large}", "body_too_large")
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                body += chunk
                if check_body_size(guardrails, len(body)):
                    raise ApiError(413, f"request body {too_large}", "body_too_large")
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout_s:g} s; send the whole body at once",
                       "body_timeout") from None
    except ClientDisconnect:
        raise ApiError(CLIENT_CLOSED, "the client closed the connection while sending its body",
                       "client_disconnected") from None
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
        raise ApiError(400, f"the request body is not valid JSON ({exc}); send a JSON object", "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", "invalid_json")
    return data


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
    top_logprobs: int | None  # None: no log-probs; else alternatives per token
    decisions: list[Decision]
    started: float
    created: int
    prompt_embeds: torch.Tensor | None = None  # a vision prompt's input vectors (images spliced in)

    @property
    def watermark(self) -> WatermarkInfo | None:
        marker = self.sampling.logits_processor
        return None if marker is None else WatermarkInfo(key_id=marker.key_id, scheme=marker.key.settings.scheme)

    @property
    def headers(self) -> dict[str, str]:
        marked = {"X-Ligero-Watermark": self.watermark.key_id} if self.watermark else {}
        return {"X-Ligero-Variant": self.variant, "X-Ligero-Request-Id": self.request_id, **marked}


@dataclass
class Outcome:
    """What generation produced so far; complete once `finish_reason` is set."""

    guard: OutputGuard
    logprobs_tracker: LogprobTracker | None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    alternatives: list[list[tuple[int, float]] | None] = field(default_factory=list)
    full_text: str = ""  # the decoded output, before stop strings and guardrails
    finish_reason: str | None = None
    http_status: int | None = None  # a stream that failed after its 200: the error's status, for the store
    stream_started: bool = False  # a stream's body generator ran (its cleanup then records what it must)

    def usage(self, p: Prepared) -> Usage:
        n = len(self.tokens)
        return Usage(prompt_tokens=len(p.prompt_ids), completion_tokens=n, total_tokens=len(p.prompt_ids) + n)

    def take_logprobs(self, final: bool):
        if self.logprobs_tracker is None:
            return None
        return self.logprobs_tracker.take(self.tokens, self.logprobs, self.alternatives, self.guard.released, final)


@dataclass
class Rejection:
    """A request refused before generation, as recorded: only values that passed their checks."""

    endpoint: str
    request_id: str
    decision: Decision | None = None
    model: str = ""
    variant: str = ""
    api_key_id: str | None = None
    user: str | None = None
    prompt_tokens: int = 0


class RequestPipeline:
    """The generation endpoints of one server (see the module docstring)."""

    def __init__(self, cfg: ServerConfig, metrics: Metrics, access: AccessControl):
        self.cfg, self.metrics, self.access = cfg, metrics, access
        self.experiment = cfg.experiment()
        self.model_names = cfg.model_names()
        self.scorer = BatchScorer(score_texts)  # concurrent requests' toxicity checks share classifier calls

    # --- prepare -----------------------------------------------------------------------------------------------

    async def reject(self, r: Rejection, error: ApiError) -> ApiError:
        """Record a refused request (and its guardrail decision) before the error is sent; returns the error."""
        status = "blocked" if r.decision else "error"

        def write():
            self.cfg.store.record_request(endpoint=r.endpoint, model=r.model, variant=r.variant,
                                          prompt_tokens=r.prompt_tokens, prompt_chars=0, max_tokens=0, stream=False,
                                          status=status, http_status=error.status, server_id=self.cfg.server_id,
                                          user_id=r.user, api_key_id=r.api_key_id, request_id=r.request_id)
            if r.decision:
                self.cfg.store.record_guardrail(request_id=r.request_id, rule=r.decision.rule,
                                                action=r.decision.action, detail=r.decision.detail)
        await asyncio.to_thread(write)
        self.metrics.requests.labels(r.variant or "-", r.endpoint, status).inc()
        if r.decision:
            self.metrics.guardrails.labels(r.variant or "-", r.decision.rule, r.decision.action).inc()
        return error

    async def _admit(self, request: Request, endpoint: str, request_id: str) -> str | None:
        """The API key's fingerprint, once the key and the rate limit let the request in."""
        key_id = authenticate(self.access, request)
        wait = self.access.retry_after(key_id, request.client.host if request.client else None)
        if wait > 0:
            decision = Decision("rate_limit", "block", f"retry after {wait:.1f} s")
            raise await self.reject(Rejection(endpoint, request_id, decision, api_key_id=key_id), ApiError(
                429, f"rate limit of {self.cfg.guardrails.rate_limit_per_minute:g} requests per minute reached; "
                     f"retry after {math.ceil(wait)} s", "rate_limit_exceeded",
                headers={"Retry-After": str(math.ceil(wait))}))
        return key_id

    async def _parse(self, request: Request, endpoint: str, request_id: str, key_id: str | None
                     ) -> GenerationRequest:
        data: dict = {}
        try:
            data = await read_json(request, self.cfg.guardrails, self.cfg.body_timeout_s)
            return (ChatRequest if endpoint == "chat" else CompletionRequest).model_validate(data)
        except ApiError as exc:
            decision = Decision("max_body_bytes", "block", exc.message) if exc.status == 413 else None
            if exc.status == CLIENT_CLOSED:
                log.warning("request %s: the client disconnected while sending its body (%d)", request_id,
                            CLIENT_CLOSED)
            raise await self.reject(Rejection(endpoint, request_id, decision, api_key_id=key_id), exc) from None
        except ValidationError as exc:
            model = data.get("model")
            known = model if isinstance(model, str) and model in self.model_names else ""
            raise await self.reject(Rejection(endpoint, request_id, api_key_id=key_id, model=known),
                                    validation_error(exc)) from None

    def _choose_variant(self, model: str, user: str | None, segment: str | None) -> tuple[str, str | None]:
        """(variant, experiment name or None) for a served model name (the caller checked it)."""
        direct = self.model_names[model]
        if direct is not None:
            return direct, None
        if self.experiment is None or not user:
            return next(iter(self.cfg.variants)), None
        planned = assign(self.experiment, user)
        stored = self.cfg.store.record_assignment(experiment=self.experiment.name, user_id=user, variant=planned,
                                                  server_id=self.cfg.server_id, segment=segment)
        return stored, self.experiment.name

    async def _route(self, request: Request, body: GenerationRequest, r: Rejection
                     ) -> tuple[str | None, str, str, str, str | None]:
        """(user, segment, prompt text, variant, experiment) of a parsed request."""
        user = request.headers.get(USER_HEADER) or body.user
        if user is not None and len(user) > MAX_USER_CHARS:
            raise await self.reject(r, ApiError(400, f"the user id (X-User-Id or user) is longer than "
                                                     f"{MAX_USER_CHARS} characters; send a shorter id",
                                                "invalid_request"))
        r.user = user
        try:
            segment = segment_of(request.headers, user, self.cfg.segment_rules)
            urls: list[str] = []
            if isinstance(body, ChatRequest):
                messages = []
                for m in body.messages:
                    text, images = m.text_and_images(IMAGE_MARK)
                    messages.append({"role": m.role, "content": text})
                    urls += images
                prompt = self.cfg.tokenizer.apply_chat_template(messages)
            else:
                prompt = body.prompt
        except (LigeroError, ValueError) as exc:
            raise await self.reject(r, ApiError(400, str(exc), "invalid_request")) from None
        if body.model not in self.model_names:
            served = ", ".join(self.model_names)
            raise await self.reject(r, ApiError(404, f"model {body.model[:100]!r} is not served here; GET /v1/models "
                                                     f"lists {served}", "model_not_found", "model"))
        r.model = body.model
        variant, experiment = await asyncio.to_thread(self._choose_variant, body.model, user, segment)
        r.variant = variant
        return user, segment, prompt, urls, variant, experiment

    async def _vision_prompt(self, prompt: str, urls: list[str], r: Rejection) -> tuple[list[int], torch.Tensor]:
        """(prompt ids with image placeholders, the prompt's input vectors) of a chat request with images."""
        variant = self.cfg.variants[r.variant]
        if variant.vision is None or self.cfg.image_limits is None:
            raise await self.reject(r, ApiError(400, f"model {r.model} does not accept images; send text only, or "
                                                     "serve a vision model (ligero serve --vision)",
                                                "invalid_request", "messages"))
        limits = self.cfg.image_limits
        if len(urls) > limits.max_images:
            r.decision = Decision("max_images", "block", f"{len(urls)} images > {limits.max_images}")
            raise await self.reject(r, ApiError(400, f"request blocked by the max_images guardrail: {len(urls)} "
                                                     f"images, at most {limits.max_images} per request",
                                                "too_many_images", "messages"))
        vlm, lock = variant.vision, variant.engine.compute_lock

        def build() -> tuple[list[int], torch.Tensor]:
            images = [image_from_url(u, limits, name=f"image {i + 1}") for i, u in enumerate(urls)]
            with torch.inference_mode(), lock:
                encoded = vlm.encode_images(images)
                layout = vlm.layout_text(prompt, [e.n_tokens for e in encoded])
                return layout.tokens, vlm.embed(layout, [vlm.project(e) for e in encoded])

        try:
            return await asyncio.to_thread(build)
        except LigeroError as exc:
            r.decision = Decision("image", "block", str(exc)[:500])
            raise await self.reject(r, ApiError(400, str(exc), "invalid_image", "messages")) from None

    async def _check_prompt(self, prompt: str, body: GenerationRequest, r: Rejection,
                            ids: list[int] | None = None) -> list[int]:
        ids = self.cfg.tokenizer.encode(prompt) if ids is None else ids
        if not ids:
            raise await self.reject(r, ApiError(400, "the prompt is empty; send some text", "invalid_request",
                                                "prompt"))
        blocked = check_prompt(self.cfg.guardrails, prompt, len(ids))
        if blocked is None and len(ids) >= self.cfg.context:
            blocked = Decision("max_prompt_tokens", "block", f"{len(ids)} tokens >= the model's context "
                                                             f"{self.cfg.context}")
        if blocked is not None:
            r.decision, r.prompt_tokens = blocked, len(ids)
            code = "content_filter" if blocked.rule == "banned_pattern" else "context_length_exceeded"
            raise await self.reject(r, ApiError(400, f"request blocked by the {blocked.rule} guardrail "
                                                     f"({blocked.detail})", code, "prompt"))
        vocab = self.cfg.variants[r.variant].engine.model.cfg.vocab_size
        if body.logit_bias and max(body.logit_bias) >= vocab:
            raise await self.reject(r, ApiError(400, f"logit_bias names token {max(body.logit_bias)}, but the "
                                                     f"vocabulary has {vocab} tokens (ids 0..{vocab - 1})",
                                                "invalid_request", "logit_bias"))
        return ids

    def _sampling(self, body: GenerationRequest, endpoint: str) -> tuple[SamplingConfig, int, Decision | None]:
        """The sampling settings (the request's, else the server's defaults) and the clipped token budget."""
        defaults = self.cfg.defaults
        requested = body.requested_max_tokens or defaults.max_tokens_for(endpoint)
        max_tokens, clip = clip_max_tokens(self.cfg.guardrails, requested)
        sampling = SamplingConfig(
            temperature=defaults.temperature if body.temperature is None else body.temperature,
            top_p=defaults.top_p if body.top_p is None else body.top_p,
            seed=body.seed if body.seed is not None else secrets.randbits(31),
            presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
            logit_bias=dict(body.logit_bias or {}), logits_processor=self.cfg.watermark)
        return sampling, max_tokens, clip

    async def prepare(self, request: Request, endpoint: str) -> Prepared:
        started, request_id = time.perf_counter(), new_request_id()
        key_id = await self._admit(request, endpoint, request_id)
        body = await self._parse(request, endpoint, request_id, key_id)
        r = Rejection(endpoint, request_id, api_key_id=key_id)
        user, segment, prompt, urls, variant, experiment = await self._route(request, body, r)
        ids, embeds = (await self._vision_prompt(prompt, urls, r)) if urls else (None, None)
        ids = await self._check_prompt(prompt.replace(IMAGE_MARK, ""), body, r, ids)
        sampling, max_tokens, clip = self._sampling(body, endpoint)
        return Prepared(
            endpoint=endpoint, request_id=request_id, response_id=new_response_id(endpoint), variant=variant,
            model_name=f"{self.cfg.model_id}:{variant}", experiment=experiment, user=user, segment=segment,
            api_key_id=key_id, prompt_ids=ids, prompt_chars=len(prompt),
            max_tokens=min(max_tokens, self.cfg.context - len(ids)), sampling=sampling, stops=body.stop or [],
            stream=body.stream, include_usage=body.include_usage, top_logprobs=body.top_logprobs_wanted,
            decisions=[clip] if clip else [], started=started, created=int(time.time()), prompt_embeds=embeds)

    # --- generate ----------------------------------------------------------------------------------------------

    def new_outcome(self, p: Prepared) -> Outcome:
        tracker = (None if p.top_logprobs is None else
                   LogprobTracker(self.cfg.tokenizer, p.top_logprobs, chat=p.endpoint == "chat"))
        return Outcome(OutputGuard(self.cfg.guardrails, self.scorer), tracker)

    async def _next_events(self, job: Job) -> list[tuple]:
        # Take every event already waiting: one decode and one guard check for all of them keeps this thread's
        # share of the GIL (which the decoding thread needs) small.
        events = await job.events.get()  # the worker hands events over in lists (engine.py: "Stream interval")
        while not job.events.empty():
            events = events + job.events.get_nowait()
        return events

    async def submit(self, p: Prepared) -> Job:
        """Hand the request to its variant's engine; a 429 (recorded) when too many requests already wait."""
        engine = self.cfg.variants[p.variant].engine
        job = Job(p.prompt_ids, p.max_tokens, p.sampling, asyncio.get_running_loop(), p.top_logprobs or 0,
                  prompt_embeds=p.prompt_embeds)
        try:
            engine.submit(job)
        except EngineBusy as exc:
            decision = Decision("queue_full", "block", str(exc))
            r = Rejection(p.endpoint, p.request_id, decision, model=self.cfg.model_id,
                          variant=p.variant, api_key_id=p.api_key_id, user=p.user, prompt_tokens=len(p.prompt_ids))
            raise await self.reject(r, ApiError(429, f"the server is busy ({exc}); retry after {BUSY_RETRY_S} s",
                                                "server_busy", headers={"Retry-After": str(BUSY_RETRY_S)})) from None
        return job

    async def generate(self, p: Prepared, out: Outcome, job: Job) -> AsyncIterator[str]:
        """Yield released text deltas of a submitted job; `out` holds tokens, log-probs and, at the end, the finish
        reason."""
        hold = max([len(s) - 1 for s in p.stops] + [0])  # text that could still grow into a stop string
        reason = None
        try:
            while reason is None:
                for event in await self._next_events(job):
                    if event[0] == "error":
                        raise ApiError(500, f"generation failed ({event[1]})", "generation_error")
                    if event[0] == "token":
                        if not out.tokens:
                            self.metrics.first_token.labels(p.variant).observe(time.perf_counter() - p.started)
                        out.tokens.append(event[1])
                        out.logprobs.append(event[2])
                        out.alternatives.append(event[3])
                    else:
                        reason = FINISH.get(event[1], "stop")
                text = out.full_text = self.cfg.tokenizer.decode(out.tokens)  # commit scores it if the guard did not
                cuts = [c for c in (text.find(s) for s in p.stops) if c >= 0]
                if cuts:
                    text, reason = text[: min(cuts)], "stop"
                final = reason is not None
                visible = text if final else text[: len(text) - hold].rstrip("\ufffd")
                # Scoring (a few ms) runs off the event loop; a push with nothing to score stays on it.
                guard = out.guard
                scores = guard.needs_scoring(visible, final)
                step = (await asyncio.to_thread(guard.push, visible, final) if scores else guard.push(visible, final)) \
                    if visible or final else None
                if step is not None and step.release:
                    yield step.release
                if guard.blocked:
                    reason = "content_filter"
            out.finish_reason = reason
        finally:
            job.cancelled.set()  # stop the row whatever ended this (a stop string, a block, a client that left)

    # --- commit ------------------------------------------------------------------------------------------------

    async def commit(self, p: Prepared, out: Outcome) -> None:
        """Write the request, its response and its guardrail decisions; returns once all are committed."""
        guard, tokens, logprobs = out.guard, out.tokens, out.logprobs
        latency_ms = 1000 * (time.perf_counter() - p.started)
        decisions = p.decisions + guard.decisions
        tox = guard.score if guard.score is not None else (await asyncio.to_thread(self.scorer, [out.full_text]))[0]
        status = "blocked" if guard.blocked else "ok"

        def write():
            s = self.cfg.store
            s.record_request(endpoint=p.endpoint, model=self.cfg.model_id, variant=p.variant,
                             prompt_tokens=len(p.prompt_ids), prompt_chars=p.prompt_chars, max_tokens=p.max_tokens,
                             stream=p.stream, status=status, http_status=200, server_id=self.cfg.server_id,
                             experiment=p.experiment, user_id=p.user, segment=p.segment, api_key_id=p.api_key_id,
                             request_id=p.request_id)
            s.record_response(response_id=p.response_id, request_id=p.request_id, variant=p.variant,
                              output_tokens=len(tokens), latency_ms=latency_ms, finish_reason=out.finish_reason,
                              guardrail_action=guard.action,
                              mean_logprob=sum(logprobs) / len(logprobs) if logprobs else None, toxicity_score=tox,
                              output_text=guard.released,
                              watermark_key_id=p.watermark.key_id if p.watermark else None)
            for d in decisions:
                s.record_guardrail(request_id=p.request_id, rule=d.rule, action=d.action, detail=d.detail,
                                   response_id=p.response_id if d.rule in ("toxicity", "banned_pattern") else None)
        await asyncio.to_thread(write)
        m = self.metrics
        m.requests.labels(p.variant, p.endpoint, status).inc()
        m.latency.labels(p.variant, p.endpoint).observe(latency_ms / 1000)
        m.tokens.labels(p.variant, "prompt").inc(len(p.prompt_ids))
        m.tokens.labels(p.variant, "completion").inc(len(tokens))
        for d in decisions:
            m.guardrails.labels(p.variant, d.rule, d.action).inc()

    def record_abandoned(self, p: Prepared, out: Outcome) -> None:
        """A stream that ended before its acknowledgement is recorded as an error: HTTP 499 when the client closed
        it, the error's status when generation failed. The client was never told it succeeded."""
        try:
            self.cfg.store.record_request(endpoint=p.endpoint, model=self.cfg.model_id, variant=p.variant,
                                          prompt_tokens=len(p.prompt_ids), prompt_chars=p.prompt_chars,
                                          max_tokens=p.max_tokens, stream=True, status="error",
                                          http_status=out.http_status or CLIENT_CLOSED,
                                          server_id=self.cfg.server_id, experiment=p.experiment, user_id=p.user,
                                          segment=p.segment, api_key_id=p.api_key_id, request_id=p.request_id)
            log.info("request %s: client disconnected after %d tokens", p.request_id, len(out.tokens))
        except Exception:  # the record may already exist (the commit ran, then the client left); nothing to add
            log.debug("abandoned request %s not recorded", p.request_id, exc_info=True)

    # --- answers -----------------------------------------------------------------------------------------------

    def answer(self, p: Prepared, out: Outcome, text: str) -> dict:
        usage, lp = out.usage(p), out.take_logprobs(final=True)
        if p.endpoint == "chat":
            choice = ChatChoice(message=AssistantMessage(content=text), logprobs=lp, finish_reason=out.finish_reason)
            return ChatCompletion(id=p.response_id, created=p.created, model=p.model_name, choices=[choice],
                                  usage=usage, watermark=p.watermark).model_dump(mode="json")
        choice = CompletionChoice(text=text, logprobs=lp, finish_reason=out.finish_reason)
        return Completion(id=p.response_id, created=p.created, model=p.model_name, choices=[choice],
                          usage=usage, watermark=p.watermark).model_dump(mode="json")

    def chunk(self, p: Prepared, delta: str | None, finish: str | None = None, logprobs=None, first: bool = False,
              usage: Usage | None = None) -> str:
        """One server-sent event: a text delta, the finish reason, the chat's opening role, or the usage alone."""
        base = {"id": p.response_id, "created": p.created, "model": p.model_name, "usage": usage}
        if p.endpoint == "chat":
            d = Delta(role="assistant", content="") if first else Delta(content=delta)
            choices = [] if usage else [ChatChunkChoice(delta=d, logprobs=logprobs, finish_reason=finish)]
            event = ChatCompletionChunk(**base, choices=choices)
        else:
            choices = [] if usage else [CompletionChoice(text=delta or "", logprobs=logprobs, finish_reason=finish)]
            event = Completion(**base, choices=choices)
        return sse(event.model_dump_json())

    async def events(self, p: Prepared, out: Outcome, job: Job) -> AsyncIterator[str]:
        """The stream of one request; its records are committed before the final chunk."""
        out.stream_started, finished = True, False
        try:
            if p.endpoint == "chat":
                yield self.chunk(p, None, first=True)
            async for delta in self.generate(p, out, job):
                yield self.chunk(p, delta, logprobs=out.take_logprobs(final=False))
            await self.commit(p, out)
            finished = True
            yield self.chunk(p, None, out.finish_reason, logprobs=out.take_logprobs(final=True))
            if p.include_usage:
                yield self.chunk(p, None, usage=out.usage(p))
            yield sse("[DONE]")
        except ApiError as exc:
            out.http_status = exc.status
            yield sse(exc.body().model_dump_json(exclude={"error": {"param"}}))
        finally:
            if not finished:  # the client left (or generation failed): keep a record
                asyncio.get_running_loop().run_in_executor(None, self.record_abandoned, p, out)

    async def respond(self, request: Request, endpoint: str) -> Response:
        p = await self.prepare(request, endpoint)
        out = self.new_outcome(p)
        job = await self.submit(p)
        if p.stream:
            return JobStream(self.events(p, out, job), job, out, lambda: self.record_abandoned(p, out),
                             media_type="text/event-stream", headers={**p.headers, "Cache-Control": "no-cache"})
        text = "".join([delta async for delta in self.generate(p, out, job)])
        await self.commit(p, out)
        return JSONResponse(self.answer(p, out, text), headers=p.headers)


class JobStream(StreamingResponse):
    """A streamed answer that stops its job however the response ends. The body generator's own cleanup covers a
    client leaving mid-stream; one that leaves before the first byte (sending the headers fails, or the disconnect
    is heard first) never starts the generator, so its row would decode to max_tokens for nobody, unrecorded."""

    def __init__(self, body: AsyncIterator[str], job: Job, out: Outcome, record_unstarted, **kwargs):
        super().__init__(body, **kwargs)
        self.job, self.out, self.record_unstarted = job, out, record_unstarted

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancelled.set()  # the engine frees the row at its next step (a finished job: no effect)
            if not self.out.stream_started:  # (a generator never started holds nothing to close)
                # not awaited: a cancelled response may not await in its cleanup
                asyncio.get_running_loop().run_in_executor(None, self.record_unstarted)


def sse(data: str) -> str:
    return f"data: {data}\n\n"


async def record_feedback(cfg: ServerConfig, metrics: Metrics, access: AccessControl, request: Request
                          ) -> FeedbackAnswer:
    """POST /v1/feedback: a thumbs up / down or a score attached to a response this server returned."""
    authenticate(access, request)
    data = await read_json(request, cfg.guardrails, cfg.body_timeout_s)
    try:
        body = FeedbackRequest.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None
    value, data_type = body.typed_value()
    try:
        fid = await asyncio.to_thread(cfg.store.record_feedback, body.response_id, value, source=body.source,
                                      comment=body.comment, name=body.name, data_type=data_type)
    except LigeroError as exc:
        status = 404 if "unknown response id" in str(exc) else 400
        raise ApiError(status, str(exc), "invalid_feedback") from None
    metrics.feedback.labels(body.source).inc()
    return FeedbackAnswer(id=fid, response_id=body.response_id, value=value, data_type=data_type, source=body.source)
