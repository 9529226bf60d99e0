"""monitor.html: the `ligero monitor` result as one self-contained page (Jinja2, autoescaped; figures inlined as
base64 PNGs). Every number shown is also in monitor.json."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
from jinja2 import Environment

from ligero.serve.drift import SIGNALS

STATUSES = ("OK", "INSUFFICIENT", "WARN", "ALERT", "NO_DATA")  # cells holding one of these are coloured

PAGE = """<!doctype html><html><head><meta charset='utf-8'>
<title>ligero monitor: {{ r.variant }}</title>
<style>body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f4f4f4}td:first-child{text-align:left}.WARN{background:#fff3c4}.ALERT{background:#ffd0d0}
.OK{background:#e3f6e3}.INSUFFICIENT{background:#eee}.NO_DATA{background:#dde4ff}.figs img{margin:4px}
.small{color:#666;font-size:90%}</style></head><body>
{%- macro table(rows) %}
<table><tr>{% for c in rows[0] %}<th>{{ c }}</th>{% endfor %}</tr>
{%- for row in rows[1:] %}<tr>{% for c in row %}{% if c is string and c in statuses %}<td class='{{ c }}'>
{%- else %}<td>{% endif %}{{ c | fmt }}</td>{% endfor %}</tr>{% endfor %}</table>
{%- endmacro %}
<h1>ligero monitor: <span class='{{ r.status }}'>{{ r.status }}</span></h1>
<p>Variant <b>{{ r.variant }}</b>, card {{ r.card }}, store {{ r.store }}. Exit code {{ r.exit_code }}
(0 OK, 1 WARN, 2 ALERT, 3 nothing to judge). Created {{ r.created }}.</p>
{% if r.why %}<p><b>{{ r.why }}</b></p>{% endif %}
{{ table(window) }}
<h2>Drift against the reference profile</h2>
<p class='small'>PSI (natural log, epsilon {{ drift.epsilon }}) and Jensen-Shannon ({{ drift.jensen_shannon }}) on
reference-quantile bins; KS two-sample. Signals with fewer than {{ drift.min_production }} production values are
INSUFFICIENT and do not alert.</p>
{{ table(signal_rows) }}
{{ table(test_rows) }}
<div class='figs'>
{%- for name, png in figures %}<img alt='{{ name }}' src='data:image/png;base64,{{ png }}'>{% endfor -%}
</div>
<h2>A/B analysis: <span class='{{ ab.status }}'>{{ ab.status }}</span></h2>
<p class='small'>Unit: {{ ab.unit }}. All feedback in the store, not only the window. {{ ab.n_boolean }} boolean votes
and {{ ab.n_numeric }} numeric scores used (latest per response and name), {{ ab.n_other }} other rows not
analysed.</p>
{% for m in rates %}
<h3>{{ m.name }}: positive rate</h3>
{{ table(m.variants) }}
{{ table(m.segments) }}
{% if m.difference %}<p>{{ m.treatment }} − {{ m.control }}: {{ m.estimate | fmt }}</p>
{{ table(m.difference) }}{% endif %}
{% if m.effects %}{{ table(m.effects) }}{% endif %}
{% if m.note %}<p class='small'>{{ m.note }}</p>{% endif %}
{% endfor %}
{% if numeric %}
<h3>Numeric feedback: mean score (higher is better)</h3>
<p class='small'>Unit: {{ numeric.unit }}. 95 % Student-t intervals per arm; the difference is treatment − control,
with Welch's fixed-horizon interval (valid for one look) and the always-valid normal-mixture interval (valid at every
look; plug-in variance, so asymptotically). Segment rows: Welch p-values with Benjamini-Hochberg q-values across
segments.</p>
{{ table(numeric.means) }}
{% if numeric.diffs | length > 1 %}{{ table(numeric.diffs) }}{% endif %}
{% for note in numeric.notes %}<p class='small'>{{ note }}</p>{% endfor %}
{% endif %}
<h3>Sample-ratio mismatch</h3>
{% if srm | length > 1 %}{{ table(srm) }}{% else %}<p>No assignments recorded.</p>{% endif %}
<h2>Guardrail events in the window</h2>
{% if guardrails | length > 1 %}{{ table(guardrails) }}{% else %}<p>None.</p>{% endif %}
{% if r.notes %}<h2>Notes</h2><ul>{% for n in r.notes %}<li>{{ n }}</li>{% endfor %}</ul>{% endif %}
<p class='small'>Every number is in monitor.json.</p></body></html>
"""


def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e-3 and x != 0 else f"{x:.{digits}f}"
    return str(x)


_ENV = Environment(autoescape=True, trim_blocks=True)
_ENV.filters["fmt"] = fmt
_TEMPLATE = _ENV.from_string(PAGE)


def figure(signal: str, reference: list, production: list) -> str:
    """Reference vs production histogram (densities on shared bins) as a base64 PNG."""
    import matplotlib  # imported on first use: a monitor run that fails earlier need not pay for it

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


def _drift_tables(drift: Mapping) -> tuple[list, list]:
    signals = [["signal", "n ref", "n prod", "mean ref", "mean prod", "bins", "PSI", "JS", "KS D", "KS p", "status"]]
    for name, r in drift["signals"].items():
        signals.append([name, r["n_reference"], r["n_production"], r["mean_reference"], r["mean_production"],
                        r["bins"], r["psi"], r["jensen_shannon"], r["ks_statistic"], r["ks_p_value"], r["status"]])
    tests = [["signal", *next(iter(drift["signals"].values()))["tests"]]]
    tests += [[name, *[t["status"] for t in r["tests"].values()]] for name, r in drift["signals"].items()]
    return signals, tests


def _rate_section(name: str, m: Mapping) -> dict:
    """One boolean feedback name: rates per variant and segment, the difference, segment effects."""
    section = {"name": name, "control": m["control"], "treatment": m["treatment"], "note": m.get("note"),
               "variants": [["variant", "n", "positive", "rate", "95 % low", "95 % high"]]
               + [[v, r["n"], r["positive"], r["rate"], r["low"], r["high"]] for v, r in m["variants"].items()],
               "segments": [["segment", "variant", "n", "rate", "95 % low", "95 % high"]]
               + [[s, v, r["n"], r["rate"], r["low"], r["high"]] for s, vs in m["segments"].items()
                  for v, r in vs.items()],
               "difference": None, "estimate": None, "effects": None}
    d = m.get("difference")
    if d and d.get("fixed"):
        section["estimate"] = d["estimate"]
        section["difference"] = [
            ["interval", "low", "high", "p-value", "valid when"],
            ["fixed horizon (Wald)", d["fixed"]["low"], d["fixed"]["high"], d["fixed"]["p_value"],
             "looked at once, at a sample size fixed in advance"],
            ["always valid (normal mixture)", d["always_valid"]["low"], d["always_valid"]["high"],
             d["always_valid"]["p_value"], "at every look (peeking allowed)"]]
    if m.get("segment_effects"):
        section["effects"] = [["segment", "n control", "n treatment", "difference", "low", "high", "p", "BH q"]] + [
            [x["segment"], x["n_control"], x["n_treatment"], x["estimate"], x["low"], x["high"], x["p_value"],
             x["q_value"]] for x in m["segment_effects"]]
    return section


def _numeric_section(numeric: Mapping) -> dict | None:
    """Numeric scores: mean with t-interval per variant and segment, then the differences with their intervals."""
    if not numeric["metrics"]:
        return None
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
    return {"unit": numeric["unit"], "means": means, "diffs": diffs, "notes": notes}


def render_html(result: Mapping, reference_profile: Mapping, production: Mapping[str, list]) -> str:
    drift, ab = result["drift"], result["ab"]
    signal_rows, test_rows = _drift_tables(drift)
    figures = []
    for name in SIGNALS:
        dist = reference_profile.get(name)
        figures.append((name, figure(name, dist.get("values", []) if isinstance(dist, Mapping) else [],
                                     production.get(name, []))))
    srm = [["experiment", "observed", "expected", "chi2", "p-value", "flagged (p < 0.001)"]] + [
        [exp, json.dumps(s["observed"]), json.dumps({k: round(v, 1) for k, v in s["expected"].items()}), s["chi2"],
         s["p_value"], s["flagged"]] for exp, s in ab["srm"].items()]
    window = [["window since", "first response", "last response", "responses"],
              [result["window"]["since"] or "all", result["window"]["first"], result["window"]["last"],
               result["n_responses"]]]
    return _TEMPLATE.render(
        r=result, drift=drift, ab=ab, statuses=STATUSES, window=window, signal_rows=signal_rows,
        test_rows=test_rows, figures=figures, rates=[_rate_section(n, m) for n, m in ab["metrics"].items()],
        numeric=_numeric_section(ab["numeric"]), srm=srm,
        guardrails=[["rule", "action", "events"]] + [[g["rule"], g["action"], g["n"]] for g in result["guardrails"]])
