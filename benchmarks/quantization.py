"""Quantization catalog benchmark: every scheme on the built-in models, against the unquantized fp32 baseline.

Quality on the evaluation split (same tokens for base and variant): PPL, ΔPPL %, mean KLD, same top token %;
storage: bits per weight and MB actually stored; speed: prefill (512 tokens) and batch-1 decode tok/s.
Finished (model, scheme) results are cached in ligero-out/bench-quant/ so an interrupted run resumes.

    python benchmarks/quantization.py [--models smollm2-135m,gemma3-270m] [--schemes int8,int4,...]
Writes docs/quantization.json and docs/quantization.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import ForeignLoad, machine  # noqa: E402
from ligero.eval.data import wikipedia_split  # noqa: E402
from ligero.eval.perplexity import window_bos  # noqa: E402
from ligero.eval.quality import compare_models  # noqa: E402
from ligero.eval.speed import kv_cache_mb, measure_speed  # noqa: E402
from ligero.eval.variants import BASELINE, build_variant, calibration_windows  # noqa: E402

SCHEMES = [BASELINE, "int8", "int8-a8", "int4", "int4-sym", "int4-a8", "int4-sym-a8", "int4-g128", "int3", "adaround",
           "lsq", "w8a8-naive", "w8a8", "fp8", "fp8-e5m2", "mxfp4", "nvfp4", "mxfp4-w4a4", "nvfp4-w4a4", "b158", "kv4",
           "kv3", "kv2", "int4+kv3", "q4_k_m", "q5_k_m", "q6_k", "q3_k_m", "q5_0"]
NOTES = {
    BASELINE: "dequantized GGUF weights (the published files are 4/5-bit): the baseline",
    "int8-a8": "activations rounded to int8 per 32 inputs (llama.cpp's Q8_0 x Q8_0 arithmetic)",
    "int4": "group 32, asymmetric, round-to-nearest",
    "int4-sym": "group 32, symmetric (GGUF Q4_0's grid)",
    "int4-a8": "int4 x activations rounded to int8 per 32 inputs (llama.cpp's Q4_1 x Q8_1)",
    "int4-sym-a8": "Q4_0's grid x int8 activations per 32 inputs (llama.cpp's Q4_0 x Q8_0)",
    "int4-g128": "group 128, round-to-nearest",
    "int3": "group 128, stored 3 bits per code",
    "adaround": "int4 group 128, learned rounding (calibration split)",
    "lsq": "int4 group 128, LSQ+ (learned steps and offsets from RTN, 60 distillation steps)",
    "w8a8": "SmoothQuant alpha 0.5, calibrated",
    "fp8": "E4M3 weights and activations",
    "fp8-e5m2": "E5M2 weights and activations",
    "mxfp4": "weight-only", "nvfp4": "weight-only",
    "b158": "post-training ternarization (BitNet needs training; see the lab)",
    "kv4": "fp32 weights, 4-bit KV (KIVI: group 32, residual 128, packed)",
    "q4_k_m": "llama-quantize's Q4_K_M mix, llama.cpp's algorithm (widths not a multiple of 256 fall back to "
              "Q5_0 / Q8_0, as in llama.cpp)",
    "q5_k_m": "llama-quantize's Q5_K_M mix (fallbacks Q5_1 / Q8_0)",
    "q6_k": "llama-quantize's Q6_K (fallback Q8_0)",
    "q3_k_m": "llama-quantize's Q3_K_M mix (fallbacks Q4_0 / Q5_0 / Q5_1 / Q8_0)",
    "q5_0": "GGUF Q5_0 on every block linear",
}
KV_CONTEXT = 1024  # tokens in the cache when its size is measured (the decode benchmark's cache is short)


def run_one(model_id: str, scheme: str, base, ids, calibration, args) -> dict:
    variant = build_variant(model_id, scheme, calibration=calibration)
    seconds = variant.info["quantize_seconds"]
    quality = compare_models(base.model, variant.model, ids, ctx=512, max_tokens=args.max_tokens,
                             bos=window_bos(base.tokenizer))
    speed = measure_speed(variant.model, prefill_tokens=512, decode_tokens=args.decode_tokens, repeats=args.repeats)
    return {"model": model_id, "scheme": scheme, "commit": machine()["commit"], "note": NOTES.get(scheme, ""),
            "quantize_seconds": round(seconds, 1),
            **quality.summary(), "prefill_tok_s": speed.prefill_tok_s, "decode_tok_s": speed.decode_tok_s,
            "decode_runs_s": speed.decode_runs_s, "kv_cache_mb": kv_cache_mb(variant.model, KV_CONTEXT)}


def row_commits(results: list[dict]) -> str:
    """Resumed runs mix rows from several commits: say which row was measured where."""
    by_commit: dict[str, list[str]] = {}
    for r in results:
        by_commit.setdefault(r["commit"], []).append(f"{r['model'].split('-')[0]}:{r['scheme']}")
    return "Rows come from cached results of earlier runs (the code paths they measure have not changed since): " + \
        "; ".join(f"commit `{c}`: {', '.join(rows)}" for c, rows in by_commit.items()) + "."


def kv_decode_share(report: dict) -> str:
    """KV-only schemes' decode speed as a share of the same model's fp32 row, per model (measured, not quoted)."""
    parts = []
    for model_id in report["models"]:
        rows = {r["scheme"]: r for r in report["results"] if r["model"] == model_id}
        if BASELINE not in rows:
            continue
        shares = [rows[s]["decode_tok_s"] / rows[BASELINE]["decode_tok_s"] for s in rows if s.startswith("kv")]
        if shares:
            parts.append(f"{min(shares):.0%}-{max(shares):.0%} ({model_id})")
    return ", ".join(parts) or "an unmeasured share"


def write_markdown(report: dict, path: Path) -> None:
    m = report["machine"]
    lines = [
        "# Quantization catalog: quality, size and speed",
        "",
        f"Generated by `benchmarks/quantization.py` at commit `{m['commit']}` on {report['date']}: {m['cpu']}, "
        f"{m['cores']} cores, {m['threads']} threads, torch {m['torch']}.",
        "",
        f"Quality: the Wikipedia evaluation split (sha256 `{report['eval_sha256'][:16]}`), first "
        f"{report['max_tokens']} tokens in windows of 512, each variant against the fp32 baseline on the same tokens "
        "(llama.cpp's conventions: KLD = mean KL(base || variant) of next-token distributions; top-1 = same top "
        "token). Bits/weight = bytes actually stored (values, scales, minimums, fp32 norms; head and embedding "
        "int8 unless the scheme is KV-only) x 8 / weights. Speed: prefill of 512 tokens, batch-1 decode of "
        f"{report['decode_tokens']} tokens, median of {report['repeats']}. Calibration: "
        f"{report['calib_windows']} windows of 256 tokens from the calibration split (disjoint from evaluation).",
        "",
        *([report["provenance"], ""] if report.get("provenance") else []),
        *([row_commits(report["results"]), ""] if len({r["commit"] for r in report["results"]}) > 1 else []),
        "**Baseline caveat:** both published models are already 4/5-bit GGUF files (SmolLM2 Q4_1, Gemma 3 Q4_K_M); "
        "the fp32 baseline is their dequantized weights. Group-32 asymmetric int4 reproduces SmolLM2's Q4_1 grid "
        "almost exactly, which is why it is nearly lossless here.",
        "",
    ]
    for model_id in report["models"]:
        rows = [r for r in report["results"] if r["model"] == model_id]
        if not rows:
            continue
        lines += [f"## {model_id}", "",
                  "| scheme | bits/weight | size MB | PPL | ΔPPL % | KLD | top-1 % | prefill tok/s | decode tok/s "
                  f"| KV MB @{KV_CONTEXT} | note |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        fp32_kv = next((r.get("kv_cache_mb") for r in rows if r["scheme"] == BASELINE), None)
        for r in rows:
            # The KV cache does not depend on the weight format: rows measured before this column existed
            # (without a KV scheme) hold the same full-precision cache as the fp32 row.
            kv = r.get("kv_cache_mb", fp32_kv if "kv" not in r["scheme"] else None)
            kv_mb = f"{kv:.1f}" if kv is not None else "–"
            lines.append(
                f"| {r['scheme']} | {r['bits_per_weight']:.2f} | {r['size_mb']:.1f} | {r['ppl']:.3f} | "
                f"{r['delta_ppl_pct']:+.2f} | {r['kld']:.4f} | {100 * r['top1_agreement']:.1f} | "
                f"{r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | {kv_mb} | {r['note']} |")
        lines.append("")
    missing = [f"{m}:{s}" for m in report["models"] for s in report["schemes"]
               if not any(r["model"] == m and r["scheme"] == s for r in report["results"])]
    if missing:
        lines += [f"Not measured in this run (time): {', '.join(missing)}.", ""]
    lines += [
        f"Other processes used {report['foreign_cpu_share']:.1%} of the machine's CPU time during the run.",
        "",
        "Notes: FP8 and FP4 are computed in fp32 from the exact low-precision values (this CPU has no FP8/FP4 "
        "arithmetic), so their speed is not what FP8/FP4 hardware would give. KV-cache schemes store finished "
        "groups of 32 tokens packed (codes + fp16 minimum and scale) and the newest 128-159 tokens in full "
        f"precision; `KV MB @{KV_CONTEXT}` is what the cache holds after {KV_CONTEXT} tokens. Their quality is "
        "measured without a cache, with every query reading exactly what the packed cache would return. The "
        "decode benchmark's context (16 + 64 tokens) stays inside the residual window; even so its KV decode "
        f"runs at {kv_decode_share(report)} of fp32's speed (packed-KV decode takes the Python step: per-step "
        "residual concatenation and group bookkeeping), and at long context the per-step dequantization of "
        "packed groups costs more (no fused kernel yet).",
    ]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--calib-windows", type=int, default=8)
    ap.add_argument("--skip", default="", help="model:scheme pairs not to run now, e.g. gemma3-270m:adaround")
    ap.add_argument("--cache", default=str(ROOT / "ligero-out" / "bench-quant"))
    ap.add_argument("--out", default=str(ROOT / "docs"))
    ap.add_argument("--markdown-only", action="store_true", help="rewrite quantization.md from quantization.json")
    args = ap.parse_args()
    if args.markdown_only:
        out = Path(args.out)
        write_markdown(json.loads((out / "quantization.json").read_text()), out / "quantization.md")
        return
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    models, schemes = args.models.split(","), args.schemes.split(",")
    text = wikipedia_split("eval")
    load = ForeignLoad().start()
    results = []

    def write() -> None:
        report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
                  "models": models, "schemes": schemes, "max_tokens": args.max_tokens,
                  "decode_tokens": args.decode_tokens, "repeats": args.repeats, "calib_windows": args.calib_windows,
                  "eval_sha256": text.sha256, "foreign_cpu_share": load.share(), "results": results}
        out = Path(args.out)
        (out / "quantization.json").write_text(json.dumps(report, indent=1))
        write_markdown(report, out / "quantization.md")

    for model_id in models:
        base = build_variant(model_id)
        ids = base.tokenizer.encode(text.text, add_bos=False)[: args.max_tokens]
        calibration = calibration_windows(base.tokenizer, args.calib_windows)
        for scheme in schemes:
            key = cache / f"{model_id}__{scheme.replace('+', '_')}__{args.max_tokens}.json"
            if key.exists():
                results.append(json.loads(key.read_text()))
                continue
            if f"{model_id}:{scheme}" in args.skip.split(","):
                continue
            t0 = time.time()
            res = run_one(model_id, scheme, base, ids, calibration, args)
            key.write_text(json.dumps(res, indent=1))
            results.append(res)
            print(f"{model_id} {scheme}: ΔPPL {res['delta_ppl_pct']:+.2f} %, KLD {res['kld']:.4f}, "
                  f"{res['bits_per_weight']:.2f} b/w, decode {res['decode_tok_s']:.1f} tok/s "
                  f"({time.time() - t0:.0f} s)",
                  flush=True)
            write()
    write()


if __name__ == "__main__":
    main()
