"""The audit report: figures (PNG), report.md and a self-contained report.html with the same content.

Both documents are rendered from one context (report_context): the recommendation and its thresholds, the summary
table, the sample sizes, each metric's figures and sections (flips, changed continuations, ...), and the inputs.
report.html is a Jinja2 template (report.html.j2, autoescaped) with the figures embedded.
"""

from __future__ import annotations

import base64
import io
import json
from functools import cache
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from ligero.eval.audit import criteria_text
from ligero.eval.metrics import METRICS, ReportSection, Thresholds
from ligero.eval.metrics.plots import pyplot
from ligero.eval.variants import BASELINE

TEMPLATE = "report.html.j2"


@cache
def _templates() -> Environment:
    return Environment(loader=FileSystemLoader(Path(__file__).parent), autoescape=True, undefined=StrictUndefined,
                       trim_blocks=True, lstrip_blocks=True)


def make_figures(report: dict, results: dict, folder: Path) -> list[dict]:
    """Every metric's figures as folder/<key>.png: [{key, title, file (relative to the run folder), png_base64}]."""
    folder.mkdir(parents=True, exist_ok=True)
    figures = []
    for metric in METRICS:
        for key, title, fig in metric.report_figures(report, results):
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
            pyplot().close(fig)
            (folder / f"{key}.png").write_bytes(buf.getvalue())
            figures.append({"key": key, "title": title, "file": f"{folder.name}/{key}.png",
                            "png_base64": base64.b64encode(buf.getvalue()).decode("ascii")})
    return figures


def summary_table(report: dict) -> list[list[str]]:
    """One row per variant, the columns of every metric (header row first)."""
    columns = [column for metric in METRICS for column in metric.report_columns()]
    cells = [[name, *(cell(row) for _, cell in columns)] for name, row in report["rows"].items()]
    # a column no row fills says nothing (expert routing of a dense model)
    keep = [0] + [j + 1 for j in range(len(columns)) if any(c[j + 1] for c in cells)]
    header = ["variant", *(header for header, _ in columns)]
    return [[header[j] for j in keep]] + [[c[j] for j in keep] for c in cells]


def recommendation_lines(report: dict) -> list[str]:
    rec = report["recommendation"]
    lines = [rec["summary"]]
    if (report.get("deployer") or {}).get("recommendation_flag"):
        lines.append(report["deployer"]["recommendation_flag"])
    for c in (report.get("replication") or {}).get("claims", []):
        lines.append(f"{c['variant']}: {c['label']} {c['original_delta']:+.3g} was a finding; on a fresh sample "
                     f"{c['delta']:+.3g} (p {c['p_value']:.2g}, n {c['n']}): "
                     + ("it held." if c["held"] else "it did NOT hold."))
    for name, v in rec["verdicts"].items():
        line = f"{name}: " + ("meets all thresholds" if v["passes"] else "; ".join(v["reasons"]))
        if v.get("cautions"):
            line += " (" + "; ".join(v["cautions"]) + ")"
        lines.append(line)
    return lines


def findings_section(report: dict) -> ReportSection | None:
    """Every claimed change of the run with its uncorrected interval, p-value, BH-adjusted q-value, sample size and
    the smallest change that sample detects: a change is a finding only when it survives the correction."""
    f = report.get("findings")
    if not f or not f["claims"]:
        return None
    table = [["variant", "change", "Δ [95 % CI, uncorrected]", "test", "p", "q (BH)", "n",
              f"detectable at {f['power']:.0%} power", "finding"]]
    for c in f["claims"]:
        unit = f" {c['unit']}" if c["unit"] else ""
        table.append([c["variant"], c["label"], f"{c['delta']:+.3g}{unit} [{c['ci'][0]:+.3g}, {c['ci'][1]:+.3g}]",
                      c["test"], f"{c['p_value']:.2g}", f"{c['q_value']:.2g}", str(c["n"]),
                      f"±{c['detectable']:.3g}{unit}", "yes" if c["finding"] else "no"])
    note = (f"{f['m']} comparisons (every variant x claim) corrected together by {f['method']} at a false-discovery "
            f"rate of {f['q']:g}: {f['n_findings']} survive. A change is reported as a finding only when its q-value "
            f"is at most {f['q']:g}; the intervals are per comparison (uncorrected), so some exclude 0 by chance. "
            "'Detectable' is the smallest true change the sample finds with 80 % power at p < 0.05 (from the "
            "per-item spread of the paired differences; a change smaller than that can go unseen, so 'no finding' "
            "is not 'no change').")
    return ReportSection("Findings: which changes survive false-discovery control", table=table, note=note)


def replication_section(report: dict) -> ReportSection | None:
    """`--replicate`: each finding re-tested on a fresh sample, and whether it held."""
    r = report.get("replication")
    if r is None:
        return None
    untestable = [f"{c['variant']}: {c['label']} {c['original_delta']:+.3g} (q {c['original_q']:.2g}) was not "
                  f"re-tested: {c['reason']}." for c in r.get("untestable", [])]
    if not r["claims"]:
        return ReportSection("Replication of findings", note=f"{r.get('note', 'nothing re-tested')}.",
                             items=untestable)
    table = [["variant", "change", "run's Δ (q)", "fresh Δ [95 % CI]", "p", "q (BH)", "n", "held"]]
    for c in r["claims"]:
        unit = f" {c['unit']}" if c["unit"] else ""
        table.append([c["variant"], c["label"], f"{c['original_delta']:+.3g}{unit} ({c['original_q']:.2g})",
                      f"{c['delta']:+.3g}{unit} [{c['ci'][0]:+.3g}, {c['ci'][1]:+.3g}]", f"{c['p_value']:.2g}",
                      f"{c['q_value']:.2g}", str(c["n"]), "yes" if c["held"] else "NO"])
    held = sum(c["held"] for c in r["claims"])
    note = (f"Every finding re-tested on a fresh sample ({r['sample']}); it held when the fresh change has the same "
            f"sign and survives Benjamini-Hochberg at {r['q']:g} over these {len(r['claims'])} tests: {held} of "
            f"{len(r['claims'])} held. A finding that did not hold should not be acted on without more data.")
    return ReportSection("Replication of findings", table=table, note=note, items=untestable)


def deployer_section(report: dict) -> ReportSection | None:
    """Each variant as a file a deployer would run: its llama.cpp type (or none: Ligero's runtime only) and its size
    against the published file's."""
    d = report.get("deployer")
    if not d:
        return None
    published = d.get("published_mb")
    table = [["variant", "llama.cpp file type", "MB"] + (["vs the published file"] if published else [])]
    for name, row in report["rows"].items():
        if name == BASELINE:
            continue
        kind = d["gguf_types"].get(name)
        table.append([name, kind or "none (Ligero's runtime only)", f"{row['size_mb']:.1f}"]
                     + ([f"{row['size_mb'] / published:.2f}x"] if published else []))
    note = ("The published file as shipped is its own row" + (f" ({d['published_type']})" if d["published_type"]
                                                               else "")
            + "; a variant with a llama.cpp type can be exported with `ligero export --scheme NAME` and run by "
              "llama.cpp, the others only by Ligero.") if published else (
        "The model was published in full precision; a variant with a llama.cpp type can be exported with "
        "`ligero export --scheme NAME` and run by llama.cpp, the others only by Ligero.")
    return ReportSection("The comparison a deployer needs", table=table, note=note, items=d["notes"])


def report_context(report: dict, figures: list[dict]) -> dict:
    """Everything report.md and report.html show, as text and tables."""
    m, budget = report["machine"], report["budget"]
    thresholds = Thresholds(**report["thresholds"])
    samples = [s for s in (metric.report_samples(budget) for metric in METRICS) if s]
    legends = [s for s in (metric.report_legend(budget) for metric in METRICS) if s]
    return {
        "title": f"Ligero audit: {report.get('model_label', report['model'])}",
        "about": (f"Run {report['run_id']}, {report['created']}; {m['cpu']}, {m['threads']} threads, "
                  f"torch {m['torch']}, "
                  f"ligero {m['ligero']}{' — QUICK run (small samples)' if report['quick'] else ''}."),
        "baseline_caveat": (f"the published weights were already quantized (GGUF); the {BASELINE} baseline is their "
                            "dequantized values."),
        "thresholds": (f"Thresholds: {criteria_text(thresholds, report['rows'][BASELINE])}"
                       + ("" if thresholds.min_decode_tps is not None else " (decode: the baseline's measured speed)")
                       + "."),
        "recommendation": recommendation_lines(report),
        "table": summary_table(report),
        "samples": f"Samples: {'; '.join(samples)}.",
        "legend": (f"Δ columns: variant minus {BASELINE} on the same items, with 95 % paired bootstrap intervals; "
                   f"{'; '.join(legends)}."),
        "figures": figures,
        "sections": [s for s in [deployer_section(report), findings_section(report), replication_section(report)]
                     if s is not None]
        + [section for metric in METRICS for section in metric.report_sections(report)],
        "inputs": json.dumps(report["inputs"], indent=1),
    }


def _md_cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _md_table(table: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(map(_md_cell, table[0])) + " |", "|" + "---|" * len(table[0])]
    return lines + ["| " + " | ".join(map(_md_cell, row)) + " |" for row in table[1:]]


def _md_section(section: ReportSection) -> list[str]:
    lines = [f"## {section.title}", ""]
    if section.note:
        lines += [section.note, ""]
    if section.content_note:
        lines += [f"> **{section.content_note}**", ""]
    if section.table:
        lines += [*_md_table(section.table), ""]
    return lines + [*[f"- {item}" for item in section.items], *([""] if section.items else [])]


def render_markdown_report(ctx: dict) -> str:
    """report.md: the same content as report.html for reading on GitHub (figures as linked PNGs)."""
    lines = [f"# {ctx['title']}", "", f"{ctx['about']} Generated by `ligero run` (every number below is in "
             "results.json; a deployment card per variant is in cards/).", "",
             f"**Baseline caveat:** {ctx['baseline_caveat']}", "", "## Recommendation", "", ctx["thresholds"], "",
             *[f"- {x}" for x in ctx["recommendation"]], "", "## All variants", "", *_md_table(ctx["table"]), "",
             ctx["samples"], "", ctx["legend"], ""]
    for fig in ctx["figures"]:
        lines += [f"## {fig['title']}", "", f"![{fig['title']}]({fig['file']})", ""]
    for section in ctx["sections"]:
        lines += _md_section(section)
    return "\n".join(lines + ["## Inputs", "", "```json", ctx["inputs"], "```", ""])


def write_report(report: dict, results: dict, folder: Path) -> Path:
    """figures/*.png, report.html and report.md in the run folder; returns report.html's path."""
    ctx = report_context(report, make_figures(report, results, folder / "figures"))
    path = folder / "report.html"
    path.write_text(_templates().get_template(TEMPLATE).render(**ctx))
    (folder / "report.md").write_text(render_markdown_report(ctx))
    return path
