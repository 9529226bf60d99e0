"""llama.cpp's K-quant mixes made by Ligero against the same mixes made by llama.cpp's own quantizer, on the
built-in models: perplexity of each file on the same text (evaluated by Ligero: llama.cpp's file loaded as
shipped), and how many tensors are byte-identical.

Both quantizers start from the same weights: llama.cpp's `llama_model_quantize` requantizes the published GGUF
(it dequantizes it to fp32 first; tensors already of the target type are copied), Ligero quantizes the same
dequantized weights (its fp32 baseline). Rows whose width is not a multiple of 256 take llama.cpp's fallback
types on both sides (Q4_0 / Q5_0 / Q5_1 / Q8_0).

    python benchmarks/kquants.py [--models smollm2-135m,gemma3-270m] [--mixes Q4_K_M,Q6_K,Q3_K_M]
Writes docs/kquants.json and docs/kquants.md. Needs the bench extra (`make bench-llamacpp`).
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

BOUND_PCT = 1.0  # issue 12: Ligero's file within 1 % (relative) of llama.cpp's perplexity


def tensor_bytes(path: Path) -> dict[str, tuple[str, bytes]]:
    from ligero.io.gguf_file import GGUFFile

    return {name: (t.tensor_type.name, t.data.tobytes()) for name, t in GGUFFile(path).tensors.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--mixes", default="Q4_K_M,Q6_K,Q3_K_M")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "docs"))
    args = ap.parse_args(argv)
    try:
        import llama_cpp
    except ImportError:
        print("kquants: llama-cpp-python is not installed; run: make bench-llamacpp", file=sys.stderr)
        return 2
    import torch

    from common import machine
    from ligero.errors import LigeroError
    from ligero.eval.data import wikipedia_split
    from ligero.eval.perplexity import perplexity
    from ligero.eval.variants import build_variant
    from ligero.io.checkpoint import load_model
    from ligero.io.gguf_export import export_gguf
    from ligero.paths import cache_root
    from vs_llamacpp import llamacpp_quantize, quiet_llamacpp, source_gguf

    torch.set_num_threads(args.threads)
    quiet_llamacpp(llama_cpp)
    text = wikipedia_split("eval")
    cache = cache_root() / "llamacpp"
    rows = []
    for model_id in args.models.split(","):
        source = source_gguf(model_id)
        base = build_variant(model_id)
        ids = base.tokenizer.encode(text.text, add_bos=False)[: args.max_tokens]
        base_ppl = perplexity(base.model, base.tokenizer, ids, ctx=512).ppl
        del base
        for mix in args.mixes.split(","):
            row = {"model": model_id, "mix": mix, "base_ppl": base_ppl}
            theirs = llamacpp_quantize(llama_cpp, source, cache / f"{model_id}-{mix}.gguf", mix, args.threads)
            b = tensor_bytes(theirs)
            row["tensors"], row["llamacpp_types"] = len(b), sorted({t for t, _ in b.values()})
            t0 = time.perf_counter()
            try:
                ours = build_variant(model_id, mix.lower())
            except LigeroError as exc:  # q3_k_m / q2_k on widths that are not multiples of 256
                row["ligero_error"] = str(exc)
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
            row["ligero_quantize_s"] = time.perf_counter() - t0
            row["ligero_ppl"] = perplexity(ours.model, ours.tokenizer, ids, ctx=512).ppl
            exported = cache / f"{model_id}-{mix}-ligero.gguf"
            export_gguf(ours.model, source, exported)
            del ours
            a = tensor_bytes(exported)
            row["same_type"] = sum(a[n][0] == b[n][0] for n in b)
            row["identical"] = sum(a[n] == b[n] for n in b)
            try:
                shipped = load_model(str(theirs), device="cpu", keep_quantized=True)
                row["llamacpp_ppl"] = perplexity(shipped.model, shipped.tokenizer, ids, ctx=512).ppl
                row["delta_pct"] = 100 * (row["ligero_ppl"] / row["llamacpp_ppl"] - 1)
            except LigeroError as exc:
                row["llamacpp_error"] = str(exc)
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = {"machine": machine(), "max_tokens": args.max_tokens, "eval_sha256": text.sha256, "rows": rows}
    out = Path(args.out)
    (out / "kquants.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "kquants.md").write_text(render_markdown(report))
    print(f"wrote {out / 'kquants.md'}")
    return 0


def render_markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# llama.cpp's K-quant mixes: made by Ligero vs made by llama.cpp",
        "",
        f"Written by `benchmarks/kquants.py` at commit `{m['commit']}` on {m['cpu']}. Both quantizers start from "
        "the same weights (the published GGUF, dequantized). Perplexity on the first "
        f"{report['max_tokens']} tokens of the Wikipedia evaluation split (sha256 `{report['eval_sha256'][:16]}`), "
        "windows of 512, evaluated by Ligero for both files (llama.cpp's file loaded as shipped). Identical = "
        f"tensors whose type and bytes are the same in both files. Bound (issue 12): |Δ| <= {BOUND_PCT} %.",
        "",
        "| model | mix | fp32 PPL | llama.cpp's file PPL | Ligero's file PPL | Δ % | same type | identical bytes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        theirs = f"{r['llamacpp_ppl']:.3f}" if "llamacpp_ppl" in r else "not read: " + r.get("llamacpp_error", "")[:90]
        if "ligero_error" in r:
            lines.append(f"| {r['model']} | {r['mix']} | {r['base_ppl']:.3f} | {theirs} | not made: "
                         f"{r['ligero_error'][:90]} | – | – | – |")
            continue
        delta = f"{r['delta_pct']:+.3f}" if "delta_pct" in r else "–"
        lines.append(f"| {r['model']} | {r['mix']} | {r['base_ppl']:.3f} | {theirs} | {r['ligero_ppl']:.3f} | "
                     f"{delta} | {r['same_type']}/{r['tensors']} | {r['identical']}/{r['tensors']} |")
    lines += ["", "Where both files hold the same type but not the same bytes, llama.cpp kept the source file's tensor "
              "as it was (its quantizer copies tensors already of the target type, here Gemma 3's published Q4_K / "
              "Q6_K ones) while Ligero requantized the dequantized weights, which is not idempotent."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
