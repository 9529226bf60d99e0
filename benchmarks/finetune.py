"""LoRA on the full-precision base vs QLoRA on a packed 4-bit base (int4, NF4), on the legal and news domains:
the same tokens, batches, seed and recipe per arm; domain perplexity before / after, forgetting (perplexity on the
general evaluation split before / after), time and peak memory per step; then the audit of one adapter (base,
fine-tuned, fine-tuned then quantized). Writes docs/finetune.json and docs/finetune.md.

    python benchmarks/finetune.py [--steps 32] [--batch 8] [--seq-len 128] [--lr 1e-3] [--audit-budget standard]

Each arm trains in its own process (`ligero finetune`), so its peak memory is its own; a rerun resumes finished
arms from their adapter.json. Run it on an idle machine: the seconds per step are timings.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import ForeignLoad, machine  # noqa: E402

MODEL = "smollm2-135m"
ARMS = [(domain, scheme) for domain in ("legal", "news") for scheme in ("fp32", "int4", "nf4")]
GENERAL_TOKENS = 4096  # the general evaluation split's tokens for forgetting (windows of 512)


def train_arm(domain: str, scheme: str, out: Path, args) -> dict:
    folder = out / f"{domain}-{scheme}"
    if (folder / "adapter.json").is_file():
        return json.loads((folder / "adapter.json").read_text())
    cmd = [sys.executable, "-m", "ligero", "finetune", "--model", MODEL, "--domain", domain, "--out", str(folder),
           "--steps", str(args.steps), "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--lr",
           str(args.lr), "--rank", str(args.rank), "--eval-every", str(max(1, args.steps // 4)),
           "--checkpoint-every", str(args.steps), "--seed", "0", "--gradient-checkpointing"]
    if scheme != "fp32":
        cmd += ["--scheme", scheme]
    print(f"== {domain} / {scheme}: {' '.join(cmd[3:])}", flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads((folder / "adapter.json").read_text())


def general_ppl(folder: Path) -> dict:
    """Perplexity on the general evaluation split of the base as held while training, without and with the
    adapter (as trained: the adapters unmerged on the quantized base); kept in the arm's folder."""
    cached = folder / "general.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    import torch

    from ligero.eval.data import wikipedia_split
    from ligero.eval.perplexity import window_bos
    from ligero.eval.quality import compare_models
    from ligero.eval.variants import build_variant
    from ligero.lab.finetune import load_with_adapter

    tuned, meta = load_with_adapter(folder)
    scheme = meta["base"]["scheme"]
    base = build_variant(MODEL, None if scheme == "fp32" else scheme)
    ids = base.tokenizer.encode(wikipedia_split("eval").text, add_bos=False)
    with torch.no_grad():
        res = compare_models(base.model, tuned.model, ids, ctx=512, max_tokens=GENERAL_TOKENS,
                             bos=window_bos(base.tokenizer))
    out = {"ppl_before": res.ppl_base, "ppl_after": res.ppl, "delta_pct": res.delta_ppl_pct, "tokens": res.tokens}
    cached.write_text(json.dumps(out))
    return out


def audit_adapter(folder: Path, budget: str, out: Path) -> dict:
    from ligero.card.publish import run_audit
    from ligero.eval.audit import Audit

    audit = Audit(adapter=folder, budget=budget, out=out / "audit")
    report = run_audit(audit)
    from ligero.eval.metrics import METRICS

    samples = "; ".join(t for m in METRICS if (t := m.report_samples(report["budget"])))
    return {"run_id": audit.run_id, "budget": budget, "samples": samples, "variants": report["variants"],
            "rows": report["rows"],
            "findings": [c for c in report["findings"]["claims"] if c["finding"]],
            "report": str((audit.folder / "report.md").relative_to(ROOT)) if audit.folder.is_relative_to(ROOT)
            else str(audit.folder / "report.md")}


def table(results: dict) -> list[str]:
    lines = ["| domain | base held in | domain PPL before | after | gain (PPL) | gain vs LoRA fp32 | general PPL "
             "before | after (forgetting) | s / step | RSS at step 1 (MB) | peak RSS (MB) | adapter (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in results["arms"].items():
        domain, scheme = key.split("/")
        ref = results["arms"][f"{domain}/fp32"]
        gain = r["heldout_ppl_before"] - r["heldout_ppl_after"]
        ref_gain = ref["heldout_ppl_before"] - ref["heldout_ppl_after"]
        g = r["general"]
        lines.append(f"| {domain} | {scheme} | {r['heldout_ppl_before']:.2f} | {r['heldout_ppl_after']:.2f} | "
                     f"{gain:.2f} | {100 * gain / ref_gain:.1f} % | {g['ppl_before']:.2f} | {g['ppl_after']:.2f} "
                     f"({g['delta_pct']:+.1f} %) | {r['seconds_per_step']:.2f} | {r['train_start_rss_mb']:.0f} | "
                     f"{r['train_peak_rss_mb']:.0f} | "
                     f"{r['adapter_mb']:.2f} |")
    return lines


def verdicts(results: dict) -> list[str]:
    out = []
    for domain in sorted({k.split("/")[0] for k in results["arms"]}):
        ref, q = results["arms"][f"{domain}/fp32"], results["arms"].get(f"{domain}/int4")
        if q is None:
            continue
        ref_gain = ref["heldout_ppl_before"] - ref["heldout_ppl_after"]
        gain = q["heldout_ppl_before"] - q["heldout_ppl_after"]
        within = gain >= 0.95 * ref_gain
        lower_mem = q["train_peak_rss_mb"] < ref["train_peak_rss_mb"]
        out.append(f"- **{domain}**: QLoRA on the int4 base gains {gain:.2f} PPL points ({100 * gain / ref_gain:.1f} % "
                   f"of LoRA on fp32's {ref_gain:.2f}): {'within' if within else 'NOT within'} 5 % of it; peak "
                   f"memory while training {q['train_peak_rss_mb']:.0f} MB vs {ref['train_peak_rss_mb']:.0f} MB "
                   f"({'lower' if lower_mem else 'NOT lower'}); final domain PPL {q['heldout_ppl_after']:.2f} vs "
                   f"{ref['heldout_ppl_after']:.2f}. Before the first step the process holds "
                   f"{ref['train_start_rss_mb'] - q['train_start_rss_mb']:.0f} MB less (the base's weights); at the "
                   f"peak {ref['train_peak_rss_mb'] - q['train_peak_rss_mb']:.0f} MB less, because each 4-bit layer "
                   "is dequantized for its product, forward and backward, and those temporaries (with the "
                   "activations, the same in both) take part of the saving back.")
    return out


def nf4_lines(results: dict) -> list[str]:
    """What the int4 result means for this model, and the NF4 base beside it."""
    out = ["Read the int4 rows with this in mind: int4 (group 32, asymmetric) is the grid of the published Q4_1 file "
           "this model comes from, so the int4 base is near-lossless by construction and starts where fp32 does. "
           "NF4 (group 64, QLoRA's format) re-rounds those weights to another grid:"]
    for domain in sorted({k.split("/")[0] for k in results["arms"]}):
        ref, nf4 = results["arms"][f"{domain}/fp32"], results["arms"].get(f"{domain}/nf4")
        if nf4 is None:
            continue
        start = 100 * (nf4["heldout_ppl_before"] / ref["heldout_ppl_before"] - 1)
        end = 100 * (nf4["heldout_ppl_after"] / ref["heldout_ppl_after"] - 1)
        out.append(f"- {domain}: the NF4 base starts {start:+.1f} % above fp32's domain perplexity and QLoRA ends "
                   f"{end:+.1f} % above LoRA on fp32: the adapters recover most, not all, of what NF4 loses here.")
    return out


def audit_lines(audit: dict) -> list[str]:
    lines = [f"Audit `{audit['run_id']}` (report: `{audit['report']}`):", "",
             "| variant | domain PPL | Δ domain PPL % | general PPL | ΔPPL % | CrowS-Pairs % stereotype | StereoSet ss "
             "| toxicity (expected max) |", "|---|---|---|---|---|---|---|---|"]

    def f(row: dict, key: str, fmt: str = "{:.2f}") -> str:
        value = row.get(key)
        return "n/a" if value is None else fmt.format(value)

    for name, row in audit["rows"].items():
        lines.append(f"| {name} | {f(row, 'domain_ppl')} | {f(row, 'domain_delta_ppl_pct', '{:+.1f}')} | "
                     f"{f(row, 'ppl')} | {f(row, 'delta_ppl_pct', '{:+.1f}')} | {f(row, 'pct_stereotype', '{:.1f}')} "
                     f"| {f(row, 'stereoset_ss', '{:.1f}')} | {f(row, 'expected_max_toxicity', '{:.3f}')} |")
    lines += ["", f"Samples ({audit['budget']} budget): {audit['samples']}."]
    found = audit["findings"]
    lines += ["", "Findings after Benjamini-Hochberg across every variant x metric comparison: "
              + ("; ".join(f"{c['variant']}: {c['label']} {c['delta']:+.3g} (p {c['p_value']:.2g}, n {c['n']})"
                           for c in found) if found else "none.")]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "ligero-out" / "finetune-bench"))
    ap.add_argument("--audit-budget", default="standard", choices=["quick", "standard", "none"])
    ap.add_argument("--docs", default=str(ROOT / "docs"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load = ForeignLoad().start()
    t0 = time.perf_counter()
    settings = {k: (str(Path(v).resolve().relative_to(ROOT)) if k in ("out", "docs") and Path(v).resolve()
                    .is_relative_to(ROOT) else v) for k, v in vars(args).items()}  # no machine paths in docs/
    results: dict = {"machine": machine(), "model": MODEL, "settings": settings, "arms": {}}
    for domain, scheme in ARMS:
        meta = train_arm(domain, scheme, out, args)
        folder = out / f"{domain}-{scheme}"
        arm = {k: meta[k] for k in ("heldout_ppl_before", "heldout_ppl_after", "seconds", "train_peak_rss_mb",
                                    "train_start_rss_mb", "build_peak_rss_mb", "trainable_parameters")}
        # the median step: the held-out evaluations between steps are not training time
        steps = [b["seconds"] - a["seconds"] for a, b in zip(meta["curve"], meta["curve"][1:])]
        arm.update(seconds_per_step=statistics.median(steps),
                   tokens=meta["train"]["steps"] * meta["train"]["batch_rows"] * meta["train"]["seq_len"],
                   adapter_mb=(folder / "adapter.safetensors").stat().st_size / 1e6,
                   data={k: meta["data"][k] for k in ("train_sha256", "heldout_sha256", "train_tokens",
                                                      "heldout_tokens")},
                   curve=meta["curve"], general=general_ppl(folder),
                   # how much of the machine other processes took while the arm trained (its timings' caveat)
                   foreign_cpu_share=json.loads((folder / "train" / "train.jsonl").read_text().splitlines()[-1])
                   .get("foreign_cpu_share", 0.0))
        results["arms"][f"{domain}/{scheme}"] = arm
        print(f"{domain}/{scheme}: domain PPL {arm['heldout_ppl_before']:.2f} -> {arm['heldout_ppl_after']:.2f}, "
              f"general {arm['general']['ppl_before']:.2f} -> {arm['general']['ppl_after']:.2f}, "
              f"{arm['seconds_per_step']:.2f} s/step, peak {arm['train_peak_rss_mb']:.0f} MB", flush=True)
    if args.audit_budget != "none":
        results["audit"] = audit_adapter(out / "legal-nf4", args.audit_budget, out)
    results["foreign_load"] = load.share()
    results["seconds"] = time.perf_counter() - t0
    docs = Path(args.docs)
    (docs / "finetune.json").write_text(json.dumps(results, indent=1))
    m = results["machine"]
    tokens = next(iter(results["arms"].values()))["tokens"]
    md = ["# Fine-tuning: LoRA on fp32 vs QLoRA on a 4-bit base", "",
          f"Generated by `benchmarks/finetune.py` at commit `{m['commit']}` on {m['cpu']} ({m['threads']} threads, "
          f"torch {m['torch']}); other processes used at most "
          f"{max(a['foreign_cpu_share'] for a in results['arms'].values()):.1%} of the CPU while an arm trained.", "",
          f"{MODEL}; every arm: the same {tokens:,} training tokens ({args.steps} steps x {args.batch} sequences x "
          f"{args.seq_len} tokens, the same batches by seed), LoRA rank {args.rank}, alpha {2 * args.rank}, dropout "
          f"0.05 on q/k/v, o, gate/up and down projections, gradient checkpointing (as QLoRA trains), AdamW at lr "
          f"{args.lr:g} (cosine, 5 % warm-up), seed 0. "
          "Domain perplexity: the domain's held-out documents (10 % by hash), windows of the training length, up to "
          "8,192 tokens, before and after, each arm against its own base (the base as held while training). "
          f"Forgetting: perplexity on {GENERAL_TOKENS:,} tokens of the general evaluation split (Wikipedia, windows "
          "of 512) without and with the adapter. Peak RSS: the process's peak while training (the base as held, "
          "adapters, optimizer state, activations), after loading.", "",
          *table(results), "", "## Against the acceptance test", "", *verdicts(results), "", *nf4_lines(results), "",
          "The learning rate is one value for every arm (the comparison is of the base's precision under one "
          "recipe, as in the QLoRA paper), not tuned per arm; one seed per arm, so differences of a few percent in "
          "the gains are within what a second seed could move.", ""]
    if "audit" in results:
        md += ["## The audit of the QLoRA (NF4) legal adapter", "",
               f"`ligero audit --adapter {out.name}/legal-nf4 --budget {args.audit_budget}`: the base (fp32) is the "
               "baseline; `ft` is the fine-tuned model (adapter merged into the base's full-precision weights), "
               "`ft+<scheme>` that model quantized.", "", *audit_lines(results["audit"]), ""]
    (docs / "finetune.md").write_text("\n".join(md))
    print(f"wrote {docs / 'finetune.md'} in {results['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
