"""The audit report: figures (PNG, also embedded) and one self-contained report.html."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

BASELINE = "fp32"


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    return plt


def _save(fig, folder: Path, name: str) -> tuple[Path, str]:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    path = folder / f"{name}.png"
    path.write_bytes(buf.getvalue())
    return path, base64.b64encode(buf.getvalue()).decode("ascii")


def _label_points(ax, xs, ys, names):
    for x, y, n in zip(xs, ys, names):
        ax.annotate(n, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=8)


def _scatter(rows: dict, x: str, y, color: str, xlabel: str, ylabel: str, title: str, log_y: bool = False):
    """One labelled point per variant (the baseline in black); y is a key or a function of the row."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    names = list(rows)
    xs = [rows[n][x] for n in names]
    ys = [y(rows[n]) if callable(y) else rows[n][y] for n in names]
    ax.scatter(xs, ys, color=["black" if n == BASELINE else color for n in names])
    _label_points(ax, xs, ys, names)
    if log_y:
        ax.set_yscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    return fig


def fig_quality_vs_bits(rows: dict, folder: Path):
    fig = _scatter(rows, "bits_per_weight", lambda r: max(r["delta_ppl_pct"], 1e-3), "tab:blue",
                   "bits per weight (stored)", "ΔPPL % vs fp32 (log; fp32 drawn at 0.001)",
                   "Quality lost against bits per weight", log_y=True)
    return _save(fig, folder, "quality_vs_bits")


def fig_speed_vs_size(rows: dict, folder: Path):
    fig = _scatter(rows, "size_mb", "decode_tok_s", "tab:green", "size MB (stored)", "decode tok/s (batch 1)",
                   "Decode speed against size")
    return _save(fig, folder, "speed_vs_size")


def fig_bias(comparisons: dict, folder: Path):
    """Δ pct_stereotype per CrowS-Pairs category with 95 % bootstrap intervals, one marker per variant."""
    plt = _plt()
    variants = list(comparisons)
    cats = ["overall"] + list(next(iter(comparisons.values()))["crows_pairs"]["per_category"]) if variants else []
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(cats) + 1.5))
    width = 0.8 / max(1, len(variants))
    for j, v in enumerate(variants):
        c = comparisons[v]["crows_pairs"]
        entries = [c["pct_stereotype"]] + [c["per_category"][k]["pct_stereotype"] for k in cats[1:]]
        y = np.arange(len(cats)) + (j - (len(variants) - 1) / 2) * width
        d = np.array([e["delta"] for e in entries])
        lo = d - np.array([e["delta_ci"][0] for e in entries])
        hi = np.array([e["delta_ci"][1] for e in entries]) - d
        ax.errorbar(d, y, xerr=[lo, hi], fmt="o", ms=3, capsize=2, label=v)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(np.arange(len(cats)), cats)
    ax.invert_yaxis()
    ax.set_xlabel("Δ pct_stereotype vs fp32 (points, 95 % CI)")
    ax.set_title("CrowS-Pairs: bias shift per category")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, folder, "bias_deltas")


def fig_toxicity(results: dict, folder: Path):
    plt = _plt()
    names = list(results)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, title in [(axes[0], "expected_max_toxicity", "expected maximum toxicity"),
                           (axes[1], "toxicity_probability", "toxicity probability")]:
        est = np.array([results[n]["toxicity"][key] for n in names])
        ci = np.array([results[n]["toxicity"][f"{key}_ci"] for n in names])
        ax.bar(range(len(names)), est, color=["black" if n == BASELINE else "tab:red" for n in names], alpha=0.7,
               yerr=[est - ci[:, 0], ci[:, 1] - est], capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_title(title + " (95 % CI)", fontsize=10)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3, axis="y")
    return _save(fig, folder, "toxicity")


def fig_shift(results: dict, folder: Path):
    """1 - cosine similarity of each layer's hidden states to the baseline's (log colour scale)."""
    plt = _plt()
    from matplotlib.colors import LogNorm

    names = [n for n, r in results.items() if r.get("shift")]
    if not names:
        return None
    grid = np.array([[max(1 - x["cos_mean"], 1e-7) for x in results[n]["shift"]["layers"]] for n in names])
    fig, ax = plt.subplots(figsize=(9, 0.4 * len(names) + 1.5))
    im = ax.imshow(grid, aspect="auto", cmap="magma_r", norm=LogNorm(vmin=1e-5, vmax=1))
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("layer (0 = embeddings, i = output of block i - 1)")
    ax.set_title("Internal shift: 1 - cosine(hidden states, fp32)  (× = flagged)")
    for i, n in enumerate(names):
        for x in results[n]["shift"]["layers"]:
            if x["flags"]:
                ax.text(x["layer"], i, "×", ha="center", va="center", fontsize=7, color="cyan")
    fig.colorbar(im, ax=ax, fraction=0.03)
    return _save(fig, folder, "shift_heatmap")


FIGURES = [("quality_vs_bits", "ΔPPL against bits per weight"), ("speed_vs_size", "Decode speed against size"),
           ("bias_deltas", "Bias shift per category"), ("toxicity", "Toxicity"),
           ("shift_heatmap", "Internal shift per layer")]


def make_figures(report: dict, results: dict, folder: Path) -> dict[str, tuple[Path, str]]:
    folder.mkdir(parents=True, exist_ok=True)
    rows, figs = report["rows"], {}
    figs["quality_vs_bits"] = fig_quality_vs_bits(rows, folder)
    figs["speed_vs_size"] = fig_speed_vs_size(rows, folder)
    if report["comparisons"]:
        figs["bias_deltas"] = fig_bias(report["comparisons"], folder)
    figs["toxicity"] = fig_toxicity(results, folder)
    shift = fig_shift(results, folder)
    if shift:
        figs["shift_heatmap"] = shift
    return figs


def _ci(v: list[float] | None, fmt: str = "{:+.2f}") -> str:
    return f"[{fmt.format(v[0])}, {fmt.format(v[1])}]" if v else ""


def summary_table(report: dict) -> list[list[str]]:
    head = ["variant", "bits/w", "MB", "PPL", "ΔPPL %", "KLD", "top-1 %", "decode tok/s", "prefill tok/s",
            "mem MB", "pct_stereo", "Δ stereo [CI]", "flips %", "ss", "EMT", "Δ EMT [CI]", "flagged layers"]
    rows = [head]
    for name, r in report["rows"].items():
        rows.append([
            name, f"{r['bits_per_weight']:.2f}", f"{r['size_mb']:.1f}", f"{r['ppl']:.3f}", f"{r['delta_ppl_pct']:+.2f}",
            f"{r['kld']:.4f}", f"{100 * r['top1_agreement']:.1f}", f"{r['decode_tok_s']:.1f}",
            f"{r['prefill_tok_s']:.0f}", f"{r['memory_mb']:.0f}", f"{r['pct_stereotype']:.1f}",
            f"{r['delta_pct_stereotype']:+.2f} {_ci(r['delta_pct_stereotype_ci'])}" if "delta_pct_stereotype" in r else "",
            f"{100 * r['crows_flip_rate']:.1f}" if "crows_flip_rate" in r else "",
            f"{r['stereoset_ss']:.1f}", f"{r['expected_max_toxicity']:.3f}",
            f"{r['delta_expected_max_toxicity']:+.3f} {_ci(r['delta_expected_max_toxicity_ci'], '{:+.3f}')}"
            if "delta_expected_max_toxicity" in r else "",
            ", ".join(map(str, r.get("shift_flagged_layers", []))) if "shift_flagged_layers" in r else "",
        ])
    return rows


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def _html_table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def recommendation_lines(report: dict) -> list[str]:
    rec = report["recommendation"]
    lines = [rec["summary"]]
    for name, v in rec["verdicts"].items():
        lines.append(f"{name}: " + ("meets all thresholds" if v["passes"] else "; ".join(v["reasons"])))
    return lines


def write_report(report: dict, results: dict, folder: Path) -> Path:
    figs = make_figures(report, results, folder / "figures")
    e = html.escape
    m = report["machine"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>Ligero audit: {e(report['model'])}</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
        "th{background:#f3f3f3}td:first-child{text-align:left}img{max-width:100%}.rec{background:#eef7ee;"
        "padding:.6em 1em;border-left:4px solid #3a3}.small{font-size:12px;color:#555}</style></head><body>",
        f"<h1>Ligero audit: {e(report['model'])}</h1>",
        f"<p class='small'>Run <code>{e(report['run_id'])}</code>, {e(report['created'])}; {e(m['cpu'])}, "
        f"{m['threads']} threads, torch {e(m['torch'])}, ligero {e(m['ligero'])}"
        f"{' — QUICK run (small samples)' if report['quick'] else ''}.</p>",
        "<p><b>Baseline caveat:</b> the published weights were already quantized (GGUF); the fp32 baseline is their "
        "dequantized values.</p>",
        "<h2>Recommendation</h2><div class='rec'>" + "<br>".join(e(x) for x in recommendation_lines(report)) + "</div>",
        "<h2>All variants</h2>", _html_table(summary_table(report)),
        "<p class='small'>Δ columns: variant minus fp32 on the same items, 95 % paired bootstrap intervals. flips: "
        "CrowS-Pairs items whose preference changed (McNemar p-values in results.json). EMT: expected maximum "
        "toxicity. mem: weights + KV cache at "
        f"{report['budget']['kv_context']} tokens.</p>",
    ]
    for key, title in FIGURES:
        if key in figs:
            parts.append(f"<h2>{e(title)}</h2><img alt='{e(title)}' src='data:image/png;base64,{figs[key][1]}'>")
    parts.append("<h2>Continuations whose toxicity changed most</h2>")
    for name, cmp in report["comparisons"].items():
        parts.append(f"<h3>{e(name)}</h3><table><tr><th>prompt</th><th>fp32 (max score)</th>"
                     f"<th>{e(name)} (max score)</th></tr>")
        for row in cmp["most_changed_toxicity"]:
            parts.append(f"<tr><td>{e(row['prompt'][:160])}</td><td>{e(row['base_continuation'][:160])} "
                         f"({row['base_max']:.2f})</td><td>{e(row['variant_continuation'][:160])} "
                         f"({row['variant_max']:.2f})</td></tr>")
        parts.append("</table>")
    parts.append("<h2>Inputs</h2><pre class='small'>" + e(_inputs_text(report)) + "</pre>")
    parts.append("<p class='small'>Every number is in results.json; deployment cards are in cards/.</p></body></html>")
    path = folder / "report.html"
    path.write_text("\n".join(parts))
    write_markdown_report(report, folder)
    return path


def _inputs_text(report: dict) -> str:
    import json

    return json.dumps(report["inputs"], indent=1)


def write_markdown_report(report: dict, folder: Path, figures_rel: str = "figures") -> Path:
    """report.md: the same content as report.html for reading on GitHub (figures as linked PNGs)."""
    m, b = report["machine"], report["budget"]
    lines = [
        f"# Ligero audit: {report['model']}",
        "",
        f"Run `{report['run_id']}`, {report['created']}; {m['cpu']}, {m['threads']} threads, torch {m['torch']}, "
        f"ligero {m['ligero']}{' — QUICK run (small samples)' if report['quick'] else ''}. Generated by `ligero run` "
        "(every number below is in results.json; a deployment card per variant is in cards/).",
        "",
        "**Baseline caveat:** the published weights were already quantized (GGUF); the fp32 baseline is their "
        "dequantized values.",
        "",
        "## Recommendation",
        "",
        f"Thresholds: ΔPPL ≤ {report['thresholds']['max_ppl_increase']:g} %, bias shift ≤ "
        f"{report['thresholds']['max_bias_shift']:g} points, decode ≥ "
        f"{report['recommendation']['min_decode_tps_used']:.1f} tok/s (default: the baseline's measured speed).",
        "",
        *[f"- {x}" for x in recommendation_lines(report)],
        "",
        "## All variants",
        "",
        markdown_table(summary_table(report)),
        "",
        f"Samples: perplexity on {b['ppl_tokens']} evaluation tokens (windows of {b['ppl_ctx']}); CrowS-Pairs "
        f"{b['crows_pairs'] or 1018} pairs (stratified by category); StereoSet intrasentence {b['stereoset']} items; "
        f"toxicity {b['toxicity_prompts']} prompts × {b['toxicity_samples']} samples of {b['toxicity_tokens']} tokens; "
        f"internal shift on {b['shift_windows']} × {b['shift_tokens']} tokens; decode {b['decode_tokens']} tokens × "
        f"{b['speed_repeats']}. Δ columns: variant minus fp32 on the same items with 95 % paired bootstrap intervals; "
        "flips: CrowS-Pairs items whose preference changed; EMT: expected maximum toxicity; mem: weights + KV cache at "
        f"{b['kv_context']} tokens.",
        "",
    ]
    for key, title in FIGURES:
        if (folder / "figures" / f"{key}.png").exists():
            lines += [f"## {title}", "", f"![{title}]({figures_rel}/{key}.png)", ""]
    lines += ["## Bias flips (CrowS-Pairs, McNemar)", "", "| variant | flipped | to stereotype | to anti | McNemar p |",
              "|---|---|---|---|---|"]
    for name, cmp in report["comparisons"].items():
        f = cmp["crows_pairs"]["flips"]
        lines.append(f"| {name} | {100 * f['flip_rate']:.1f} % | {f['variant_only']} | {f['base_only']} | "
                     f"{f['mcnemar']['p_value']:.3g} |")
    lines += ["", "## Continuations whose toxicity changed most", ""]
    for name, cmp in report["comparisons"].items():
        rows = cmp["most_changed_toxicity"][:2]
        for r in rows:
            lines.append(f"- **{name}** ({r['base_max']:.2f} → {r['variant_max']:.2f}) prompt “{_oneline(r['prompt'])}”: "
                         f"fp32 “{_oneline(r['base_continuation'])}” / {name} “{_oneline(r['variant_continuation'])}”")
    lines += ["", "## Inputs", "", "```json", _inputs_text(report), "```", ""]
    path = folder / "report.md"
    path.write_text("\n".join(lines))
    return path


def _oneline(text: str, n: int = 120) -> str:
    text = " ".join(text.split()).replace("|", "/")
    return text[:n] + ("…" if len(text) > n else "")
