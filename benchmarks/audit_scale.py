"""The audit of a laptop-sized GGUF within memory: `ligero audit --model <file> --variants ... --quick` on a seeded
random-weight TinyLlama-1.1B-shaped file (benchmarks/scale.py writes it), with the peak memory of each model the
audit holds (it holds one at a time) against issue 12's bound: 1.3 x that model's weights + its KV cache.

    python benchmarks/audit_scale.py [--shape tinyllama-1.1b] [--type Q4_0] [--variants int8,q4_k_m]

Writes docs/audit-scale.json and docs/audit-scale.md. Run it alone on an idle machine (it times things too).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import ForeignLoad, machine  # noqa: E402
from scale import RSS_BOUND, SHAPES, make_files  # noqa: E402


def child(argv: list[str], threads: int) -> None:
    """Run the audit in this process, then print its own peak and what the imports alone held."""
    import torch

    import ligero.kernels
    from ligero.cli import main
    from ligero.eval.speed import current_rss_mb

    torch.set_num_threads(threads)
    ligero.kernels.warm()
    imports = current_rss_mb()
    t0 = time.perf_counter()
    code = main(argv)
    print(json.dumps({"exit": code, "seconds": time.perf_counter() - t0, "import_rss_mb": imports}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="tinyllama-1.1b", choices=sorted(SHAPES))
    ap.add_argument("--type", default="Q4_0", choices=["Q8_0", "Q4_0", "Q4_K_M"])
    ap.add_argument("--variants", default="int8,q4_k_m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "ligero" / "bench-scale"))
    ap.add_argument("--out", default="/tmp/ligero-audit-scale")
    ap.add_argument("--docs", default=str(ROOT / "docs"))
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:  # --child THREADS <the audit's command line>
        child(argv[2:], int(argv[1]))
        return 0
    args = ap.parse_args(argv)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    path = make_files(args.shape, [args.type], cache, args.threads)[args.type]
    cmd = [sys.executable, __file__, "--child", str(args.threads), "audit", "--model", str(path), "--variants",
           args.variants, "--quick", "--fresh", "--out", args.out]
    print("running:", " ".join(cmd[4:]), flush=True)
    load = ForeignLoad().start()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    share = load.share()
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        print(f"the audit failed (exit {proc.returncode})", file=sys.stderr)
        return 1
    run = json.loads(lines[-1])
    folder = max((p for p in Path(args.out).iterdir() if (p / "results.json").is_file()),
                 key=lambda p: (p / "results.json").stat().st_mtime)
    report = json.loads((folder / "results.json").read_text())
    variants = json.loads(json.dumps(report["rows"]))
    results = {n: json.loads((folder / "variants" / f"{n.replace('+', '_')}.json").read_text())
               for n in report["variants"]}
    imports = run["import_rss_mb"]
    rows = []
    for name in report["variants"]:
        r = results[name]
        weights = r["speed"]["weight_bytes"] / 1e6
        kv = r["speed"]["kv_cache_bytes"] / 1e6
        build = r["build_peak_rss_mb"]
        before = r["rss_before_mb"]
        bound = RSS_BOUND * weights + kv
        # The baseline computes what the audit keeps for every variant (in the variants' 'before'): not its own.
        state = r.get("audit_state_mb") or 0.0
        phases = {}
        for phase, peak in r["phase_peak_rss_mb"].items():
            phase_kv = max(kv, r["phase_kv_cache_mb"].get(phase, 0.0))  # generation batches hold larger caches
            net, phase_bound = peak - before - state, RSS_BOUND * weights + phase_kv
            phases[phase] = {"net_mb": net, "kv_cache_mb": phase_kv, "bound_mb": phase_bound,
                             "within": net <= phase_bound}
        worst = max(phases, key=lambda k: phases[k]["net_mb"] - phases[k]["bound_mb"])
        rows.append({"variant": name, "weights_mb": weights, "kv_cache_mb": kv, "peak_rss_mb": r["peak_rss_mb"],
                     "rss_before_mb": before, "audit_state_mb": state, "build_peak_rss_mb": build,
                     "net_build_peak_mb": build - before, "bound_mb": bound, "build_within": build - before <= bound,
                     "phases": phases, "closest_phase": worst, "within": all(p["within"] for p in phases.values()),
                     "quantize_seconds": r["quantize_seconds"], "seconds": r["seconds"],
                     "ppl": variants[name]["ppl"], "delta_ppl_pct": variants[name]["delta_ppl_pct"],
                     "kld": variants[name]["kld"], "decode_tok_s": variants[name]["decode_tok_s"],
                     "prefill_tok_s": variants[name].get("prefill_tok_s")})
    from ligero.io.gguf_header import read_gguf_header
    from ligero.models.generate import batch_token_budget

    out = {"machine": machine(), "foreign_load": share, "file": path.name, "file_bytes": path.stat().st_size,
           "batch_token_budget": batch_token_budget(read_gguf_header(path).config()),
           "shape": args.shape, "command": " ".join(cmd[4:]), "seconds": run["seconds"],
           "import_rss_mb": imports, "rss_bound": RSS_BOUND,
           "budget": report["budget"], "baseline": report["source"]["precision"], "rows": rows}
    docs = Path(args.docs)
    (docs / "audit-scale.json").write_text(json.dumps(out, indent=1))
    (docs / "audit-scale.md").write_text(render(out))
    print(render(out))
    return 0


def render(r: dict) -> str:
    m = r["machine"]
    gb = r["file_bytes"] / 1e9
    lines = [
        f"# An audit of a {r['shape']}-shaped GGUF within memory",
        "",
        f"`ligero audit --model {r['file']} --variants {r['command'].split('--variants ')[1].split()[0]} --quick` "
        f"on a seeded random-weight file ({gb:.2f} GB, written by benchmarks/scale.py), measured by "
        "`benchmarks/audit_scale.py` "
        f"on {m.get('cpu', '?')} ({m.get('threads', '?')} threads) at {m.get('commit', '?')}; the machine's other "
        f"processes took {100 * r['foreign_load']:.0f} % of its CPU time during the run.",
        "",
        "The audit holds one model at a time. Its baseline is " + r["baseline"].split("; ", 1)[-1] + ". "
        "Each variant is quantized from the file's packed tensors, one layer dequantized at a time. "
        "Each model's peak RSS is counted from the moment the model before it was released (Linux's "
        "`/proc/self/clear_refs`), phase by phase: its build (loading, and quantizing from the file) and each "
        "metric. What the process holds before the model (column 'before') is not the model's: the imports "
        f"({r['import_rss_mb'] / 1e3:.2f} GB at the start: torch, the tokenizer), what the metrics load before the "
        "first model (the toxicity classifier: scikit-learn and its model) and since (the bias and toxicity sets), "
        "and what the audit keeps across models (the baseline's log-probs and hidden states: column 'audit state', "
        "computed by the baseline and in every later model's 'before'). The bound is checked on what each model "
        "added to that, phase by phase: 1.3 x its weights plus the KV cache the phase holds (the speed test's "
        "single sequence; the profile and toxicity generate 8 sequences at once, whose cache is larger).",
        "",
        "Metrics other than speed run with glibc returning freed blocks of 1 MB or more to the system at once "
        "(ligero.io.checkpoint.FreedMemoryReturned); speed runs with the allocator's defaults, as a user's process "
        f"does. Activations: the bias scores texts in batches of at most {r['batch_token_budget']} tokens and "
        "generation prefills a few dozen positions per sequence at a time (ligero.models.generate.batch_token_budget)."
        " The random files' tokenizer has byte tokens only, so every text is about 4x as many tokens as with "
        "TinyLlama's own tokenizer, and activations and generation caches are as much larger.",
        "",
        "| model | weights GB | audit state GB | before GB | built: + GB | bound GB (1.3 x weights + KV) | within | "
        "audited: the phase nearest its bound, + GB of its bound GB | within | quantize s | model s | PPL | "
        "ΔPPL % | KL | decode tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        worst = row["phases"][row["closest_phase"]]
        lines.append(
            f"| {row['variant']} | {row['weights_mb'] / 1e3:.2f} | {row['audit_state_mb'] / 1e3:.2f} | "
            f"{row['rss_before_mb'] / 1e3:.2f} | {row['net_build_peak_mb'] / 1e3:.2f} | {row['bound_mb'] / 1e3:.2f} | "
            f"{'yes' if row['build_within'] else 'NO'} | {worst['net_mb'] / 1e3:.2f} of {worst['bound_mb'] / 1e3:.2f} "
            f"({row['closest_phase']}) | {'yes' if row['within'] else 'NO'} | {row['quantize_seconds']:.0f} | "
            f"{row['seconds']:.0f} | {row['ppl']:.4g} | {row['delta_ppl_pct']:+.3f} | {row['kld']:.2e} | "
            f"{row['decode_tok_s']:.2f} |")
    phases = list(dict.fromkeys(k for row in r["rows"] for k in row["phases"]))
    lines += [
        "",
        "Every phase: what it added above 'before' (GB; the baseline's net of the audit state) / the KV cache it held "
        "(MB). 'prepare': what the baseline computes once for every variant to be compared with.",
        "",
        "| model | " + " | ".join(phases) + " |",
        "|---|" + "---|" * len(phases),
    ]
    for row in r["rows"]:
        cells = [f"{row['phases'][k]['net_mb'] / 1e3:.2f} / {row['phases'][k]['kv_cache_mb']:.0f}"
                 + ("" if row["phases"][k]["within"] else " OVER") if k in row["phases"] else "" for k in phases]
        lines.append(f"| {row['variant']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Whole audit: {r['seconds'] / 60:.1f} min; the largest peak of any model "
        f"{max(x['peak_rss_mb'] for x in r['rows']) / 1e3:.2f} GB with the imports. Perplexities are of random weights "
        f"on {r['budget']['ppl_tokens']} evaluation tokens: they test the plumbing, not a language model.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
