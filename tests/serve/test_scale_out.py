"""Two `ligero serve` processes, one PostgreSQL store: they agree on every user's variant, the assignments table
keeps one row per user even when both servers see a new user at the same moment, and no acknowledged response is
lost. Needs LIGERO_TEST_POSTGRES_URL (a throwaway database; `.ci/run` sets it, `.ci/postgres.sh` starts one):

    d=$(mktemp -d); url=$(.ci/postgres.sh start $d)
    LIGERO_TEST_POSTGRES_URL=$url .venv/bin/python -m pytest -q tests/serve/test_scale_out.py
    .ci/postgres.sh stop $d
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from ligero.serve import store as st
from ligero.serve.abtest import Experiment, assign
from ligero.serve.store import Store

POSTGRES_URL = os.environ.get("LIGERO_TEST_POSTGRES_URL")
pytestmark = pytest.mark.skipif(
    not POSTGRES_URL, reason="set LIGERO_TEST_POSTGRES_URL to a throwaway PostgreSQL database (.ci/run does; "
                             ".ci/postgres.sh starts one) to run two servers on one store")

MODEL = "smollm2-135m"
EXPERIMENT = Experiment(f"{MODEL}-ab", ["fp32", "int4"], [50, 50])
USERS = [f"scale-user-{i}" for i in range(20)]


@pytest.fixture(scope="module")
def store_url(postgres_schema):
    """The PostgreSQL URL in a new schema of this module's (dropped at the end): the servers start on an empty store
    and touch nothing else in the database."""
    with postgres_schema(POSTGRES_URL, "ligero_scale") as url:
        yield url


@pytest.fixture(scope="module")
def servers(launch, store_url):
    args = ("--variant", "fp32", "--variant", "int4", "--split", "50,50", "--store", store_url)
    pair = [launch(*args, wait=False), launch(*args, wait=False)]  # both start (and create the tables) at once
    for server in pair:
        server.wait_ready()
    return pair


def test_two_servers_share_one_store(servers, store_url):
    a, b = servers
    server_ids = [a.health["server_id"], b.health["server_id"]]
    assert server_ids[0] != server_ids[1]
    assert a.health["experiment"] == b.health["experiment"] == EXPERIMENT.name

    def ask(job: tuple[int, str, int]) -> dict:
        which, user, tokens = job
        r = httpx.post(f"{servers[which].url}/v1/completions", headers={"X-User-Id": user}, timeout=120,
                       json={"model": MODEL, "prompt": f"Hello from {user}", "max_tokens": tokens})
        assert r.status_code == 200, r.text
        body = r.json()
        return {"server": which, "user": user, "variant": r.headers["x-ligero-variant"], "id": body["id"],
                "request_id": r.headers["x-ligero-request-id"], "tokens": body["usage"]["completion_tokens"],
                "finish_reason": body["choices"][0]["finish_reason"], "text": body["choices"][0]["text"]}

    answers = []
    with ThreadPoolExecutor(4) as pool:
        # Each new user meets both servers at the same moment (the assignment race), then each server again in
        # turn, starting with a different one for odd and even users.
        for user in USERS:
            answers += pool.map(ask, [(0, user, 1), (1, user, 1)])
        for i, user in enumerate(USERS):
            first = i % 2
            answers += [ask((first, user, 2)), ask((1 - first, user, 2))]

    for user in USERS:
        got = {(x["server"], x["variant"]) for x in answers if x["user"] == user}
        planned = assign(EXPERIMENT, user)
        assert got == {(0, planned), (1, planned)}, (user, planned, got)
    assert {x["variant"] for x in answers} == {"fp32", "int4"}

    with Store(store_url) as s:
        rows = s.assignments_for(EXPERIMENT.name)
        assert sorted(r.user_id for r in rows) == sorted(USERS), "not exactly one assignment row per user"
        assert {r.user_id: r.variant for r in rows} == {u: assign(EXPERIMENT, u) for u in USERS}
        assert {r.server_id for r in rows} <= set(server_ids)

        lost = [x for x in answers if s.get_response(x["id"]) is None]
        assert not lost, f"{len(lost)} of {len(answers)} acknowledged responses are not in the store"
        for x in answers:
            resp = s.get_response(x["id"])
            req = s.get_request(resp.request_id)
            assert resp.request_id == x["request_id"] and resp.output_tokens == x["tokens"]
            # The store says what the client was told. Output that the toxicity filter blocks is a normal answer
            # (HTTP 200, finish_reason content_filter); which short outputs trip it depends on batching's numerics.
            status = "blocked" if x["finish_reason"] == "content_filter" else "ok"
            assert resp.finish_reason == x["finish_reason"], x
            assert (req.status, req.http_status, req.user_id, req.variant) == (status, 200, x["user"], x["variant"]), x
            assert req.server_id == server_ids[x["server"]]
        assert s.count("responses") == s.count("requests") == len(answers) == 4 * len(USERS)
        with Session(s.engine) as session:
            writers = set(session.scalars(select(st.RequestRecord.server_id).distinct()))
        assert writers == set(server_ids)
