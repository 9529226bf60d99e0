"""`monitor` end to end on a temporary SQLite store filled with synthetic traffic, plus its input checks."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
import sqlalchemy as sa

from ligero.errors import LigeroError
from ligero.serve.monitor import (
    load_traffic,
    monitor,
    parse_since,
    parse_time,
    summary_line,
)

DRIFT_TESTS = [  # as in ligero.card.build.DRIFT_TESTS
    {"statistic": "psi", "warn": 0.1, "alert": 0.25},
    {"statistic": "jensen_shannon", "warn": 0.05, "alert": 0.1},
    {"statistic": "ks_p_value", "warn": 0.05, "alert": 0.001},
]
NOW = datetime.now(UTC)


def _metadata() -> sa.MetaData:
    """The serving store's tables (minimal compatible schema: the names `ligero monitor` reads)."""
    md = sa.MetaData()
    ts = sa.DateTime(timezone=True)
    sa.Table("requests", md, sa.Column("id", sa.Integer, primary_key=True), sa.Column("created_at", ts),
             sa.Column("endpoint", sa.String), sa.Column("model", sa.String), sa.Column("variant", sa.String),
             sa.Column("experiment", sa.String), sa.Column("user_id", sa.String), sa.Column("segment", sa.String),
             sa.Column("api_key_id", sa.String), sa.Column("prompt_tokens", sa.Integer),
             sa.Column("prompt_chars", sa.Integer), sa.Column("max_tokens", sa.Integer),
             sa.Column("stream", sa.Boolean), sa.Column("status", sa.String), sa.Column("http_status", sa.Integer),
             sa.Column("server_id", sa.String))
    sa.Table("responses", md, sa.Column("id", sa.Integer, primary_key=True), sa.Column("request_id", sa.Integer),
             sa.Column("created_at", ts), sa.Column("variant", sa.String), sa.Column("output_tokens", sa.Integer),
             sa.Column("latency_ms", sa.Float), sa.Column("mean_logprob", sa.Float),
             sa.Column("toxicity_score", sa.Float), sa.Column("finish_reason", sa.String),
             sa.Column("guardrail_action", sa.String))
    sa.Table("feedback", md, sa.Column("id", sa.Integer, primary_key=True), sa.Column("created_at", ts),
             sa.Column("response_id", sa.Integer), sa.Column("name", sa.String), sa.Column("value", sa.Float),
             sa.Column("data_type", sa.String), sa.Column("source", sa.String), sa.Column("comment", sa.String))
    sa.Table("assignments", md, sa.Column("id", sa.Integer, primary_key=True), sa.Column("created_at", ts),
             sa.Column("experiment", sa.String), sa.Column("user_id", sa.String), sa.Column("segment", sa.String),
             sa.Column("variant", sa.String), sa.Column("server_id", sa.String))
    # text timestamps with a 'Z', as another writer might store them
    sa.Table("guardrail_events", md, sa.Column("id", sa.Integer, primary_key=True), sa.Column("created_at", sa.String),
             sa.Column("request_id", sa.Integer), sa.Column("response_id", sa.Integer), sa.Column("rule", sa.String),
             sa.Column("action", sa.String), sa.Column("detail", sa.String))
    return md


def _draw(rng, n):
    return {"output_length": rng.integers(5, 33, n), "mean_logprob": rng.normal(-2, 0.4, n),
            "toxicity_score": rng.beta(1, 40, n), "prompt_length": rng.integers(8, 40, n),
            "latency_ms": rng.lognormal(np.log(800), 0.3, n)}


def _reference(seed=0, n=400):
    draws = _draw(np.random.default_rng(seed), n)
    return {k: {"values": [float(x) for x in v], "mean": float(np.mean(v)), "p50": float(np.median(v)),
                "p95": float(np.quantile(v, 0.95))} for k, v in draws.items()}


def write_card(tmp_path, reference, variant="int4", **extra):
    """The fields of a real card that monitor reads (no schema_version, so no schema check)."""
    card = {"identity": {"variant": variant, "name": f"smollm2-135m-{variant}"},
            "monitoring": {"reference_profile": {"n": len(reference["latency_ms"]["values"]), **reference},
                           "drift_tests": DRIFT_TESTS}, **extra}
    path = tmp_path / f"{variant}.json"
    path.write_text(json.dumps(card))
    return path


def _like_reference(rng, reference, n):
    """Traffic drawn from the reference profile itself (each signal resampled)."""
    return {k: rng.choice(np.asarray(reference[k]["values"]), n) for k in reference}


def _shifted(rng, reference, n):
    draws = _like_reference(rng, reference, n)
    draws["prompt_length"] = draws["prompt_length"] + 60  # much longer prompts
    draws["toxicity_score"] = rng.beta(8, 2, n)  # toxic outputs
    return draws


def make_store(path, batches, split=(100, 100), feedback_rate=(0.7, 0.7), seed=1, stars=None):
    """SQLite store: `batches` = [(variant, draws, created_at)], two-arm assignments and thumbs feedback.

    `stars` = (fp32 mean, int4 mean) adds numeric "stars" feedback, 1-5, on every response, each first sent as 1
    and changed a minute later (so only the latest score may count).
    """
    rng = np.random.default_rng(seed)
    engine = sa.create_engine(f"sqlite:///{path}")
    md = _metadata()
    md.create_all(engine)
    t = md.tables
    users = [f"u{i}" for i in range(sum(split))]
    arm = {u: ("fp32" if i < split[0] else "int4") for i, u in enumerate(users)}
    req, resp, fb = [], [], []
    for variant, draws, when in batches:
        pool = [u for u in users if arm[u] == variant] or users
        for i in range(len(draws["latency_ms"])):
            rid = len(req) + 1
            user = pool[i % len(pool)]
            req.append({"id": rid, "created_at": when, "endpoint": "/v1/completions", "model": "smollm2-135m",
                        "variant": variant, "experiment": "exp1", "user_id": user,
                        "segment": "code" if i % 2 else "chat", "prompt_tokens": int(draws["prompt_length"][i]),
                        "status": "ok", "http_status": 200})
            resp.append({"id": rid, "request_id": rid, "created_at": when, "variant": variant,
                         "output_tokens": int(draws["output_length"][i]), "latency_ms": float(draws["latency_ms"][i]),
                         "mean_logprob": float(draws["mean_logprob"][i]),
                         "toxicity_score": float(draws["toxicity_score"][i]), "finish_reason": "length"})
            rate = feedback_rate[0] if variant == "fp32" else feedback_rate[1]
            fb.append({"created_at": when, "response_id": rid, "name": "thumbs",
                       "value": float(rng.random() < rate), "data_type": "boolean", "source": "human"})
            if stars:
                score = np.clip(np.round(rng.normal(stars[0] if variant == "fp32" else stars[1], 1.0)), 1, 5)
                fb += [{"created_at": when - timedelta(minutes=1), "response_id": rid, "name": "stars", "value": 1.0,
                        "data_type": "numeric", "source": "human"},
                       {"created_at": when, "response_id": rid, "name": "stars", "value": float(score),
                        "data_type": "numeric", "source": "human"}]
    assignments = [{"created_at": NOW, "experiment": "exp1", "user_id": u, "variant": arm[u]} for u in users]
    with engine.begin() as conn:
        for table, rows in (("requests", req), ("responses", resp), ("feedback", fb), ("assignments", assignments)):
            if rows:
                conn.execute(t[table].insert(), rows)
        conn.execute(t["guardrail_events"].insert(), [
            {"created_at": (NOW - timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ"), "request_id": 1,
             "rule": "toxicity", "action": "block"},
            {"created_at": (NOW - timedelta(days=3)).strftime("%Y-%m-%dT%H:%M:%SZ"), "request_id": 2,
             "rule": "toxicity", "action": "block"}])
    engine.dispose()
    return f"sqlite:///{path}"


def test_traffic_like_the_reference_is_ok(tmp_path):
    reference = _reference()
    rng = np.random.default_rng(2)
    url = make_store(tmp_path / "store.db", [
        ("int4", _like_reference(rng, reference, 300), NOW - timedelta(hours=1)),
        ("fp32", _like_reference(rng, reference, 300), NOW - timedelta(hours=1)),
        ("int4", _shifted(rng, reference, 300), NOW - timedelta(days=3)),  # old trouble, outside --since 24h
    ])
    card = write_card(tmp_path, reference)
    out = tmp_path / "out"
    result = monitor(url, card, since="24h", out_dir=out)
    assert result["exit_code"] == 0 and result["status"] == "OK", result["notes"]
    assert result["n_responses"] == 300
    assert all(r["status"] == "OK" for r in result["drift"]["signals"].values())
    assert result["guardrails"] == [{"rule": "toxicity", "action": "block", "n": 1}]
    ab = result["ab"]
    assert ab["metrics"]["thumbs"]["control"] == "fp32"  # inferred: the only other variant with feedback
    assert not ab["srm"]["exp1"]["flagged"]
    diff = ab["metrics"]["thumbs"]["difference"]
    assert diff["always_valid"]["low"] < diff["fixed"]["low"] < diff["fixed"]["high"] < diff["always_valid"]["high"]
    saved = json.loads((out / "monitor.json").read_text())
    assert saved["status"] == "OK" and saved["exit_code"] == 0
    page = (out / "monitor.html").read_text()
    assert page.count("data:image/png;base64,") == 5 and "Sample-ratio mismatch" in page

    everything = monitor(url, card, since=None, out_dir=out)  # the old shifted traffic is back in
    assert everything["n_responses"] == 600 and everything["exit_code"] == 2


def test_shifted_traffic_alerts(tmp_path):
    reference = _reference()
    rng = np.random.default_rng(3)
    url = make_store(tmp_path / "store.db", [("int4", _shifted(rng, reference, 300), NOW - timedelta(minutes=10)),
                                             ("fp32", _like_reference(rng, reference, 300), NOW)])
    result = monitor(url, write_card(tmp_path, reference), since="1h", out_dir=tmp_path / "out")
    assert result["status"] == "ALERT" and result["exit_code"] == 2
    signals = result["drift"]["signals"]
    assert signals["prompt_length"]["status"] == signals["toxicity_score"]["status"] == "ALERT"
    assert signals["prompt_length"]["mean_production"] > signals["prompt_length"]["mean_reference"] + 50


def test_sample_ratio_mismatch_alerts(tmp_path):
    reference = _reference()
    rng = np.random.default_rng(4)
    url = make_store(tmp_path / "store.db", [("int4", _like_reference(rng, reference, 300), NOW),
                                             ("fp32", _like_reference(rng, reference, 300), NOW)], split=(1200, 800))
    plan = {"control": "fp32", "treatment": "int4", "split": [50, 50], "sample_size_per_arm": 1000}
    result = monitor(url, write_card(tmp_path, reference, ab_test_plan=plan), out_dir=tmp_path / "out")
    assert result["drift"]["status"] == "OK"
    assert result["ab"]["srm"]["exp1"]["flagged"] and result["exit_code"] == 2
    assert any("sample-ratio mismatch" in n for n in result["notes"])


def test_too_little_traffic_is_insufficient_not_alert(tmp_path):
    reference = _reference()
    rng = np.random.default_rng(5)
    url = make_store(tmp_path / "store.db", [("int4", _shifted(rng, reference, 10), NOW)])
    traffic = load_traffic(url, None, "int4")
    assert traffic["n_responses"] == 10 and len(traffic["signals"]["prompt_length"]) == 10
    result = monitor(url, write_card(tmp_path, reference), out_dir=tmp_path / "out")
    assert result["drift"]["status"] == result["status"] == "INSUFFICIENT" and result["exit_code"] == 0


def test_store_and_card_errors(tmp_path):
    reference = _reference(n=50)
    card = write_card(tmp_path, reference)
    with pytest.raises(LigeroError, match="does not exist"):
        monitor(f"sqlite:///{tmp_path / 'missing.db'}", card, out_dir=tmp_path / "out")
    assert not (tmp_path / "missing.db").exists()  # not silently created
    with pytest.raises(LigeroError, match="not a database URL"):
        load_traffic("not a url")
    other = tmp_path / "other.db"
    engine = sa.create_engine(f"sqlite:///{other}")
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE requests (id INTEGER PRIMARY KEY)"))
    engine.dispose()
    with pytest.raises(LigeroError, match="has no responses, feedback, assignments"):
        load_traffic(f"sqlite:///{other}")
    url = make_store(tmp_path / "store.db", [])
    with pytest.raises(LigeroError, match="lacks monitoring.drift_tests"):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"identity": {"variant": "int4"}, "monitoring": {"reference_profile": reference}}))
        monitor(url, bad, out_dir=tmp_path / "out")
    with pytest.raises(LigeroError, match="invalid"):
        full = tmp_path / "full.json"
        full.write_text(json.dumps({"schema_version": "1.0", "identity": {"variant": "int4"},
                                    "monitoring": {"reference_profile": reference, "drift_tests": DRIFT_TESTS}}))
        monitor(url, full, out_dir=tmp_path / "out")


def test_parse_since_and_times():
    now = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
    assert parse_since("24h", now) == now - timedelta(hours=24)
    assert parse_since("30m", now) == now - timedelta(minutes=30)
    assert parse_since("7d", now) == now - timedelta(days=7)
    assert parse_since("2026-11-26T10:00:00Z") == datetime(2026, 11, 26, 10, tzinfo=UTC)
    assert parse_since("2026-11-26T11:00:00+01:00") == datetime(2026, 11, 26, 10, tzinfo=UTC)
    for bad in ("yesterday", "", "24 parsecs"):
        with pytest.raises(LigeroError, match="--since"):
            parse_since(bad, now)
    assert parse_time("2026-11-26 10:00:00.123456") == datetime(2026, 11, 26, 10, 0, 0, 123456, tzinfo=UTC)
    assert parse_time(datetime(2026, 11, 26, 10)) == datetime(2026, 11, 26, 10, tzinfo=UTC)
    assert parse_time("garbage") is None and parse_time(None) is None


def test_cli_exit_codes_follow_the_status(tmp_path, capsys):
    from ligero.cli import main

    reference = _reference()
    rng = np.random.default_rng(3)
    url = make_store(tmp_path / "store.db", [("int4", _shifted(rng, reference, 300), NOW - timedelta(minutes=10))])
    card = str(write_card(tmp_path, reference))
    assert main(["monitor", "--store", url, "--card", card, "--since", "1h", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().out.startswith("ALERT (exit 2)")
    assert main(["monitor", "--store", f"sqlite:///{tmp_path}/missing.db", "--card", card]) == 2
    assert "ligero: error:" in capsys.readouterr().err


def _numeric_store(tmp_path, stars):
    reference = _reference()
    rng = np.random.default_rng(2)  # the traffic of test_traffic_like_the_reference_is_ok: drift OK
    url = make_store(tmp_path / "store.db", [("int4", _like_reference(rng, reference, 300), NOW - timedelta(hours=1)),
                                             ("fp32", _like_reference(rng, reference, 300), NOW - timedelta(hours=1))],
                     stars=stars)
    return url, write_card(tmp_path, reference)


def test_numeric_feedback_equal_arms_ok(tmp_path):
    url, card = _numeric_store(tmp_path, stars=(3.6, 3.6))
    out = tmp_path / "out"
    result = monitor(url, card, since="24h", out_dir=out)
    assert result["drift"]["status"] == "OK" and result["status"] == "OK" and result["exit_code"] == 0
    saved = json.loads((out / "monitor.json").read_text())
    numeric = saved["ab"]["numeric"]
    stars = numeric["metrics"]["stars"]
    assert numeric["n_scores"] == 600 and saved["ab"]["n_numeric"] == 600  # the changed scores count once
    assert stars["variants"]["fp32"]["n"] == stars["variants"]["int4"]["n"] == 300
    assert 3.3 < stars["variants"]["int4"]["mean"] < 3.9  # the first score (1) was replaced by the latest
    row = stars["variants"]["int4"]
    assert row["low"] < row["mean"] < row["high"] and row["sd"] > 0.5
    diff = stars["difference"]
    assert diff["always_valid"]["low"] < diff["fixed"]["low"] < 0 < diff["fixed"]["high"] < diff["always_valid"]["high"]
    assert stars["status"] == "OK" and {e["segment"] for e in stars["segment_effects"]} == {"chat", "code"}
    assert all(0 <= e["q_value"] <= 1 for e in stars["segment_effects"])
    assert list(saved["ab"]["metrics"]) == ["thumbs"]  # numeric scores are not turned into a rate
    page = (out / "monitor.html").read_text()
    assert "Numeric feedback: mean score" in page and "<td>stars</td>" in page and "always-valid low" in page


def test_numeric_feedback_worse_treatment_warns(tmp_path):
    url, card = _numeric_store(tmp_path, stars=(3.8, 3.0))
    result = monitor(url, card, since="24h", out_dir=tmp_path / "out")
    stars = result["ab"]["numeric"]["metrics"]["stars"]
    assert result["drift"]["status"] == "OK" and result["ab"]["metrics"]["thumbs"]["status"] == "OK"
    assert stars["status"] == "WARN" and stars["difference"]["always_valid"]["high"] < 0
    assert result["ab"]["status"] == result["status"] == "WARN" and result["exit_code"] == 1
    line = summary_line(result)
    assert line.startswith("WARN (exit 1)") and "mean stars lower in the treatment" in line
    assert "class='WARN'>WARN" in (tmp_path / "out" / "monitor.html").read_text()


def test_a_huge_since_is_a_user_error(tmp_path, capsys):
    from ligero.cli import main

    for text in ("99999999999d", "999999999w", "1" + "0" * 30 + "s"):
        with pytest.raises(LigeroError, match="--since"):
            parse_since(text)
    url = make_store(tmp_path / "store.db", [])
    card = str(write_card(tmp_path, _reference(n=50)))
    assert main(["monitor", "--store", url, "--card", card, "--since", "99999999999d",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ligero: error: --since") and "Traceback" not in err


def test_nothing_to_judge_has_its_own_exit_code_and_says_why(tmp_path, capsys):
    from ligero.cli import main

    reference = _reference()
    card = write_card(tmp_path, reference)
    empty = make_store(tmp_path / "empty.db", [])
    result = monitor(empty, card, out_dir=tmp_path / "a")
    assert (result["status"], result["exit_code"]) == ("NO_DATA", 3) and "no responses at all" in result["why"]

    rng = np.random.default_rng(6)
    url = make_store(tmp_path / "store.db", [("fp32", _like_reference(rng, reference, 40), NOW)])
    result = monitor(url, card, out_dir=tmp_path / "b")  # traffic, but none from the card's variant
    assert result["exit_code"] == 3 and "no responses from variant int4" in result["why"]
    assert "fp32 (40)" in result["why"]
    saved = json.loads((tmp_path / "b" / "monitor.json").read_text())
    assert saved["status"] == "NO_DATA" and saved["exit_codes"]["3"].startswith("NO_DATA")
    assert "class='NO_DATA'>NO_DATA" in (tmp_path / "b" / "monitor.html").read_text()

    future = (NOW + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert main(["monitor", "--store", url, "--card", str(card), "--since", future, "--out", str(tmp_path / "c")]) == 3
    out = capsys.readouterr().out
    assert out.startswith("NO_DATA (exit 3)") and "in the future" in out

    # Some traffic, too little to judge: still INSUFFICIENT and 0, as before.
    url = make_store(tmp_path / "few.db", [("int4", _like_reference(rng, reference, 10), NOW)])
    assert monitor(url, card, out_dir=tmp_path / "d")["exit_code"] == 0


def test_the_report_escapes_what_it_shows_and_has_no_absolute_paths(tmp_path):
    reference = _reference()
    rng = np.random.default_rng(7)
    url = make_store(tmp_path / "store.db", [("int4", _like_reference(rng, reference, 40), NOW)])
    card = write_card(tmp_path, reference)
    data = json.loads(card.read_text())
    data["identity"]["variant"] = "<script>alert(1)</script>"
    card.write_text(json.dumps(data))
    out = tmp_path / "reports" / "today"
    result = monitor(url, card, out_dir=out)
    page = (out / "monitor.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    saved = (out / "monitor.json").read_text()
    assert str(tmp_path) not in saved
    assert result["card"] == "../../int4.json" and result["store"] == "sqlite:///../../store.db"
    assert result["files"] == {"json": "monitor.json", "html": "monitor.html"}
    assert (out / result["card"]).resolve() == card.resolve()
