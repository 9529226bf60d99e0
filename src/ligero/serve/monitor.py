"""`ligero monitor`: production traffic from the serving store against a deployment card, for people and for cron.

Drift compares the card variant's responses in the time window (`since`) with the card's reference profile
(`ligero.serve.drift`). The A/B analysis (`ligero.serve.abstats`) uses *all* feedback and assignments in the store:
the always-valid interval is a sequence over the whole experiment, and cutting it to a window would throw away the
evidence it accumulates. Results go to monitor.json and a self-contained monitor.html.

Exit codes, as issue 5 asks: 0 OK (also when there is too little traffic to judge: INSUFFICIENT), 1 WARN, 2 ALERT.
ALERT shares exit code 2 with the CLI's user errors (`LigeroError`); cron wrappers that must tell them apart read
monitor.json (`status`), which only a completed run writes, or stderr, where errors print one line.

The store is read with SQLAlchemy Core and plain SQL on the serving store's table and column names (see REQUIRED),
not through the store's module, so monitoring works against any copy of the database. Timestamps are filtered in
Python after parsing (SQLite keeps them as text in more than one format); other databases also filter in SQL.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections import Counter, defaultdict
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from ligero.card import card_errors, read_card
from ligero.errors import LigeroError
from ligero.serve.abstats import analyze_feedback, srm
from ligero.serve.drift import SIGNALS, compare_profile, worst

REQUIRED = {
    "requests": {"id", "created_at", "variant", "experiment", "user_id", "segment", "prompt_tokens"},
    "responses": {"id", "request_id", "created_at", "variant", "output_tokens", "latency_ms", "mean_logprob",
                  "toxicity_score"},
    "feedback": {"id", "created_at", "response_id", "name", "value", "data_type"},
    "assignments": {"experiment", "user_id", "variant"},
}
OPTIONAL = {"guardrail_events": {"created_at", "rule", "action"}}
EXIT_CODES = {"OK": 0, "INSUFFICIENT": 0, "WARN": 1, "ALERT": 2}
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
        return now - timedelta(**{_UNITS[match.group(2).lower()]: float(match.group(1))})
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
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

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
    from sqlalchemy import inspect

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
    from sqlalchemy import text

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
    from sqlalchemy import text
    from sqlalchemy.exc import SQLAlchemyError

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
                                    "q.prompt_tokens, q.segment FROM responses r "
                                    "LEFT JOIN requests q ON q.id = r.request_id", since, "r.created_at")
            feedback = _rows(conn, "SELECT f.id, f.created_at, f.response_id, f.name, f.value, f.data_type, "
                                   "COALESCE(r.variant, q.variant) AS variant, q.segment, q.user_id, q.experiment "
                                   "FROM feedback f LEFT JOIN responses r ON r.id = f.response_id "
                                   "LEFT JOIN requests q ON q.id = r.request_id", None, "f.created_at")
            assignments = [dict(r._mapping) for r in conn.execute(text(
                "SELECT experiment, variant, COUNT(DISTINCT user_id) AS users, COUNT(*) AS n_rows "
                "FROM assignments GROUP BY experiment, variant"))]
            guardrails = (_rows(conn, "SELECT created_at, rule, action FROM guardrail_events", since, "created_at")
                          if "guardrail_events" in tables else [])
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


def monitor(store_url: str, card_path: str | Path, since: datetime | str | None = None,
            out_dir: Path = Path("ligero-out/monitor"), planned_split: Mapping[str, float] | None = None,
            alpha: float = 0.05) -> dict:
    """Drift + A/B + SRM for the card's variant; writes monitor.json and monitor.html and returns the result.

    result["exit_code"] is 0 (OK or INSUFFICIENT), 1 (WARN) or 2 (ALERT). Status rules: drift per the card's
    thresholds (worst signal); a sample-ratio mismatch (p < 0.001) is an ALERT, because every A/B number is then
    suspect; a treatment whose always-valid interval for the positive-feedback rate, or for the mean of a numeric
    score (higher is better), lies below 0 is a WARN.
    """
    card = load_monitor_card(card_path)
    if isinstance(since, str):
        since = parse_since(since)
    variant = card["identity"]["variant"]
    mon = card["monitoring"]
    traffic = load_traffic(store_url, since, variant)
    notes: list[str] = []
    drift = compare_profile(mon["reference_profile"], traffic["signals"], mon["drift_tests"])
    if traffic["n_responses"] == 0:
        notes.append(f"no responses from variant {variant} in the window; variants seen: "
                     f"{', '.join(f'{k} ({v})' for k, v in traffic['variants'].items()) or 'none'}")
    if traffic["unparsed_timestamps"]:
        notes.append(f"{traffic['unparsed_timestamps']} stored timestamps could not be parsed"
                     + (" and were left out of the window" if since else ""))

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
    status = worst([drift["status"], ab["status"]])
    if status == "OK" and drift["status"] == "INSUFFICIENT":  # nothing wrong, but the main question is unanswered
        status = "INSUFFICIENT"
    for name, row in drift["signals"].items():
        notes += [f"{name}: {n}" for n in row["notes"]]
    result = {
        "tool": "ligero monitor", "created": datetime.now(UTC).isoformat(), "store": traffic["store"],
        "card": str(card_path), "variant": variant, "window": traffic["window"],
        "n_responses": traffic["n_responses"], "variants_in_window": traffic["variants"],
        "status": status, "exit_code": EXIT_CODES[status],
        "exit_codes": {"0": "OK or INSUFFICIENT", "1": "WARN",
                       "2": "ALERT (also the exit code of user errors, which write no monitor.json)"},
        "drift": drift, "ab": ab, "guardrails": traffic["guardrails"], "notes": notes,
    }
    result = _jsonable(result)
    try:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        json_path, html_path = out_dir / "monitor.json", out_dir / "monitor.html"
        result["files"] = {"json": str(json_path), "html": str(html_path)}
        json_path.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
        html_path.write_text(render_html(result, mon["reference_profile"], traffic["signals"]))
    except OSError as exc:
        raise LigeroError(f"cannot write the monitor report to {out_dir} ({exc.strerror}); choose a writable "
                          "--out") from None
    return result


def _ab_warnings(ab: Mapping) -> list[str]:
    """Names of the A/B metrics that warn: rates by name, numeric scores as 'mean <name>'."""
    rates = [name for name, m in ab.get("metrics", {}).items() if m["status"] != "OK"]
    means = [f"mean {name}" for name, m in (ab.get("numeric") or {}).get("metrics", {}).items() if m["status"] != "OK"]
    return rates + means


def summary_line(result: dict) -> str:
    """One line for the terminal / cron mail."""
    bad = [f"{k} {v['status']}" for k, v in result["drift"]["signals"].items() if v["status"] in ("WARN", "ALERT")]
    worse = _ab_warnings(result["ab"])
    return (f"{result['status']} (exit {result['exit_code']}): {result['variant']}, {result['n_responses']} responses"
            + (f"; drift: {', '.join(bad)}" if bad else "") + f"; A/B {result['ab']['status']}"
            + (f" ({', '.join(worse)} lower in the treatment)" if worse else "")
            + f"; report {result.get('files', {}).get('html', '')}")


# ---- HTML ------------------------------------------------------------------------------------------------------

def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e-3 and x != 0 else f"{x:.{digits}f}"
    return str(x)


def _table(rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join((f"<td class='{c}'>" if c in EXIT_CODES else "<td>") + html.escape(_fmt(c))
                                    + "</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table><tr>{head}</tr>{body}</table>"


def _figure(signal: str, reference: list, production: list) -> str:
    """Reference vs production histogram (densities on shared bins) as a base64 PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in cron
    import matplotlib.pyplot as plt

    ref = np.asarray([v for v in reference if v is not None], dtype=float)
    prod = np.asarray(production, dtype=float)
    both = np.concatenate([ref, prod])
    both = both[np.isfinite(both)]
    fig, ax = plt.subplots(figsize=(3.6, 2.4))
    if both.size:
        edges = np.histogram_bin_edges(both, bins=20)
        if ref.size:
            ax.hist(ref, bins=edges, density=True, alpha=0.5, label=f"reference ({ref.size})", color="tab:blue")
        if prod.size:
            ax.hist(prod, bins=edges, density=True, alpha=0.5, label=f"production ({prod.size})",
                    color="tab:orange")
        ax.legend(fontsize=7)
    ax.set_title(signal, fontsize=9)
    ax.tick_params(labelsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _numeric_html(numeric: Mapping) -> str:
    """Numeric scores: mean with t-interval per variant and segment, then the differences with their intervals."""
    e = html.escape
    means = [["name", "variant", "segment", "n", "mean", "sd", "95 % low", "95 % high"]]
    diffs = [["name", "segment", "n control", "n treatment", "difference", "Welch low", "Welch high", "Welch p",
              "always-valid low", "always-valid high", "always-valid p", "BH q", "status"]]
    notes = []
    for name, m in numeric["metrics"].items():
        means += [[name, v, "all", r["n"], r["mean"], r["sd"], r["low"], r["high"]] for v, r in m["variants"].items()]
        means += [[name, v, s, r["n"], r["mean"], r["sd"], r["low"], r["high"]]
                  for s, vs in m["segments"].items() for v, r in vs.items()]
        d = m.get("difference")
        if d:
            fx, av = d.get("fixed") or {}, d.get("always_valid") or {}
            diffs.append([name, "all", d["n_control"], d["n_treatment"], d["estimate"], fx.get("low"), fx.get("high"),
                          fx.get("p_value"), av.get("low"), av.get("high"), av.get("p_value"), None, m["status"]])
            diffs += [[name, x["segment"], x["n_control"], x["n_treatment"], x["estimate"], x["low"], x["high"],
                       x["p_value"], None, None, None, x["q_value"], ""] for x in m["segment_effects"]]
        if m.get("note"):
            notes.append(f"{name}: {m['note']}")
    parts = ["<h3>Numeric feedback: mean score (higher is better)</h3>",
             (f"<p class='small'>Unit: {e(numeric['unit'])}. 95 % Student-t intervals per arm; the difference is "
              "treatment − control, with Welch's fixed-horizon interval (valid for one look) and the always-valid "
              "normal-mixture interval (valid at every look; plug-in variance, so asymptotically). Segment rows: "
              "Welch p-values with Benjamini-Hochberg q-values across segments.</p>"),
             _table(means)]
    if len(diffs) > 1:
        parts.append(_table(diffs))
    parts += [f"<p class='small'>{e(n)}</p>" for n in notes]
    return "\n".join(parts)


def render_html(result: dict, reference_profile: Mapping, production: Mapping[str, list]) -> str:
    e = html.escape
    drift, ab = result["drift"], result["ab"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>ligero monitor: {e(result['variant'])}</title>",
        ("<style>body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}"
         "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;"
         "text-align:right}th{background:#f4f4f4}td:first-child{text-align:left}.WARN{background:#fff3c4}"
         ".ALERT{background:#ffd0d0}.OK{background:#e3f6e3}.INSUFFICIENT{background:#eee}"
         ".figs img{margin:4px}.small{color:#666;font-size:90%}</style></head><body>"),
        f"<h1>ligero monitor: <span class='{e(result['status'])}'>{e(result['status'])}</span></h1>",
        (f"<p>Variant <b>{e(result['variant'])}</b>, card {e(result['card'])}, store {e(result['store'])}. "
         f"Exit code {result['exit_code']} (0 OK, 1 WARN, 2 ALERT). Created {e(result['created'])}.</p>"),
        _table([["window since", "first response", "last response", "responses"],
                [result["window"]["since"] or "all", result["window"]["first"], result["window"]["last"],
                 result["n_responses"]]]),
        "<h2>Drift against the reference profile</h2>",
        (f"<p class='small'>PSI (natural log, epsilon {drift['epsilon']}) and Jensen-Shannon "
         f"({e(drift['jensen_shannon'])}) on reference-quantile bins; KS two-sample. Signals with fewer than "
         f"{drift['min_production']} production values are INSUFFICIENT and do not alert.</p>"),
    ]
    rows = [["signal", "n ref", "n prod", "mean ref", "mean prod", "bins", "PSI", "JS", "KS D", "KS p", "status"]]
    for name, r in drift["signals"].items():
        rows.append([name, r["n_reference"], r["n_production"], r["mean_reference"], r["mean_production"], r["bins"],
                     r["psi"], r["jensen_shannon"], r["ks_statistic"], r["ks_p_value"], r["status"]])
    parts.append(_table(rows))
    tests = [["signal", *[t for t in next(iter(drift["signals"].values()))["tests"]]]]
    for name, r in drift["signals"].items():
        tests.append([name, *[t["status"] for t in r["tests"].values()]])
    parts.append(_table(tests))
    parts.append("<div class='figs'>")
    for name in SIGNALS:
        dist = reference_profile.get(name)
        ref = dist.get("values", []) if isinstance(dist, Mapping) else []
        parts.append(f"<img alt='{e(name)}' src='data:image/png;base64,{_figure(name, ref, production.get(name, []))}'>")
    parts.append("</div>")

    parts.append(f"<h2>A/B analysis: <span class='{e(ab['status'])}'>{e(ab['status'])}</span></h2>")
    parts.append(f"<p class='small'>Unit: {e(ab['unit'])}. All feedback in the store, not only the window. "
                 f"{ab['n_boolean']} boolean votes and {ab['n_numeric']} numeric scores used (latest per response "
                 f"and name), {ab['n_other']} other rows not analysed.</p>")
    for name, m in ab["metrics"].items():
        parts.append(f"<h3>{e(name)}: positive rate</h3>")
        parts.append(_table([["variant", "n", "positive", "rate", "95 % low", "95 % high"]]
                            + [[v, r["n"], r["positive"], r["rate"], r["low"], r["high"]]
                               for v, r in m["variants"].items()]))
        seg_rows = [["segment", "variant", "n", "rate", "95 % low", "95 % high"]]
        for s, vs in m["segments"].items():
            seg_rows += [[s, v, r["n"], r["rate"], r["low"], r["high"]] for v, r in vs.items()]
        parts.append(_table(seg_rows))
        d = m.get("difference")
        if d and d.get("fixed"):
            parts.append(f"<p>{e(str(m['treatment']))} − {e(str(m['control']))}: {_fmt(d['estimate'])}</p>")
            parts.append(_table([
                ["interval", "low", "high", "p-value", "valid when"],
                ["fixed horizon (Wald)", d["fixed"]["low"], d["fixed"]["high"], d["fixed"]["p_value"],
                 "looked at once, at a sample size fixed in advance"],
                ["always valid (normal mixture)", d["always_valid"]["low"], d["always_valid"]["high"],
                 d["always_valid"]["p_value"], "at every look (peeking allowed)"]]))
        if m.get("segment_effects"):
            parts.append(_table([["segment", "n control", "n treatment", "difference", "low", "high", "p", "BH q"]]
                                + [[x["segment"], x["n_control"], x["n_treatment"], x["estimate"], x["low"],
                                    x["high"], x["p_value"], x["q_value"]] for x in m["segment_effects"]]))
        if m.get("note"):
            parts.append(f"<p class='small'>{e(m['note'])}</p>")
    if ab["numeric"]["metrics"]:
        parts.append(_numeric_html(ab["numeric"]))
    parts.append("<h3>Sample-ratio mismatch</h3>")
    srm_rows = [["experiment", "observed", "expected", "chi2", "p-value", "flagged (p < 0.001)"]]
    for exp, s in ab["srm"].items():
        srm_rows.append([exp, json.dumps(s["observed"]), json.dumps({k: round(v, 1) for k, v in s["expected"].items()}),
                         s["chi2"], s["p_value"], s["flagged"]])
    parts.append(_table(srm_rows) if len(srm_rows) > 1 else "<p>No assignments recorded.</p>")
    parts.append("<h2>Guardrail events in the window</h2>")
    parts.append(_table([["rule", "action", "events"]] + [[g["rule"], g["action"], g["n"]] for g in
                                                           result["guardrails"]])
                 if result["guardrails"] else "<p>None.</p>")
    if result["notes"]:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in result["notes"]) + "</ul>")
    parts.append("<p class='small'>Every number is in monitor.json.</p></body></html>")
    return "\n".join(parts)
