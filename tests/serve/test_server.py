"""`ligero serve` end to end: a real server process on loopback (SmolLM2-135M, variants fp32 and int4, a SQLite
store), real HTTP clients (the official `openai` package, httpx), and the store read back from this process.

Two servers for the whole module: the main one (A/B split 50/50, a guardrails file with small limits, output texts
kept) and a small one with API keys and a rate limit. Generations are a few tokens long and greedy where the test
compares outputs."""

from __future__ import annotations

import asyncio
import json
import math
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select
from sqlalchemy.orm import Session

from ligero.serve import store as st
from ligero.serve.abtest import Experiment, assign
from ligero.serve.store import Store, key_fingerprint
from waiting import wait_for

MODEL = "smollm2-135m"
FP32, INT4 = f"{MODEL}:fp32", f"{MODEL}:int4"
EXPERIMENT = Experiment(f"{MODEL}-ab", ["fp32", "int4"], [50, 50])
STORY = "Once upon a time, in a small village by the sea, there lived"
QUESTION = [{"role": "user", "content": "Write one sentence about the sea."}]
TOXIC = "You are a fucking idiot, you stupid piece of shit. Fuck you, fuck"
BANNED_TEXT = "please cast the Forbidden Spell now"  # matches the guardrails file's banned pattern
MAX_BODY_BYTES = 20_000
MAX_PROMPT_TOKENS = 200
GUARDRAILS = f"""
max_body_bytes = {MAX_BODY_BYTES}
max_prompt_tokens = {MAX_PROMPT_TOKENS}
max_new_tokens = 256
banned_patterns = ["forbidden[ _-]?spell"]
[toxicity]
threshold = 0.5
action = "block"
"""
KEYS = ("key-one", "key-two", "key-three")
BODY_TIMEOUT_S = 4  # the main server's --body-timeout
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               408: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}


# --- fixtures -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(launch, tmp_path_factory):
    folder = tmp_path_factory.mktemp("main-server")
    guardrails = folder / "guardrails.toml"
    guardrails.write_text(GUARDRAILS)
    store_url = f"sqlite:///{folder / 'serve.db'}"
    proc = launch("--variant", "fp32", "--variant", "int4", "--split", "50,50", "--store", store_url,
                  "--guardrails", str(guardrails), "--keep-text", "--body-timeout", str(BODY_TIMEOUT_S))
    proc.store_url = store_url
    return proc


@pytest.fixture(scope="module")
def store(server):
    with Store(server.store_url) as s:
        yield s


@pytest.fixture(scope="module")
def oai(server):
    client = openai.OpenAI(base_url=server.base_url, api_key="test", max_retries=0, timeout=120)
    yield client
    client.close()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def story(oai):
    """The greedy fp32 continuation of STORY (16 tokens), the reference for streaming and stop strings."""
    raw = oai.completions.with_raw_response.create(model=FP32, prompt=STORY, max_tokens=16, temperature=0)
    return raw, raw.parse()


@pytest.fixture(scope="module")
def chat(oai):
    """The greedy fp32 chat answer to QUESTION (12 tokens at most)."""
    raw = oai.chat.completions.with_raw_response.create(model=FP32, messages=QUESTION, max_tokens=12,
                                                        temperature=0)
    return raw, raw.parse()


# --- helpers --------------------------------------------------------------------------------------------------------


def as_dict(usage) -> dict:
    return usage if isinstance(usage, dict) else usage.model_dump(include={"prompt_tokens", "completion_tokens",
                                                                            "total_tokens"})


def check_recorded(store: Store, response_id: str, *, variant: str, usage, endpoint: str, stream: bool,
                   finish_reason: str, request_id: str | None = None, text: str | None = None, status: str = "ok",
                   guardrail_action: str = "none"):
    """The acknowledged response and its request are in the store, consistent with what the client got."""
    usage = as_dict(usage)
    resp = store.get_response(response_id)
    assert resp is not None, f"acknowledged response {response_id} is not in the store"
    req = store.get_request(resp.request_id)
    assert req is not None, f"the request of {response_id} is not in the store"
    if request_id is not None:
        assert resp.request_id == request_id
    assert (req.status, req.http_status, req.endpoint, req.stream) == (status, 200, endpoint, stream)
    assert req.model == MODEL and req.variant == resp.variant == variant
    assert req.prompt_tokens == usage["prompt_tokens"]
    assert resp.output_tokens == usage["completion_tokens"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert resp.finish_reason == finish_reason
    assert resp.guardrail_action == guardrail_action
    assert resp.mean_logprob is not None and resp.mean_logprob <= 0
    assert resp.toxicity_score is not None and 0 <= resp.toxicity_score <= 1
    assert resp.latency_ms > 0
    if text is not None:
        assert resp.output_text == text  # the server keeps texts (--keep-text): what the client got
    return req, resp


def rows(store: Store, table, **where) -> list:
    with Session(store.engine) as session:
        return list(session.scalars(select(table).filter_by(**where)))


def assert_error(r: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    """An OpenAI-style error: the status, a JSON body {"error": {"message", "type", "param", "code"}}."""
    assert r.status_code == status, f"expected {status}, got {r.status_code}: {r.text}"
    assert r.headers["content-type"].startswith("application/json"), r.headers["content-type"]
    err = r.json()["error"]
    assert {"message", "type", "code"} <= set(err), err
    assert isinstance(err["message"], str) and err["message"].strip(), err
    assert err["type"] == ERROR_TYPES[status], err
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


def metric(text: str, sample: str, **labels: str) -> float:
    """A sample's value in Prometheus text (0 when the series does not exist yet)."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def sse_events(lines) -> list:
    """The JSON payloads of a server-sent event stream up to [DONE] (which must come)."""
    events = []
    for line in lines:
        if not line.startswith("data: "):
            assert line == "", f"unexpected SSE line {line!r}"
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            return events
        events.append(json.loads(data))
    raise AssertionError(f"the stream ended without [DONE] after {len(events)} events")


def users_for(prefix: str, per_variant: int) -> dict[str, list[str]]:
    """Deterministic user ids, `per_variant` of them planned for each variant of the experiment."""
    users: dict[str, list[str]] = {v: [] for v in EXPERIMENT.variants}
    i = 0
    while min(len(u) for u in users.values()) < per_variant:
        user = f"{prefix}-{i}"
        planned = users[assign(EXPERIMENT, user)]
        if len(planned) < per_variant:
            planned.append(user)
        i += 1
    return users


# --- 1. the official client -----------------------------------------------------------------------------------------


def test_models_and_health(server, oai, http):
    assert sorted(m.id for m in oai.models.list()) == sorted([MODEL, FP32, INT4])
    health = http.get("/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL
    assert health["variants"] == {"fp32": "fp32", "int4": "int4"}
    assert health["experiment"] == EXPERIMENT.name


def test_completion(story, store, tokenizer):
    raw, c = story
    assert raw.headers["x-ligero-variant"] == "fp32"
    assert c.object == "text_completion" and c.model == FP32 and c.id.startswith("cmpl-")
    choice = c.choices[0]
    assert len(c.choices) == 1 and choice.index == 0
    assert choice.text.strip(), "the model produced no text"
    assert choice.finish_reason == "length"  # 16 tokens of a story: the budget ends it
    assert c.usage.completion_tokens == 16
    assert c.usage.prompt_tokens == len(tokenizer.encode(STORY))
    assert c.usage.total_tokens == c.usage.prompt_tokens + 16
    check_recorded(store, c.id, request_id=raw.headers["x-ligero-request-id"], variant="fp32", usage=c.usage,
                   endpoint="completions", stream=False, finish_reason="length", text=choice.text)


def test_chat_completion(chat, store, tokenizer):
    raw, c = chat
    assert raw.headers["x-ligero-variant"] == "fp32"
    assert c.object == "chat.completion" and c.model == FP32 and c.id.startswith("chatcmpl-")
    message = c.choices[0].message
    assert message.role == "assistant" and message.content.strip()
    finish = c.choices[0].finish_reason
    assert finish in ("stop", "length")
    if finish == "length":
        assert c.usage.completion_tokens == 12
    else:
        assert 1 <= c.usage.completion_tokens < 12
    assert c.usage.prompt_tokens == len(tokenizer.encode(tokenizer.apply_chat_template(QUESTION)))
    check_recorded(store, c.id, request_id=raw.headers["x-ligero-request-id"], variant="fp32", usage=c.usage,
                   endpoint="chat", stream=False, finish_reason=finish, text=message.content)


def test_streamed_completion_equals_the_answer(oai, story, store):
    _, ref = story
    chunks = list(oai.completions.create(model=FP32, prompt=STORY, max_tokens=16, temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    *text_chunks, usage_chunk = chunks
    assert len({c.id for c in chunks}) == 1 and chunks[0].id != ref.id
    assert all(c.model == FP32 and len(c.choices) == 1 for c in text_chunks)
    deltas = [c.choices[0].text for c in text_chunks]
    assert "".join(deltas) == ref.choices[0].text
    assert sum(1 for d in deltas if d) > 1, f"the text came in one piece, not streamed: {deltas}"
    assert [c.choices[0].finish_reason for c in text_chunks] == [None] * (len(text_chunks) - 1) + ["length"]
    assert usage_chunk.choices == [] and as_dict(usage_chunk.usage) == as_dict(ref.usage)
    check_recorded(store, chunks[0].id, variant="fp32", usage=usage_chunk.usage, endpoint="completions",
                   stream=True, finish_reason="length", text=ref.choices[0].text)


def test_streamed_chat_equals_the_answer(oai, chat, store):
    _, ref = chat
    chunks = list(oai.chat.completions.create(model=FP32, messages=QUESTION, max_tokens=12, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    *deltas, usage_chunk = chunks
    assert all(c.object == "chat.completion.chunk" and c.model == FP32 for c in chunks)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert deltas[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in deltas) == ref.choices[0].message.content
    assert [c.choices[0].finish_reason for c in deltas][-1] == ref.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in deltas[:-1])
    assert usage_chunk.choices == [] and as_dict(usage_chunk.usage) == as_dict(ref.usage)
    check_recorded(store, chunks[0].id, variant="fp32", usage=usage_chunk.usage, endpoint="chat", stream=True,
                   finish_reason=ref.choices[0].finish_reason, text=ref.choices[0].message.content)


def test_the_stream_is_server_sent_events(http, store):
    body = {"model": INT4, "prompt": STORY, "max_tokens": 4, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/completions", json=body, headers={"X-User-Id": "sse-user"}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-ligero-variant"] == "int4"
        events = sse_events(r.iter_lines())
    *chunks, usage = events
    assert all(e["object"] == "text_completion" and e["model"] == INT4 for e in events)
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 4
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    req = store.get_request(r.headers["x-ligero-request-id"])
    assert (req.stream, req.user_id, req.variant, req.status) == (True, "sse-user", "int4", "ok")


def test_stop_sequences_end_the_text_before_them(oai, story, store):
    full = story[1].choices[0].text
    words = full.split()
    assert len(words) >= 4, f"the reference story is too short to pick a stop string: {full!r}"
    stop = " " + words[len(words) // 2]
    cut = full.find(stop)
    assert cut > 0
    c = oai.completions.create(model=FP32, prompt=STORY, max_tokens=16, temperature=0, stop=[stop, "@@never@@"])
    assert c.choices[0].text == full[:cut]
    assert c.choices[0].finish_reason == "stop"
    assert c.usage.completion_tokens < 16
    check_recorded(store, c.id, variant="fp32", usage=c.usage, endpoint="completions", stream=False,
                   finish_reason="stop", text=full[:cut])

    # Streamed: no delta shows the stop string (or its start), and no usage chunk was asked for.
    chunks = list(oai.completions.create(model=FP32, prompt=STORY, max_tokens=16, temperature=0, stop=stop,
                                         stream=True))
    deltas = [ch.choices[0].text for ch in chunks]
    assert "".join(deltas) == full[:cut]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(ch.usage is None and ch.choices for ch in chunks)


# --- 2. OpenAI options: log-probs, penalties, logit_bias ------------------------------------------------------------


def test_completion_logprobs(oai, story, store):
    _, ref = story
    c = oai.completions.create(model=FP32, prompt=STORY, max_tokens=16, temperature=0, logprobs=2)
    choice = c.choices[0]
    assert choice.text == ref.choices[0].text  # asking for log-probs changes nothing else
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text and len(lp.tokens) == c.usage.completion_tokens == 16
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs)
    # greedy: the chosen token is the most likely one
    assert all(max(top.values()) == pytest.approx(v, abs=1e-5) for top, v in zip(lp.top_logprobs, lp.token_logprobs))
    resp = store.get_response(c.id)
    assert resp.mean_logprob == pytest.approx(sum(lp.token_logprobs) / 16, abs=1e-6)

    chunks = list(oai.completions.create(model=FP32, prompt=STORY, max_tokens=16, temperature=0, logprobs=0,
                                         stream=True))
    streamed = [ch.choices[0].logprobs for ch in chunks if ch.choices[0].logprobs]
    assert [t for x in streamed for t in x.tokens] == lp.tokens
    assert [v for x in streamed for v in x.token_logprobs] == pytest.approx(lp.token_logprobs, abs=1e-5)
    assert [o for x in streamed for o in x.text_offset] == lp.text_offset
    assert all(x.top_logprobs is None for x in streamed)  # logprobs = 0: no alternatives
    # A token is sent once all of its text has been released, so no chunk reports text the client has not seen.
    seen = ""
    for ch in chunks:
        seen += ch.choices[0].text
        lp_chunk = ch.choices[0].logprobs
        if lp_chunk and lp_chunk.tokens:
            assert lp_chunk.text_offset[-1] + len(lp_chunk.tokens[-1]) <= len(seen)


def test_chat_logprobs(oai, chat):
    _, ref = chat
    c = oai.chat.completions.create(model=FP32, messages=QUESTION, max_tokens=12, temperature=0, logprobs=True,
                                    top_logprobs=3)
    content = c.choices[0].logprobs.content
    assert c.choices[0].message.content == ref.choices[0].message.content
    assert "".join(t.token for t in content) == c.choices[0].message.content
    assert all(t.bytes == list(t.token.encode()) and t.logprob <= 0 and len(t.top_logprobs) == 3 for t in content)
    assert all(t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-5) for t in content)
    plain = oai.chat.completions.create(model=FP32, messages=QUESTION, max_tokens=2, temperature=0, logprobs=False)
    assert plain.choices[0].logprobs is None

    chunks = list(oai.chat.completions.create(model=FP32, messages=QUESTION, max_tokens=12, temperature=0,
                                              logprobs=True, stream=True))
    streamed = [t for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]
    assert all(t.top_logprobs == [] for t in streamed)


def test_fields_that_change_nothing_change_nothing(http, story):
    """Neutral values of the new options give exactly the answer of a request without them (greedy and sampled)."""
    plain = {"model": FP32, "prompt": STORY, "max_tokens": 16, "temperature": 0}
    neutral = {"presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}, "echo": False, "best_of": 1,
               "suffix": None}
    r = http.post("/v1/completions", json={**plain, **neutral})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == story[1].choices[0].text
    sampled = {**plain, "temperature": 0.9, "seed": 1234}
    a, b = (http.post("/v1/completions", json=body).json() for body in (sampled, {**sampled, **neutral}))
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    chat = {"model": FP32, "messages": QUESTION, "max_tokens": 4, "tools": [], "tool_choice": "none",
            "response_format": {"type": "text"}}
    assert http.post("/v1/chat/completions", json=chat).status_code == 200


def test_the_official_client_hears_which_field_is_not_supported(oai):
    for field, value in (("response_format", {"type": "json_object"}),
                         ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}])):
        with pytest.raises(openai.BadRequestError) as info:
            oai.chat.completions.create(model=FP32, messages=QUESTION, max_tokens=2, **{field: value})
        assert (info.value.code, info.value.param) == ("unsupported_parameter", field)


def test_penalties_and_logit_bias_steer_the_output(oai, story, tokenizer):
    reference = story[1].choices[0].text
    sea = tokenizer.encode(" sea")
    assert len(sea) == 1
    forced = oai.completions.create(model=FP32, prompt=STORY, max_tokens=3, temperature=0,
                                    logit_bias={str(sea[0]): 100})
    assert forced.choices[0].text == " sea" * 3
    first = tokenizer.encode(reference)[0]
    banned = oai.completions.create(model=FP32, prompt=STORY, max_tokens=4, temperature=0,
                                    logit_bias={str(first): -100})
    assert tokenizer.encode(banned.choices[0].text)[0] != first
    for penalty in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        c = oai.completions.create(model=FP32, prompt=STORY, max_tokens=16, temperature=0, **penalty)
        assert c.choices[0].text != reference and c.usage.completion_tokens >= 1, penalty


# --- 3. feedback ----------------------------------------------------------------------------------------------------


def test_feedback_round_trip(oai, http, store):
    c = oai.completions.create(model=INT4, prompt="The weather today is", max_tokens=2, temperature=0)
    r = http.post("/v1/feedback", json={"response_id": c.id, "value": True, "comment": "short and sweet"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["response_id"] == c.id and body["value"] == 1.0 and body["data_type"] == "boolean"
    assert body["source"] == "human" and isinstance(body["id"], int)
    [fb] = store.feedback_for(c.id)
    assert (fb.id, fb.value, fb.source, fb.data_type, fb.comment, fb.name) == (
        body["id"], 1.0, "human", "boolean", "short and sweet", "user_feedback")

    assert http.post("/v1/feedback", json={"response_id": c.id, "value": "down"}).json()["value"] == 0.0
    r = http.post("/v1/feedback", json={"response_id": c.id, "value": 0.75, "source": "model", "name": "judge"})
    assert r.status_code == 200 and r.json()["data_type"] == "numeric"
    got = [(f.value, f.data_type, f.source, f.name) for f in store.feedback_for(c.id)]
    assert got == [(1.0, "boolean", "human", "user_feedback"), (0.0, "boolean", "human", "user_feedback"),
                   (0.75, "numeric", "model", "judge")]

    # A chat response takes feedback too.
    chat = oai.chat.completions.create(model=FP32, messages=QUESTION, max_tokens=2)
    assert http.post("/v1/feedback", json={"response_id": chat.id, "value": "up"}).status_code == 200
    assert [f.value for f in store.feedback_for(chat.id)] == [1.0]

    # Unknown ids and malformed bodies: JSON errors, nothing stored.
    err = assert_error(http.post("/v1/feedback", json={"response_id": "cmpl-doesnotexist", "value": True}), 404)
    assert "unknown response id" in err["message"]
    bad_bodies = [b"{nope", b"[]", json.dumps({"value": True}).encode(),
                  json.dumps({"response_id": c.id}).encode(),
                  json.dumps({"response_id": c.id, "value": "maybe"}).encode(),
                  json.dumps({"response_id": c.id, "value": 0.5, "data_type": "boolean"}).encode(),
                  json.dumps({"response_id": c.id, "value": True, "source": "robot"}).encode(),
                  json.dumps({"response_id": c.id, "value": True, "rating": 5}).encode()]
    for content in bad_bodies:
        assert_error(http.post("/v1/feedback", content=content, headers={"content-type": "application/json"}), 400)
    assert len(store.feedback_for(c.id)) == 3


# --- 4. A/B assignment ----------------------------------------------------------------------------------------------


def test_users_stick_to_their_planned_variant(oai, http, store, server):
    users = users_for("sticky", per_variant=2)
    for planned, ids in users.items():
        for user in ids:
            seen = []
            raw = oai.completions.with_raw_response.create(model=MODEL, prompt="Hello", max_tokens=1,
                                                           extra_headers={"X-User-Id": user})
            seen.append((raw.headers["x-ligero-variant"], raw.parse().model, raw.headers["x-ligero-request-id"]))
            raw = oai.chat.completions.with_raw_response.create(model=MODEL, messages=QUESTION, max_tokens=1,
                                                                user=user)  # the `user` field
            seen.append((raw.headers["x-ligero-variant"], raw.parse().model, raw.headers["x-ligero-request-id"]))
            for _ in range(2):
                r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 1},
                              headers={"X-User-Id": user})
                assert r.status_code == 200, r.text
                seen.append((r.headers["x-ligero-variant"], r.json()["model"], r.headers["x-ligero-request-id"]))
            assert {(v, m) for v, m, _ in seen} == {(planned, f"{MODEL}:{planned}")}, (user, seen)
            for _, _, request_id in seen:
                req = store.get_request(request_id)
                assert (req.experiment, req.user_id, req.variant) == (EXPERIMENT.name, user, planned)

    assigned = {a.user_id: a for a in store.assignments_for(EXPERIMENT.name)}
    for planned, ids in users.items():
        for user in ids:
            assert assigned[user].variant == planned and assigned[user].server_id == server.health["server_id"]
    all_users = [a.user_id for a in store.assignments_for(EXPERIMENT.name)]
    assert len(all_users) == len(set(all_users)), "a user has more than one assignment row"

    # The X-User-Id header wins over the `user` field.
    header_user, field_user = users["int4"][0], users["fp32"][0]
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 1, "user": field_user},
                  headers={"X-User-Id": header_user})
    assert r.headers["x-ligero-variant"] == "int4"
    assert store.get_request(r.headers["x-ligero-request-id"]).user_id == header_user


def test_the_split_is_about_even(http, store):
    users = [f"split-{i}" for i in range(48)]

    def ask(user: str) -> str:
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 1},
                      headers={"X-User-Id": user})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == f"{MODEL}:{r.headers['x-ligero-variant']}"
        return r.headers["x-ligero-variant"]

    with ThreadPoolExecutor(8) as pool:
        got = dict(zip(users, pool.map(ask, users)))
    assert got == {u: assign(EXPERIMENT, u) for u in users}
    n, fp32 = len(users), sum(v == "fp32" for v in got.values())
    assert abs(fp32 - n / 2) <= 4 * math.sqrt(n / 4), f"{fp32} of {n} users got fp32 with a 50/50 split"
    rows_by_user = {}
    for a in store.assignments_for(EXPERIMENT.name):
        rows_by_user.setdefault(a.user_id, []).append(a.variant)
    assert all(rows_by_user[u] == [got[u]] for u in users)


def test_no_user_gets_the_first_variant_outside_the_experiment(oai, store):
    before = store.count("assignments")
    for _ in range(2):
        raw = oai.completions.with_raw_response.create(model=MODEL, prompt="Hi", max_tokens=1)
        assert raw.headers["x-ligero-variant"] == "fp32" and raw.parse().model == FP32
        req = store.get_request(raw.headers["x-ligero-request-id"])
        assert (req.variant, req.experiment, req.user_id) == ("fp32", None, None)
    raw = oai.chat.completions.with_raw_response.create(model=MODEL, messages=QUESTION, max_tokens=1)
    assert raw.headers["x-ligero-variant"] == "fp32"
    assert store.count("assignments") == before


def test_a_variant_asked_for_by_name_bypasses_the_experiment(http, store):
    users = users_for("direct", per_variant=1)
    for model, variant, user in [(INT4, "int4", users["fp32"][0]), (FP32, "fp32", users["int4"][0])]:
        r = http.post("/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 1},
                      headers={"X-User-Id": user})
        assert r.status_code == 200 and r.headers["x-ligero-variant"] == variant and r.json()["model"] == model
        req = store.get_request(r.headers["x-ligero-request-id"])
        assert (req.variant, req.experiment, req.user_id) == (variant, None, user)
        assert store.stored_variant(EXPERIMENT.name, user) is None


# --- 5. guardrails --------------------------------------------------------------------------------------------------


def test_a_toxic_output_is_blocked(oai, store):
    from ligero.eval.toxicity import score_texts

    raw = oai.completions.with_raw_response.create(model=FP32, prompt=TOXIC, max_tokens=30, temperature=0)
    c = raw.parse()
    text = c.choices[0].text
    assert c.choices[0].finish_reason == "content_filter"
    assert score_texts([text])[0] < 0.5, text
    assert c.usage.completion_tokens < 30  # generation stopped at the blocked word
    req, resp = check_recorded(store, c.id, request_id=raw.headers["x-ligero-request-id"], variant="fp32",
                               usage=c.usage, endpoint="completions", stream=False, finish_reason="content_filter",
                               text=text, status="blocked", guardrail_action="block")
    assert resp.toxicity_score >= 0.5  # the score of the output including the word that was held back
    events = store.guardrail_events_for(req.id)
    assert [(e.rule, e.action, e.response_id) for e in events] == [("toxicity", "block", c.id)]

    # Streamed: the same released text, and no delta carries a toxic word.
    chunks = list(oai.completions.create(model=FP32, prompt=TOXIC, max_tokens=30, temperature=0, stream=True))
    deltas = [ch.choices[0].text for ch in chunks]
    assert "".join(deltas) == text
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    words = re.findall(r"\w+", "".join(deltas))
    assert not words or max(score_texts(words)) < 0.5
    req = store.get_request(store.get_response(chunks[0].id).request_id)
    assert req.status == "blocked" and req.stream
    assert [(e.rule, e.action) for e in store.guardrail_events_for(req.id)] == [("toxicity", "block")]


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_a_banned_pattern_in_the_prompt_is_refused(http, store, endpoint):
    user = f"banned-{endpoint}"
    body = ({"model": FP32, "prompt": BANNED_TEXT, "max_tokens": 4} if endpoint == "completions" else
            {"model": FP32, "messages": [{"role": "user", "content": BANNED_TEXT}], "max_tokens": 4})
    path = "/v1/completions" if endpoint == "completions" else "/v1/chat/completions"
    err = assert_error(http.post(path, json=body, headers={"X-User-Id": user}), 400, code="content_filter")
    assert "forbidden" not in err["message"].lower()  # the message names the rule, not the user's text
    [req] = rows(store, st.RequestRecord, user_id=user)
    assert (req.status, req.http_status, req.endpoint, req.variant) == ("blocked", 400, endpoint, "fp32")
    assert [(e.rule, e.action) for e in store.guardrail_events_for(req.id)] == [("banned_pattern", "block")]
    assert rows(store, st.ResponseRecord, request_id=req.id) == []


# --- 6. bad input ---------------------------------------------------------------------------------------------------

LONG_PROMPT = "hello " * (MAX_PROMPT_TOKENS + 100)
BAD_REQUESTS = [
    # (id, path, raw body or JSON, extra headers, status, code, param)
    ("malformed-json", "/v1/completions", b'{"model": "smollm2-135m", "prompt": ', {}, 400, "invalid_json", None),
    ("not-utf8", "/v1/completions", b'{"prompt": "\xff\xfe"}', {}, 400, "invalid_json", None),
    ("json-array", "/v1/completions", b'[{"model": "smollm2-135m", "prompt": "Hi"}]', {}, 400, "invalid_json", None),
    ("deeply-nested", "/v1/completions", b"[" * 5000 + b"]" * 5000, {}, 400, "invalid_json", None),
    ("deeply-nested-feedback", "/v1/feedback", b'{"value": ' + b"[" * 5000 + b"]" * 5000 + b"}", {}, 400,
     "invalid_json", None),
    ("json-string", "/v1/chat/completions", b'"hello"', {}, 400, "invalid_json", None),
    ("empty-body", "/v1/completions", b"", {}, 400, "invalid_json", None),
    ("missing-prompt", "/v1/completions", {"model": MODEL}, {}, 400, "invalid_request", "prompt"),
    ("missing-model", "/v1/completions", {"prompt": "Hi"}, {}, 400, "invalid_request", "model"),
    ("missing-messages", "/v1/chat/completions", {"model": MODEL}, {}, 400, "invalid_request", "messages"),
    ("no-messages", "/v1/chat/completions", {"model": MODEL, "messages": []}, {}, 400, "invalid_request",
     "messages"),
    ("bad-role", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "Hi"}]}, {},
     400, "invalid_request", None),
    ("image-part", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     {}, 400, "invalid_request", "messages"),  # a text model: images are refused, not ignored
    ("max-tokens-text", "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": "abc"}, {}, 400,
     "invalid_request", "max_tokens"),
    ("max-tokens-zero", "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 0}, {}, 400,
     "invalid_request", "max_tokens"),
    ("temperature-5", "/v1/completions", {"model": MODEL, "prompt": "Hi", "temperature": 5}, {}, 400,
     "invalid_request", "temperature"),
    ("top-p-0", "/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "top_p": 0}, {}, 400,
     "invalid_request", "top_p"),
    ("n-2", "/v1/completions", {"model": MODEL, "prompt": "Hi", "n": 2}, {}, 400, "invalid_request", "n"),
    ("two-prompts", "/v1/completions", {"model": MODEL, "prompt": ["Hi", "Ho"]}, {}, 400, "invalid_request",
     "prompt"),
    ("five-stops", "/v1/completions", {"model": MODEL, "prompt": "Hi", "stop": list("abcde")}, {}, 400,
     "invalid_request", "stop"),
    ("model-number", "/v1/completions", {"model": 7, "prompt": "Hi"}, {}, 400, "invalid_request", "model"),
    ("stream-options-text", "/v1/completions", {"model": MODEL, "prompt": "Hi", "stream_options": "yes"}, {}, 400,
     "invalid_request", "stream_options"),
    ("user-too-long", "/v1/completions", {"model": MODEL, "prompt": "Hi", "user": "u" * 300}, {}, 400,
     "invalid_request", "user"),
    ("huge-seed", "/v1/completions",
     {"model": FP32, "prompt": "Hi", "max_tokens": 1, "temperature": 0.7, "seed": 2**70}, {}, 400,
     "invalid_request", "seed"),
    ("bad-segment", "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 1},
     {"X-Segment": "not a segment!"}, 400, "invalid_request", None),
    ("empty-prompt", "/v1/completions", {"model": FP32, "prompt": "", "max_tokens": 1}, {}, 400,
     "invalid_request", "prompt"),
    ("unknown-model", "/v1/completions", {"model": "gpt-4o", "prompt": "Hi"}, {}, 404, "model_not_found", "model"),
    ("unknown-variant", "/v1/chat/completions", {"model": f"{MODEL}:int3", "messages": QUESTION}, {}, 404,
     "model_not_found", "model"),
    ("prompt-too-long", "/v1/completions", {"model": FP32, "prompt": LONG_PROMPT, "max_tokens": 1}, {}, 400,
     "context_length_exceeded", "prompt"),
    ("body-too-large", "/v1/completions", {"model": FP32, "prompt": "a " * MAX_BODY_BYTES}, {}, 413,
     "body_too_large", None),
    # OpenAI fields Ligero does not implement: refused, naming the field
    ("tools", "/v1/chat/completions",
     {"model": FP32, "messages": QUESTION, "tools": [{"type": "function", "function": {"name": "f"}}]}, {}, 400,
     "unsupported_parameter", "tools"),
    ("tool-choice", "/v1/chat/completions", {"model": FP32, "messages": QUESTION, "tool_choice": "auto"}, {}, 400,
     "unsupported_parameter", "tool_choice"),
    ("functions", "/v1/chat/completions", {"model": FP32, "messages": QUESTION, "functions": [{"name": "f"}]}, {},
     400, "unsupported_parameter", "functions"),
    ("json-mode", "/v1/chat/completions",
     {"model": FP32, "messages": QUESTION, "response_format": {"type": "json_object"}}, {}, 400,
     "unsupported_parameter", "response_format"),
    ("echo", "/v1/completions", {"model": FP32, "prompt": "Hi", "echo": True}, {}, 400, "unsupported_parameter",
     "echo"),
    ("best-of", "/v1/completions", {"model": FP32, "prompt": "Hi", "best_of": 3}, {}, 400, "unsupported_parameter",
     "best_of"),
    ("suffix", "/v1/completions", {"model": FP32, "prompt": "Hi", "suffix": "The end."}, {}, 400,
     "unsupported_parameter", "suffix"),
    # the implemented ones, out of range
    ("logprobs-6", "/v1/completions", {"model": FP32, "prompt": "Hi", "logprobs": 6}, {}, 400, "invalid_request",
     "logprobs"),
    ("top-logprobs-alone", "/v1/chat/completions", {"model": FP32, "messages": QUESTION, "top_logprobs": 2}, {},
     400, "invalid_request", "top_logprobs"),
    ("top-logprobs-21", "/v1/chat/completions",
     {"model": FP32, "messages": QUESTION, "logprobs": True, "top_logprobs": 21}, {}, 400, "invalid_request",
     "top_logprobs"),
    ("presence-3", "/v1/completions", {"model": FP32, "prompt": "Hi", "presence_penalty": 3}, {}, 400,
     "invalid_request", "presence_penalty"),
    ("frequency-nan", "/v1/completions", b'{"model": "smollm2-135m", "prompt": "Hi", "frequency_penalty": NaN}',
     {}, 400, "invalid_request", "frequency_penalty"),
    ("logit-bias-101", "/v1/completions", {"model": FP32, "prompt": "Hi", "logit_bias": {"50": 101}}, {}, 400,
     "invalid_request", "logit_bias.50"),
    ("logit-bias-word", "/v1/completions", {"model": FP32, "prompt": "Hi", "logit_bias": {"sea": 1}}, {}, 400,
     "invalid_request", None),
    ("logit-bias-beyond-vocab", "/v1/completions", {"model": FP32, "prompt": "Hi", "logit_bias": {"999999": 1}},
     {}, 400, "invalid_request", "logit_bias"),
]


@pytest.mark.parametrize("path, body, headers, status, code, param",
                         [pytest.param(*case[1:], id=case[0]) for case in BAD_REQUESTS])
def test_bad_input_gets_a_json_error(http, path, body, headers, status, code, param):
    if isinstance(body, bytes):
        r = http.post(path, content=body, headers={"content-type": "application/json", **headers})
    else:
        r = http.post(path, json=body, headers=headers)
    assert_error(r, status, code, param)


def test_an_oversized_chunked_body_is_refused_and_recorded(http, store):
    """No Content-Length (chunked): the server counts the bytes as they come."""
    before = len(rows(store, st.RequestRecord, http_status=413))
    piece = json.dumps({"model": FP32, "prompt": "a " * 3000})[:-1].encode()

    def body():
        yield piece
        for _ in range(10):
            yield b" " * 3000
        yield b"}"

    r = http.post("/v1/completions", content=body(), headers={"content-type": "application/json"})
    assert_error(r, 413, "body_too_large")
    blocked = rows(store, st.RequestRecord, http_status=413)
    assert len(blocked) == before + 1 and all(req.status == "blocked" for req in blocked)
    for req in blocked:
        assert [(e.rule, e.action) for e in store.guardrail_events_for(req.id)] == [("max_body_bytes", "block")]


def raw_request(server, head: bytes, body: bytes, read_s: float = 0.0) -> bytes:
    """Send raw HTTP bytes, then read one answer for up to `read_s` seconds (0: do not wait) and close: a broken
    client."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head + body)
        answer, deadline = b"", time.monotonic() + read_s
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            answer += chunk
            top, _, rest = answer.partition(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length: *(\d+)", top)
            if not chunk or (length and len(rest) >= int(length.group(1))):
                break
        return answer


def head(length: int | str, path: str = "/v1/completions", extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n{extra}\r\n").encode()


def test_rejected_requests_store_only_checked_values(http, store):
    """A 10 KB X-User-Id or model name is refused, and the refusal's row does not keep it."""
    before = {r.id for r in rows(store, st.RequestRecord)}
    huge_user = "u" * 10_000
    err = assert_error(http.post("/v1/completions", json={"model": FP32, "prompt": "Hi", "max_tokens": 1},
                                 headers={"X-User-Id": huge_user}), 400, "invalid_request")
    assert "longer than 256" in err["message"] and huge_user not in err["message"]
    huge_model = "m" * 10_000
    assert_error(http.post("/v1/completions", json={"model": huge_model, "prompt": "Hi"}), 404, "model_not_found")
    assert_error(http.post("/v1/completions", json={"model": huge_model, "prompt": 7}), 400, "invalid_request")
    new = [r for r in rows(store, st.RequestRecord) if r.id not in before]
    assert sorted(r.http_status for r in new) == [400, 400, 404]
    assert all(r.user_id is None and r.model == "" for r in new), [(r.user_id, r.model[:20]) for r in new]


def test_an_absurd_content_length_is_refused_without_parsing_it(server):
    largest = str(2**64 - 1)  # the HTTP parser itself refuses longer ones
    answer = raw_request(server, head(largest), b"{}", read_s=10)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert largest.encode() not in answer and b"body_too_large" in answer


def test_a_client_that_disconnects_while_sending_its_body(server, store):
    """Logged and recorded as a 499, without a traceback or an internal error."""
    before = len(rows(store, st.RequestRecord, http_status=499, stream=False))
    raw_request(server, head(2000), b'{"model": "smollm2-135m", "prompt": "half a bo')
    found = wait_for(lambda: len(rows(store, st.RequestRecord, http_status=499, stream=False)) > before)
    assert found, server.log_tail()
    [req] = [r for r in rows(store, st.RequestRecord, http_status=499, stream=False)][before:]
    assert (req.status, req.model, req.user_id) == ("error", "", None)
    assert wait_for(lambda: f"request {req.id}: the client disconnected while sending its body (499)"
                    in server.log_tail(10**7))
    log = server.log_tail(10**7)
    assert "Traceback" not in log and "unexpected error" not in log, log[-4000:]


def test_a_slow_body_is_answered_408(server, store):
    before = len(rows(store, st.RequestRecord, http_status=408))
    t0 = time.monotonic()
    answer = raw_request(server, head(2000), b'{"model": "smollm2-135m", ', read_s=BODY_TIMEOUT_S + 20)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    assert BODY_TIMEOUT_S - 0.5 <= time.monotonic() - t0 < BODY_TIMEOUT_S + 20
    assert b"body_timeout" in answer
    assert len(rows(store, st.RequestRecord, http_status=408)) == before + 1


def test_the_server_survives_bad_input(server, http):
    assert http.get("/health").status_code == 200
    r = http.post("/v1/completions", json={"model": FP32, "prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    assert server.alive()
    log = server.log_tail(10**7)
    assert "unexpected error" not in log and "Traceback" not in log, log[-4000:]


# --- 7. a client that leaves mid-stream -----------------------------------------------------------------------------


def test_a_client_that_disconnects_mid_stream(server, http, store):
    def timed(max_tokens: int, prompt: str = "Hi") -> float:
        t0 = time.monotonic()
        r = http.post("/v1/completions", json={"model": FP32, "prompt": prompt, "max_tokens": max_tokens,
                                               "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == max_tokens, r.text
        return time.monotonic() - t0

    # How long this machine takes for a small request and per generated token (warm), to tell a generation that
    # stopped when its client left from one that ran on to its end (and held up the next batch).
    timed(4)
    small_s = timed(4)
    per_token_s = max(0.0, timed(36, STORY) - small_s) / 32

    body = {"model": FP32, "prompt": STORY, "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.Client(base_url=server.url, timeout=60) as leaver, \
            leaver.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        request_id = r.headers["x-ligero-request-id"]
        events = []
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: "):]))
                if len(events) == 2:
                    break
    # The connection is closed now, long before 200 tokens.
    assert all(e["choices"][0]["finish_reason"] is None for e in events)
    response_id = events[0]["id"]

    elapsed = timed(4)
    # Had the abandoned row kept decoding, this request would have waited for its ~195 remaining tokens.
    assert elapsed < small_s + 0.5 + 50 * per_token_s, (elapsed, small_s, per_token_s)
    assert http.get("/health").status_code == 200

    deadline = time.monotonic() + 15
    while (req := store.get_request(request_id)) is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert req is not None, "the abandoned request was never recorded"
    assert (req.status, req.http_status, req.stream, req.variant) == ("error", 499, True, "fp32")
    assert store.get_response(response_id) is None  # never acknowledged, so no response record


# --- 8. concurrency and metrics -------------------------------------------------------------------------------------


def test_concurrent_requests_are_batched(server, http, store):
    # A guardrail decision of our own, so its series exists whatever ran before.
    assert http.post("/v1/completions", json={"model": INT4, "prompt": BANNED_TEXT}).status_code == 400
    before = http.get("/metrics").text

    async def run_all():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            return await asyncio.gather(*[
                client.post("/v1/completions", json={"model": INT4, "prompt": f"Fact number {i}:", "max_tokens": 8,
                                                     "temperature": 0}) for i in range(8)])

    answers = asyncio.run(run_all())
    assert [a.status_code for a in answers] == [200] * 8, [a.text for a in answers]
    bodies = [a.json() for a in answers]
    assert len({b["id"] for b in bodies}) == 8
    for b in bodies:
        assert b["model"] == INT4 and b["choices"][0]["finish_reason"] in ("length", "stop", "content_filter")
        resp = store.get_response(b["id"])
        assert resp is not None and resp.variant == "int4"
        assert resp.output_tokens == b["usage"]["completion_tokens"]
    after = http.get("/metrics").text

    steps = metric(after, "ligero_decode_steps_total", variant="int4") - metric(before, "ligero_decode_steps_total",
                                                                               variant="int4")
    generated = sum(b["usage"]["completion_tokens"] for b in bodies)
    # One request at a time would take a decode step per token after its first; batched rows share steps.
    assert 1 <= steps < generated / 2, f"{generated} tokens in {steps:g} decode steps: the requests were not batched"
    ok = {"variant": "int4", "endpoint": "completions", "status": "ok"}
    blocked = {**ok, "status": "blocked"}
    served = sum(b["choices"][0]["finish_reason"] != "content_filter" for b in bodies)
    assert metric(after, "ligero_requests_total", **ok) - metric(before, "ligero_requests_total", **ok) == served
    assert (metric(after, "ligero_requests_total", **blocked) - metric(before, "ligero_requests_total", **blocked)
            == 8 - served)
    completion = sum(b["usage"]["completion_tokens"] for b in bodies)
    assert (metric(after, "ligero_tokens_total", variant="int4", kind="completion")
            - metric(before, "ligero_tokens_total", variant="int4", kind="completion")) == completion
    assert (metric(after, "ligero_request_latency_seconds_count", variant="int4", endpoint="completions")
            - metric(before, "ligero_request_latency_seconds_count", variant="int4", endpoint="completions")) == 8
    assert metric(after, "ligero_guardrail_actions_total", variant="int4", rule="banned_pattern",
                  action="block") >= 1
    for series in ("ligero_requests_total", "ligero_request_latency_seconds_bucket", "ligero_tokens_total",
                   "ligero_guardrail_actions_total", "ligero_decode_steps_total", "ligero_requests_processing",
                   "ligero_requests_deferred", "ligero_busy_slots_per_decode", "ligero_kv_cache_tokens",
                   "ligero_kv_cache_usage_ratio", "ligero_time_to_first_token_seconds_bucket"):
        assert re.search(rf"^{series}\{{", after, re.MULTILINE), f"/metrics has no {series} series"


# --- 9-10. API keys and rate limits (a second, small server) --------------------------------------------------------


@pytest.fixture(scope="module")
def auth_server(launch, tmp_path_factory):
    folder = tmp_path_factory.mktemp("auth-server")
    guardrails = folder / "rate.toml"
    guardrails.write_text("rate_limit_per_minute = 6\nrate_limit_burst = 2\n")
    # One row and no waiting room: a second concurrent request meets back-pressure (test_a_full_queue_answers_429)
    proc = launch("--variant", "fp32", "--store", f"sqlite:///{folder / 'auth.db'}", "--guardrails", str(guardrails),
                  "--max-batch", "1", "--max-waiting", "0", env={"LIGERO_API_KEYS": ",".join(KEYS)})
    proc.store_url, proc.folder = f"sqlite:///{folder / 'auth.db'}", folder
    return proc


@pytest.fixture(scope="module")
def auth_store(auth_server):
    with Store(auth_server.store_url) as s:
        yield s


def test_api_keys_are_required_and_never_stored(auth_server, auth_store):
    completion = {"model": MODEL, "prompt": "Hi", "max_tokens": 1}
    recorded = auth_store.count("requests")
    with httpx.Client(base_url=auth_server.url, timeout=60) as h:
        assert h.get("/health").status_code == 200  # open: load balancers probe it
        for headers in ({}, {"Authorization": "Bearer wrong-key-123"}, {"Authorization": "key-one"},
                        {"Authorization": "Basic a2V5LW9uZQ=="}):
            for method, path, body in [("POST", "/v1/completions", completion), ("GET", "/v1/models", None),
                                       ("POST", "/v1/feedback", {"response_id": "cmpl-x", "value": True})]:
                r = h.request(method, path, json=body, headers=headers)
                err = assert_error(r, 401, "invalid_api_key")
                assert "wrong-key-123" not in r.text and "key-one" not in r.text, err
    assert auth_store.count("requests") == recorded  # refused before anything was read or recorded

    bad = openai.OpenAI(base_url=auth_server.base_url, api_key="wrong-key-123", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.completions.create(model=MODEL, prompt="Hi", max_tokens=1)
    assert info.value.status_code == 401 and "wrong-key-123" not in str(info.value)
    bad.close()

    good = openai.OpenAI(base_url=auth_server.base_url, api_key="key-one", max_retries=0, timeout=60)
    assert sorted(m.id for m in good.models.list()) == [MODEL, FP32]
    c = good.completions.create(model=MODEL, prompt="Hi", max_tokens=2, temperature=0)
    good.close()
    assert c.model == FP32 and c.usage.completion_tokens >= 1
    resp = auth_store.get_response(c.id)
    assert auth_store.get_request(resp.request_id).api_key_id == key_fingerprint("key-one")

    files = sorted(auth_server.folder.glob("auth.db*"))  # the database, its WAL and shared-memory files
    data = b"".join(f.read_bytes() for f in files)
    assert key_fingerprint("key-one").encode() in data  # the search works: the fingerprint is there
    for secret in (*KEYS, "wrong-key-123"):
        assert secret.encode() not in data, f"{secret} is in the store's files"
    assert "key-one" not in auth_server.log_tail(10**7)


def test_metrics_need_a_key_when_keys_are_on(auth_server):
    with httpx.Client(base_url=auth_server.url, timeout=60) as h:
        assert_error(h.get("/metrics"), 401, "invalid_api_key")
        assert_error(h.get("/metrics", headers={"Authorization": "Bearer wrong-key-123"}), 401, "invalid_api_key")
        r = h.get("/metrics", headers={"Authorization": "Bearer key-one"})
        assert r.status_code == 200 and "ligero_decode_steps_total" in r.text


def test_rate_limit(auth_server, auth_store):
    # Greedy: a sampled token can be one the toxicity filter blocks, which this test does not expect.
    small = {"model": FP32, "prompt": "Hi", "max_tokens": 1, "temperature": 0}
    with httpx.Client(base_url=auth_server.url, timeout=60) as h:
        two = {"Authorization": "Bearer key-two"}
        codes = [h.post("/v1/completions", json=small, headers=two).status_code for _ in range(2)]
        assert codes == [200, 200]  # the burst of 2
        r = h.post("/v1/completions", json=small, headers=two)
        err = assert_error(r, 429, "rate_limit_exceeded")
        assert 1 <= int(r.headers["retry-after"]) <= 10  # 6 a minute: a token every 10 s
        assert "retry after" in err["message"]
        # Buckets are per key: key-one still gets through.
        assert h.post("/v1/completions", json=small, headers={"Authorization": "Bearer key-one"}).status_code == 200

    fp = key_fingerprint("key-two")
    recorded = sorted((req.http_status, req.status) for req in rows(auth_store, st.RequestRecord, api_key_id=fp))
    assert recorded == [(200, "ok"), (200, "ok"), (429, "blocked")]
    [limited] = rows(auth_store, st.RequestRecord, api_key_id=fp, http_status=429)
    assert [(e.rule, e.action) for e in auth_store.guardrail_events_for(limited.id)] == [("rate_limit", "block")]


def test_a_full_queue_answers_429_and_loses_nothing_acknowledged(auth_server, auth_store):
    """The auth server has one row and no waiting room: while a stream holds the row, another request is refused
    with 429 and Retry-After (recorded as a queue_full block); the running stream completes and is stored."""
    key = {"Authorization": "Bearer key-three"}
    body = {"model": FP32, "prompt": "Once upon a time", "max_tokens": 200, "temperature": 0, "stream": True,
            "logit_bias": {"0": -100, "1": -100, "2": -100}}
    with httpx.Client(base_url=auth_server.url, timeout=60, headers=key) as h, \
            h.stream("POST", "/v1/completions", json=body) as running:
        assert running.status_code == 200
        lines = running.iter_lines()
        first = next(json.loads(line[6:]) for line in lines if line.startswith("data: "))  # it holds the row now
        refused = h.post("/v1/completions", json={**body, "stream": False, "max_tokens": 2})
        err = assert_error(refused, 429, "server_busy")
        assert refused.headers["retry-after"] == "1" and "busy" in err["message"]
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    resp = auth_store.get_response(first["id"])  # acknowledged ([DONE] came after the commit): stored
    assert resp is not None and resp.output_tokens == 200
    fp = key_fingerprint("key-three")
    [busy] = rows(auth_store, st.RequestRecord, api_key_id=fp, http_status=429)
    assert busy.status == "blocked" and busy.variant == "fp32"
    assert [(e.rule, e.action) for e in auth_store.guardrail_events_for(busy.id)] == [("queue_full", "block")]
