"""The serving store: every record round-trips, feedback checks its response, first assignment wins a race,
commits survive reopening and a crash. SQLite always; PostgreSQL too when LIGERO_TEST_POSTGRES_URL names a
throwaway database (`.ci/postgres.sh` starts one; CI sets it): every test that takes `url` or `store` then runs on
both. The PostgreSQL cases work in a schema of their own, made for the test session and dropped after it (the
URL's role needs CREATE on the database), and each test starts without Ligero's tables."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import create_engine, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, StatementError

from ligero.errors import LigeroError
from ligero.serve import store as st
from ligero.serve.store import Store

POSTGRES_URL = os.environ.get("LIGERO_TEST_POSTGRES_URL")
NEEDS_POSTGRES = pytest.mark.skipif(
    not POSTGRES_URL, reason="set LIGERO_TEST_POSTGRES_URL to a throwaway PostgreSQL database to test it")
BACKENDS = [pytest.param("sqlite", id="sqlite"), pytest.param("postgresql", id="postgresql", marks=NEEDS_POSTGRES)]


@pytest.fixture(scope="session")
def postgres_url(postgres_schema):
    """LIGERO_TEST_POSTGRES_URL in a schema of this test session's own (dropped at the end)."""
    with postgres_schema(POSTGRES_URL, "ligero_test") as url:
        yield url


@pytest.fixture(params=BACKENDS)
def url(request, tmp_path):
    """The URL of an empty store: a new SQLite file, or the session's PostgreSQL schema without Ligero's tables."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'serve.db'}"
        return
    pg_url = request.getfixturevalue("postgres_url")
    engine = create_engine(st._parse_url(pg_url))
    st.Base.metadata.drop_all(engine)  # whatever an earlier test left, e.g. after a failure
    engine.dispose()
    yield pg_url


@pytest.fixture
def store(url):
    with Store(url) as s:
        yield s


def add_request(store: Store, **overrides) -> str:
    fields = {"endpoint": "chat", "model": "smollm2-135m", "variant": "int4", "prompt_tokens": 12,
              "prompt_chars": 48, "max_tokens": 64, "stream": False, "status": "ok", "http_status": 200,
              "server_id": "test-1"}
    return store.record_request(**{**fields, **overrides})


def add_exchange(store: Store, **response_overrides) -> tuple[str, str]:
    request_id = add_request(store)
    fields = {"response_id": st.new_response_id("chat"), "request_id": request_id, "variant": "int4",
              "output_tokens": 20, "latency_ms": 153.5, "finish_reason": "stop"}
    return request_id, store.record_response(**{**fields, **response_overrides})


def test_every_record_round_trips(store):
    key = st.key_fingerprint("sk-secret-key")
    request_id = add_request(store, experiment="exp1", user_id="u1", segment="beta", api_key_id=key, stream=True)
    assert request_id.startswith("req-")
    got = store.get_request(request_id).as_dict()
    assert got | {"created_at": None} == {
        "id": request_id, "created_at": None, "endpoint": "chat", "model": "smollm2-135m", "variant": "int4",
        "experiment": "exp1", "user_id": "u1", "segment": "beta", "api_key_id": key, "prompt_tokens": 12,
        "prompt_chars": 48, "max_tokens": 64, "stream": True, "status": "ok", "http_status": 200,
        "server_id": "test-1"}
    assert got["created_at"].tzinfo == UTC
    assert abs(datetime.now(UTC) - got["created_at"]) < timedelta(minutes=1)

    response_id = st.new_response_id("chat")
    assert response_id.startswith("chatcmpl-") and st.new_response_id("completions").startswith("cmpl-")
    store.record_response(response_id=response_id, request_id=request_id, variant="int4", output_tokens=20,
                          latency_ms=153.5, mean_logprob=-1.25, toxicity_score=0.02, finish_reason="length",
                          guardrail_action="redact", output_text="not kept", watermark_key_id="wm-00112233aabbccdd")
    got = store.get_response(response_id).as_dict()
    assert got | {"created_at": None} == {
        "id": response_id, "request_id": request_id, "created_at": None, "variant": "int4", "output_tokens": 20,
        "latency_ms": 153.5, "mean_logprob": -1.25, "toxicity_score": 0.02, "finish_reason": "length",
        "guardrail_action": "redact", "output_text": None,  # text is dropped unless the store keeps it
        "watermark_key_id": "wm-00112233aabbccdd"}

    before = store.record_guardrail(request_id=request_id, rule="max_new_tokens", action="clip", detail="512 -> 256")
    after = store.record_guardrail(request_id=request_id, response_id=response_id, rule="banned_pattern",
                                   action="redact", detail="pattern 3")
    events = [e.as_dict() for e in store.guardrail_events_for(request_id)]
    assert [(e["id"], e["rule"], e["action"], e["detail"], e["response_id"]) for e in events] == [
        (before, "max_new_tokens", "clip", "512 -> 256", None), (after, "banned_pattern", "redact", "pattern 3",
                                                                  response_id)]

    assert store.record_assignment(experiment="exp1", user_id="u1", segment="beta", variant="int4",
                                   server_id="test-1") == "int4"
    [assignment] = store.assignments_for("exp1")
    assert (assignment.user_id, assignment.segment, assignment.variant, assignment.server_id) == (
        "u1", "beta", "int4", "test-1")

    up = store.record_feedback(response_id, True, comment="great")
    score = store.record_feedback(response_id, 0.7, source="model", name="judge_helpfulness", data_type="numeric")
    rows = [(f.id, f.name, f.value, f.data_type, f.source, f.comment) for f in store.feedback_for(response_id)]
    assert rows == [(up, "user_feedback", 1.0, "boolean", "human", "great"),
                    (score, "judge_helpfulness", 0.7, "numeric", "model", None)]

    assert {t: store.count(t) for t in st.TABLES} == {"meta": 1, "requests": 1, "responses": 1,
                                                      "guardrail_events": 2, "assignments": 1, "feedback": 2}
    assert store.get_response("chatcmpl-missing") is None
    with pytest.raises(ValueError, match="unknown table"):
        store.count("users")


def test_times_come_back_as_the_same_instant_in_utc(store):
    local = datetime(2026, 11, 26, 14, 30, 5, 123456, tzinfo=timezone(timedelta(hours=2)))
    request_id = add_request(store, created_at=local)
    got = store.get_request(request_id).created_at
    assert got == local and got.tzinfo == UTC and got.hour == 12
    with pytest.raises(StatementError, match="timezone-aware"):
        add_request(store, created_at=datetime(2026, 11, 26, 12, 0))


def test_output_text_is_kept_only_when_asked(url):
    with Store(url, keep_output_text=True) as s:
        _, response_id = add_exchange(s, output_text="Paris.")
        assert s.get_response(response_id).output_text == "Paris."


def test_feedback_is_checked(store):
    _, response_id = add_exchange(store)
    with pytest.raises(LigeroError, match="unknown response id 'chatcmpl-nope'"):
        store.record_feedback("chatcmpl-nope", 1)
    for kwargs, message in [({"value": 1, "source": "robot"}, "source must be one of human, model, code"),
                            ({"value": 1, "data_type": "stars"}, "data_type must be one of"),
                            ({"value": 0.5}, "boolean feedback must be 1"),
                            ({"value": float("nan"), "data_type": "numeric"}, "finite number"),
                            ({"value": "up"}, "finite number"),
                            ({"value": 1, "name": ""}, "name must not be empty")]:
        with pytest.raises(LigeroError, match=message):
            store.record_feedback(response_id, **kwargs)
    assert store.count("feedback") == 0
    with pytest.raises(ValueError, match="status must be one of ok, blocked, error"):
        add_request(store, status="fine")


def test_first_assignment_wins_and_later_ones_insert_nothing(url):
    with Store(url) as a, Store(url) as b:
        assert a.record_assignment(experiment="e", user_id="u", variant="A", server_id="a") == "A"
        # b (e.g. after the split changed) would pick B, but the user keeps the stored variant.
        assert b.record_assignment(experiment="e", user_id="u", variant="B", server_id="b") == "A"
        assert b.record_assignment(experiment="other", user_id="u", variant="B", server_id="b") == "B"
        assert a.count("assignments") == 2 and a.stored_variant("e", "u") == "A"


def test_assignment_race_loser_reads_the_winner(url, monkeypatch):
    """Both servers read "no assignment yet", then both insert: the unique constraint rejects the second."""
    with Store(url) as a, Store(url) as b:
        real = b.stored_variant
        calls = []

        def stale_first_read(experiment, user_id):
            calls.append(user_id)
            return None if len(calls) == 1 else real(experiment, user_id)

        monkeypatch.setattr(b, "stored_variant", stale_first_read)
        assert a.record_assignment(experiment="e", user_id="u", variant="A", server_id="a") == "A"
        assert b.record_assignment(experiment="e", user_id="u", variant="B", server_id="b") == "A"
        assert len(calls) == 2  # the stale read, then the re-read after the IntegrityError
        assert [row.variant for row in a.assignments_for("e")] == ["A"]
        # An IntegrityError that is not this race (no row to re-read) is not swallowed.
        monkeypatch.setattr(b, "stored_variant", lambda experiment, user_id: None)
        with pytest.raises(IntegrityError):
            b.record_assignment(experiment="e", user_id="u", variant="B", server_id="b")


def test_two_stores_assigning_the_same_users_at_once_agree(url):
    users = [f"user-{i}" for i in range(40)]
    results: dict[str, list[str]] = {}
    start = threading.Barrier(2)

    def server(name: str, variant: str) -> None:
        with Store(url) as s:
            start.wait()
            results[name] = [s.record_assignment(experiment="e", user_id=u, variant=variant, server_id=name)
                             for u in users]

    threads = [threading.Thread(target=server, args=(n, v)) for n, v in [("a", "A"), ("b", "B")]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results["a"] == results["b"]  # whoever won each user, both servers return the winner
    with Store(url) as s:
        rows = s.assignments_for("e")
        assert sorted(r.user_id for r in rows) == sorted(users)
        assert {r.user_id: r.variant for r in rows} == dict(zip(users, results["a"]))


def test_data_survives_reopening(url):
    with Store(url) as s:
        request_id, response_id = add_exchange(s)
        s.record_feedback(response_id, 0)
    with Store(url) as s:
        assert s.get_response(response_id).request_id == request_id
        assert [f.value for f in s.feedback_for(response_id)] == [0.0]
        assert s._get(st.Meta, "schema_version").value == str(st.SCHEMA_VERSION)


def test_a_crash_after_the_commit_loses_nothing(url):
    script = (f"import os\nfrom ligero.serve.store import Store\ns = Store({url!r})\n"
              "rid = s.record_request(endpoint='completions', model='m', variant='v', prompt_tokens=1, "
              "prompt_chars=1, max_tokens=1, stream=False, status='ok', http_status=200, server_id='doomed')\n"
              "s.record_response(response_id='cmpl-crash', request_id=rid, variant='v', output_tokens=1, "
              "latency_ms=1.0, finish_reason='stop')\nos._exit(9)  # no close, no WAL checkpoint\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 9, proc.stderr
    with Store(url) as s:
        assert s.get_response("cmpl-crash").output_tokens == 1
        assert s.count("requests") == 1


def test_closing_checkpoints_the_wal_so_the_db_file_alone_is_a_backup(tmp_path):
    """Another process (here: another Store) keeps the file open, so SQLite would not checkpoint on its own."""
    import shutil
    import sqlite3

    url = f"sqlite:///{tmp_path / 'serve.db'}"
    reader = Store(url)
    assert reader.count("requests") == 0  # holds a pooled connection to the file
    writer = Store(url)
    request_id = add_request(writer)
    writer.close()
    shutil.copy(tmp_path / "serve.db", tmp_path / "backup.db")  # the .db file alone, without -wal and -shm
    copy = sqlite3.connect(tmp_path / "backup.db")
    assert copy.execute("SELECT id FROM requests").fetchall() == [(request_id,)]
    copy.close()
    reader.close()


def test_a_store_of_another_schema_version_is_refused(url):
    Store(url).close()
    engine = create_engine(st._parse_url(url))
    with engine.begin() as connection:
        connection.execute(update(st.Meta.__table__).values(value="99"))
    engine.dispose()
    with pytest.raises(LigeroError, match="schema version 99, this Ligero uses 2"):
        Store(url)


def test_bad_urls_are_user_errors(tmp_path):
    with pytest.raises(LigeroError, match="not supported; use sqlite:///"):
        Store("mysql://user@host/db")
    with pytest.raises(LigeroError, match="malformed"):
        Store("user:secret@host/db")
    with pytest.raises(LigeroError, match="does not exist; create it"):
        Store(f"sqlite:///{tmp_path / 'missing' / 'serve.db'}")
    (tmp_path / "junk.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(LigeroError, match="cannot open the store"):
        Store(f"sqlite:///{tmp_path / 'junk.db'}")
    with pytest.raises(LigeroError, match="cannot open the store") as info:
        Store("postgresql://ligero:secret@127.0.0.1:1/ligero")  # nothing listens on port 1
    assert "secret" not in str(info.value) and "postgresql+psycopg://ligero:***@" in str(info.value)


@NEEDS_POSTGRES
def test_a_wrong_postgres_password_is_a_user_error_that_does_not_echo_it():
    wrong = make_url(POSTGRES_URL).set(password="wrong-secret").render_as_string(hide_password=False)
    with pytest.raises(LigeroError, match="cannot open the store") as info:
        Store(wrong)
    assert "wrong-secret" not in str(info.value)


def test_in_memory_store_for_tests():
    with Store("sqlite://") as s:
        add_exchange(s)
        assert s.count("responses") == 1


def test_key_fingerprint_identifies_without_revealing():
    fp = st.key_fingerprint("sk-live-123")
    assert fp == st.key_fingerprint("sk-live-123") != st.key_fingerprint("sk-live-124")
    assert len(fp) == 16 and set(fp) <= set("0123456789abcdef")


def test_a_version_1_store_is_migrated_and_keeps_its_rows(url):
    with Store(url) as s:
        s.record_request(endpoint="completions", model="m", variant="fp32", prompt_tokens=3, prompt_chars=9,
                         max_tokens=4, stream=False, status="ok", http_status=200, server_id="t", request_id="req-old")
    engine = create_engine(st._parse_url(url))
    with engine.begin() as connection:  # what a store written by schema version 1 looks like
        connection.execute(text("ALTER TABLE responses DROP COLUMN watermark_key_id"))
        connection.execute(update(st.Meta.__table__).values(value="1"))
    engine.dispose()
    with Store(url) as s:
        assert s._get(st.Meta, "schema_version").value == "2"
        s.record_response(response_id="cmpl-new", request_id="req-old", variant="fp32", output_tokens=4,
                          latency_ms=1.0, finish_reason="length", watermark_key_id="wm-0123456789abcdef")
        with s._sessions() as session:
            row = session.get(st.ResponseRecord, "cmpl-new")
            assert row.watermark_key_id == "wm-0123456789abcdef"
            assert session.get(st.RequestRecord, "req-old") is not None
