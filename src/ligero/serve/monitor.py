"""`ligero monitor`: production traffic from the serving store against a deployment card, for people and for cron.

Drift compares the card variant's responses in the time window (`since`) with the card's reference profile
(`ligero.serve.drift`). The A/B analysis (`ligero.serve.abstats`) uses *all* feedback and assignments in the store:
the always-valid interval is a sequence over the whole experiment, and cutting it to a window would throw away the
evidence it accumulates. Results go to monitor.json and a self-contained monitor.html.

Exit codes (for cron): 0 OK (also when there is traffic, but too little to judge yet: INSUFFICIENT), 1 WARN,
2 ALERT, 3 NO_DATA: nothing to judge, because the card's variant has no responses in the window (an empty or wrong
store, a card for a variant that is not served, a --since in the future); a misconfigured monitor must not look
healthy. ALERT shares exit code 2 with the CLI's user errors (`LigeroError`); cron wrappers that must tell them apart
read monitor.json (`status`), which only a completed run writes, or stderr, where errors print one line.

The store is read with SQLAlchemy Core and plain SQL on the serving store's table names (from `ligero.serve.store`)
and column names (see REQUIRED), without its ORM classes, so monitoring works against any copy of the database.
Timestamps are filtered in Python after parsing (SQLite keeps them as text in more than one format); other databases
also filter in SQL. Paths written into monitor.json are relative to the output folder, so the report can be moved.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

from ligero.card import card_errors, read_card
from ligero.errors import LigeroError
from ligero.serve.abstats import analyze_feedback, srm
from ligero.serve.drift import compare_profile, worst
from ligero.serve.monitor_page import render_html
from ligero.serve.store import Assignment, Feedback, GuardrailEvent, RequestRecord, ResponseRecord

REQUESTS, RESPONSES = RequestRecord.__tablename__, ResponseRecord.__tablename__
FEEDBACK, ASSIGNMENTS, GUARDRAIL_EVENTS = Feedback.__tablename__, Assignment.__tablename__, GuardrailEvent.__tablename__
REQUIRED = {
    REQUESTS: {"id", "created_at", "variant", "experiment", "user_id", "segment", "prompt_tokens"},
    RESPONSES: {"id", "request_id", "created_at", "variant", "output_tokens", "latency_ms", "mean_logprob",
                "toxicity_score"},
    FEEDBACK: {"id", "created_at", "response_id", "name", "value", "data_type"},
    ASSIGNMENTS: {"experiment", "user_id", "variant"},
}
OPTIONAL = {GUARDRAIL_EVENTS: {"created_at", "rule", "action"}}
EXIT_CODES = {"OK": 0, "INSUFFICIENT": 0, "WARN": 1, "ALERT": 2, "NO_DATA": 3}
EXIT_MEANINGS = {"0": "OK, or INSUFFICIENT (traffic, but too little to judge yet)", "1": "WARN",
                 "2": "ALERT (also the exit code of user errors, which write no monitor.json)",
                 "3": "NO_DATA: nothing to judge (no responses from the card's variant in the window)"}
DEFAULT_PLANNED_N = 1000  # tunes the always-valid interval when the card has no ab_test_plan.sample_size_per_arm
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_time(value: Any) -> datetime | None:
    """A stored timestamp as an aware UTC datetime: datetime, ISO text (with or without offset, 'Z' or ' '), or
    epoch seconds; naive values are taken as UTC. None when unparseable."""
    if value is None:
        return None
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(float(value), UTC)
        except (OverflowError, OSError, ValueError):
            return None
    else:
        text = str(value).strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            dt = datetime.fromisoformat(text)
        except ValueError:
            return None
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """`--since`: a duration back from now ('30m', '24h', '7d', '90s', '2w') or an ISO time ('2026-11-26T10:00:00Z')."""
    now = now or datetime.now(UTC)
    match = _DURATION.match(str(text))
    if match:
        try:
            return now - timedelta(**{_UNITS[match.group(2).lower()]: float(match.group(1))})
        except OverflowError:  # beyond timedelta's range, or before the year 1
            raise LigeroError(f"--since {text!r} reaches back further than dates go; give a shorter duration (e.g. "
                              "365d) or leave --since out for all traffic") from None
    dt = parse_time(str(text)) if str(text).strip() else None
    if dt is None:
        raise LigeroError(f"--since {text!r} is neither a duration (30m, 24h, 7d) nor an ISO time "
                          "(2026-11-26T10:00:00Z)")
    return dt


def _safe_url(url: Any) -> str:
    try:
        return url.render_as_string(hide_password=True)
    except AttributeError:
        return str(url)


def _engine(url: str):
    """An engine for the store, refusing a SQLite path that does not exist (SQLite would create an empty file)."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise LigeroError(f"--store {url!r} is not a database URL; use e.g. sqlite:///ligero-serve.db or "
                          "postgresql://user@host/db") from None
    if parsed.get_backend_name() == "sqlite":
        db = parsed.database
        if not db or db == ":memory:":
            raise LigeroError("an in-memory SQLite store is always empty; pass the file the server writes, "
                              "e.g. --store sqlite:///ligero-serve.db")
        if not db.startswith("file:") and not Path(db).is_file():
            raise LigeroError(f"store {db} does not exist; pass the database `ligero serve` writes, "
                              "e.g. --store sqlite:///ligero-serve.db")
    try:
        return create_engine(parsed)
    except (NoSuchModuleError, ImportError) as exc:
        raise LigeroError(f"cannot open store {_safe_url(parsed)} ({exc}); install its database driver") from None


def _check_schema(conn, safe: str) -> set[str]:
    insp = inspect(conn)
    tables = set(insp.get_table_names())
    missing = [t for t in REQUIRED if t not in tables]
    if missing:
        raise LigeroError(f"store {safe} has no {', '.join(missing)} table(s); point --store at the database "
                          "that `ligero serve` writes (it creates them on start)")
    for table, cols in {**REQUIRED, **{t: c for t, c in OPTIONAL.items() if t in tables}}.items():
        have = {c["name"] for c in insp.get_columns(table)}
        lacking = sorted(cols - have)
        if lacking:
            raise LigeroError(f"store {safe}: table {table} lacks column(s) {', '.join(lacking)}; the store was "
                              "written by an incompatible version, upgrade it with `ligero serve`")
    return tables


def _rows(conn, sql: str, since: datetime | None, column: str) -> list[dict]:
    params = {}
    if since is not None and conn.dialect.name != "sqlite":  # typed timestamps: let the database filter too
        sql += f" WHERE {column} >= :since"
        params["since"] = since
    return [dict(r._mapping) for r in conn.execute(text(sql), params)]


def _in_window(rows: list[dict], since: datetime | None, counter: Counter) -> list[dict]:
    out = []
    for row in rows:
        row["created_at"] = parse_time(row.get("created_at"))
        if row["created_at"] is None:
            counter["unparsed_timestamps"] += 1
            if since is not None:
                continue
        elif since is not None and row["created_at"] < since:
            continue
        out.append(row)
    return out


def _float(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def load_traffic(url: str, since: datetime | str | None = None, variant: str | None = None) -> dict:
    """Production values per signal for the variant's responses since `since`, all feedback, assignment counts.

    signals: output_length (responses.output_tokens), mean_logprob, toxicity_score, latency_ms (responses) and
    prompt_length (requests.prompt_tokens, joined on responses.request_id). A response's variant is its own,
    else its request's. Feedback is joined to its response and request for variant, segment and user.
    """
    if isinstance(since, str):
        since = parse_since(since)
    elif since is not None:
        since = parse_time(since)
    engine = _engine(url)
    safe = _safe_url(engine.url)
    counter: Counter = Counter()
    try:
        with engine.connect() as conn:
            tables = _check_schema(conn, safe)
            responses = _rows(conn, "SELECT r.created_at AS created_at, COALESCE(r.variant, q.variant) AS variant, "
                                    "r.output_tokens, r.latency_ms, r.mean_logprob, r.toxicity_score, "
                                    f"q.prompt_tokens, q.segment FROM {RESPONSES} r "
                                    f"LEFT JOIN {REQUESTS} q ON q.id = r.request_id", since, "r.created_at")
            feedback = _rows(conn, "SELECT f.id, f.created_at, f.response_id, f.name, f.value, f.data_type, "
                                   "COALESCE(r.variant, q.variant) AS variant, q.segment, q.user_id, q.experiment "
                                   f"FROM {FEEDBACK} f LEFT JOIN {RESPONSES} r ON r.id = f.response_id "
                                   f"LEFT JOIN {REQUESTS} q ON q.id = r.request_id", None, "f.created_at")
            assignments = [dict(r._mapping) for r in conn.execute(text(
                "SELECT experiment, variant, COUNT(DISTINCT user_id) AS users, COUNT(*) AS n_rows "
                f"FROM {ASSIGNMENTS} GROUP BY experiment, variant"))]
            guardrails = (_rows(conn, f"SELECT created_at, rule, action FROM {GUARDRAIL_EVENTS}", since,
                                "created_at") if GUARDRAIL_EVENTS in tables else [])
    except SQLAlchemyError as exc:
        first = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        raise LigeroError(f"cannot read store {safe} ({first}); check the URL and that the database is reachable"
                          ) from None
    finally:
        engine.dispose()

    responses = _in_window(responses, since, counter)
    variants = Counter(r["variant"] or "(unknown)" for r in responses)
    mine = [r for r in responses if variant is None or r["variant"] == variant]
    columns = {"output_length": "output_tokens", "mean_logprob": "mean_logprob", "toxicity_score": "toxicity_score",
               "prompt_length": "prompt_tokens", "latency_ms": "latency_ms"}
    signals = {s: [v for v in (_float(r[c]) for r in mine) if v is not None] for s, c in columns.items()}
    feedback = _in_window(feedback, None, counter)
    guardrails = _in_window(guardrails, since, counter)
    by_exp: dict[str, dict[str, int]] = defaultdict(dict)
    for row in assignments:
        units = int(row["users"] or 0) or int(row["n_rows"] or 0)  # anonymous assignments: count rows
        by_exp[row["experiment"] or "(none)"][row["variant"] or "(unknown)"] = units
    stamps = [r["created_at"] for r in mine if r["created_at"] is not None]
    return {
        "signals": signals, "n_responses": len(mine), "variants": dict(variants), "variant": variant,
        "feedback": feedback, "assignments": {k: dict(v) for k, v in by_exp.items()},
        "guardrails": [{"rule": r, "action": a, "n": n}
                       for (r, a), n in sorted(Counter((g["rule"], g["action"]) for g in guardrails).items(),
                                               key=lambda kv: (-kv[1], str(kv[0])))],
        "window": {"since": since.isoformat() if since else None,
                   "first": min(stamps).isoformat() if stamps else None,
                   "last": max(stamps).isoformat() if stamps else None},
        "unparsed_timestamps": counter["unparsed_timestamps"], "store": safe,
    }


def load_monitor_card(path: str | Path) -> dict:
    """The card, schema-checked when it declares `schema_version` (a full card); otherwise only the fields monitor
    reads must be there (identity.variant, monitoring.reference_profile, monitoring.drift_tests), so hand-written
    or trimmed profiles work too."""
    card = read_card(path)
    if not isinstance(card, dict):
        raise LigeroError(f"card {path} is not a JSON object; give a cards/<variant>.json file")
    if "schema_version" in card:
        errors = card_errors(card)
        if errors:
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise LigeroError(f"card {path} is invalid: {errors[0]}{more}; check it with `ligero card validate`")
    variant = (card.get("identity") or {}).get("variant")
    mon = card.get("monitoring") or {}
    for what, ok in (("identity.variant", isinstance(variant, str) and variant),
                     ("monitoring.reference_profile", isinstance(mon.get("reference_profile"), dict)),
                     ("monitoring.drift_tests", isinstance(mon.get("drift_tests"), list) and mon.get("drift_tests"))):
        if not ok:
            raise LigeroError(f"card {path} lacks {what}; regenerate it with `ligero audit`")
    return card


def _ab_plan(card: dict, traffic: dict, planned_split: Mapping[str, float] | None) -> tuple:
    plan = card.get("ab_test_plan") or {}
    notes = []
    control, treatment = plan.get("control"), plan.get("treatment") or card["identity"]["variant"]
    if control == treatment:
        notes.append(f"the card's A/B plan compares {control} with itself; no difference is computed")
        control = None
    elif not control:
        others = sorted({r.get("variant") for r in traffic["feedback"] if r.get("variant")} - {treatment})
        if len(others) == 1:
            control = others[0]
            notes.append(f"no A/B plan in the card: control taken to be {control}, the only other variant with "
                         "feedback")
        elif others:
            notes.append(f"no A/B plan in the card and several other variants ({', '.join(others)}): no difference "
                         "is computed")
    if planned_split is None and control and isinstance(plan.get("split"), list) and len(plan["split"]) == 2:
        planned_split = {control: float(plan["split"][0]), treatment: float(plan["split"][1])}
    planned_n = int(plan.get("sample_size_per_arm") or DEFAULT_PLANNED_N)
    return control, treatment, (dict(planned_split) if planned_split else None), planned_n, notes


def _srm_all(assignments: dict, planned: dict | None, notes: list) -> dict:
    out = {}
    for exp, observed in sorted(assignments.items()):
        if planned and set(planned) & set(observed):
            weights = planned
        else:
            weights = {v: 1.0 for v in observed}
            if len(observed) > 1:
                notes.append(f"experiment {exp}: no planned split for its variants; tested against an equal split")
        if len([w for w in weights.values() if w > 0]) < 2:
            continue
        out[exp] = srm(observed, weights)
        if out[exp]["unplanned"]:
            notes.append(f"experiment {exp}: variants outside the planned split got units: {out[exp]['unplanned']}")
    return out


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, datetime):
        return x.isoformat()
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, Path):
        return str(x)
    return x


def _ab_analysis(card: dict, traffic: dict, planned_split: Mapping[str, float] | None, alpha: float,
                 notes: list[str]) -> dict:
    """Feedback rates and scores, the treatment - control differences and SRM, with the A/B status."""
    control, treatment, planned, planned_n, plan_notes = _ab_plan(card, traffic, planned_split)
    notes += plan_notes
    ab = analyze_feedback(traffic["feedback"], control, treatment, alpha=alpha, planned_n_per_arm=planned_n)
    ab["srm"] = _srm_all(traffic["assignments"], planned, notes)
    ab["planned_split"] = planned
    ab_statuses = [m["status"] for m in ab["metrics"].values()]
    ab_statuses += [m["status"] for m in ab["numeric"]["metrics"].values()]  # a worse mean score warns as a rate does
    ab_statuses += ["ALERT" if s["flagged"] else "OK" for s in ab["srm"].values()]
    for exp, s in ab["srm"].items():
        if s["flagged"]:
            notes.append(f"sample-ratio mismatch in experiment {exp} (p = {s['p_value']:.2g}): fix assignment or "
                         "logging before reading any A/B result")
    ab["status"] = worst(ab_statuses) if ab_statuses else "INSUFFICIENT"
    return ab


def _nothing_to_judge(traffic: dict, variant: str, since: datetime | None, now: datetime) -> str:
    """Why the card's variant has no responses in the window, for the report and the terminal."""
    if since is not None and since > now:
        return f"--since {since.isoformat()} is in the future, so the window holds no traffic; give a past time"
    if not traffic["variants"]:
        where = "in the window" if since is not None else "at all"
        return (f"the store has no responses {where}; check that --store is the database `ligero serve` writes "
                "and that the server receives traffic")
    seen = ", ".join(f"{k} ({v})" for k, v in traffic["variants"].items())
    return (f"no responses from variant {variant} in the window (variants seen: {seen}); check that --card is the "
            "card of a variant this store's server serves")


def _relative(path: str | Path, folder: Path) -> str:
    """`path` relative to `folder` (no machine-specific absolute paths in the report); as given where impossible."""
    try:
        return os.path.relpath(Path(path).resolve(), folder.resolve())
    except ValueError:  # another drive (Windows)
        return str(path)


def _relative_store(url: str, folder: Path) -> str:
    """A SQLite store's file relative to `folder`; other URLs unchanged (the password already hidden)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and not parsed.database.startswith("file:"):
        return f"sqlite:///{_relative(parsed.database, folder)}"
    return url


def monitor(store_url: str, card_path: str | Path, since: datetime | str | None = None,
            out_dir: Path = Path("ligero-out/monitor"), planned_split: Mapping[str, float] | None = None,
            alpha: float = 0.05) -> dict:
    """Drift + A/B + SRM for the card's variant; writes monitor.json and monitor.html and returns the result.

    result["exit_code"] is 0 (OK or INSUFFICIENT), 1 (WARN), 2 (ALERT) or 3 (NO_DATA). Status rules: drift per the
    card's thresholds (worst signal); a sample-ratio mismatch (p < 0.001) is an ALERT, because every A/B number is
    then suspect; a treatment whose always-valid interval for the positive-feedback rate, or for the mean of a
    numeric score (higher is better), lies below 0 is a WARN; no response at all from the card's variant in the
    window, with nothing else to warn about, is NO_DATA (result["why"] says why).
    """
    card = load_monitor_card(card_path)
    now = datetime.now(UTC)
    if isinstance(since, str):
        since = parse_since(since, now)
    variant = card["identity"]["variant"]
    mon = card["monitoring"]
    traffic = load_traffic(store_url, since, variant)
    notes: list[str] = []
    drift = compare_profile(mon["reference_profile"], traffic["signals"], mon["drift_tests"])
    why = _nothing_to_judge(traffic, variant, since, now) if traffic["n_responses"] == 0 else None
    if why:
        notes.append(why)
    if traffic["unparsed_timestamps"]:
        notes.append(f"{traffic['unparsed_timestamps']} stored timestamps could not be parsed"
                     + (" and were left out of the window" if since else ""))
    ab = _ab_analysis(card, traffic, planned_split, alpha, notes)
    status = worst([drift["status"], ab["status"]])
    if status == "OK" and drift["status"] == "INSUFFICIENT":  # nothing wrong, but the main question is unanswered
        status = "INSUFFICIENT"
    if why and status in ("OK", "INSUFFICIENT"):
        status = "NO_DATA"
    for name, row in drift["signals"].items():
        notes += [f"{name}: {n}" for n in row["notes"]]
    out_dir = Path(out_dir)
    result = _jsonable({
        "tool": "ligero monitor", "created": now.isoformat(), "store": _relative_store(traffic["store"], out_dir),
        "card": _relative(card_path, out_dir), "variant": variant, "window": traffic["window"],
        "n_responses": traffic["n_responses"], "variants_in_window": traffic["variants"],
        "status": status, "exit_code": EXIT_CODES[status], "why": why if status == "NO_DATA" else None,
        "exit_codes": EXIT_MEANINGS, "drift": drift, "ab": ab, "guardrails": traffic["guardrails"], "notes": notes,
        "files": {"json": "monitor.json", "html": "monitor.html"}, "paths": "relative to the folder of monitor.json",
    })
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "monitor.json").write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
        (out_dir / "monitor.html").write_text(render_html(result, mon["reference_profile"], traffic["signals"]))
    except OSError as exc:
        raise LigeroError(f"cannot write the monitor report to {out_dir} ({exc.strerror}); choose a writable "
                          "--out") from None
    return result


def _ab_warnings(ab: Mapping) -> list[str]:
    """Names of the A/B metrics that warn: rates by name, numeric scores as 'mean <name>'."""
    rates = [name for name, m in ab.get("metrics", {}).items() if m["status"] != "OK"]
    means = [f"mean {name}" for name, m in (ab.get("numeric") or {}).get("metrics", {}).items() if m["status"] != "OK"]
    return rates + means


def summary_line(result: dict, out_dir: Path | None = None) -> str:
    """One line for the terminal / cron mail (NO_DATA says why); `out_dir` completes the report's path."""
    bad = [f"{k} {v['status']}" for k, v in result["drift"]["signals"].items() if v["status"] in ("WARN", "ALERT")]
    worse = _ab_warnings(result["ab"])
    report = Path(out_dir or "") / result["files"]["html"]
    return (f"{result['status']} (exit {result['exit_code']}): {result['variant']}, {result['n_responses']} responses"
            + (f" ({result['why']})" if result.get("why") else "")
            + (f"; drift: {', '.join(bad)}" if bad else "") + f"; A/B {result['ab']['status']}"
            + (f" ({', '.join(worse)} lower in the treatment)" if worse else "") + f"; report {report}")
