"""Real scale: TinyLlama-1.1B- and Mistral-7B-shaped GGUFs (seeded random weights) run by Ligero and by llama.cpp
on the same files, in one run: load time, peak memory, prefill and decode speed, and the share of the machine's
measured read bandwidth each engine's decode reaches.

Files (written once to LIGERO_CACHE/bench-scale, never committed): Q8_0 and Q4_0 are written tensor by tensor
(gguf's quantizers: llama.cpp's reference algorithms; every matrix in the file's type, as `llama-quantize --pure`),
Q4_K_M by llama.cpp's quantizer from the Q8_0 file (needs the bench extra), F16 for the 1.1B shape only (the 7B
one would be 14.5 GB). Mistral-7B's sliding window (4096) is left out of the file: both engines attend over at
most prefill + decode tokens here.
Each measurement runs in its own child process (`--child`), so each engine's peak RSS is its own: Ligero loads
the file as shipped (`load_model(path, keep_quantized=True, int8_activations=True)`: packed, no fp32 copy, Q8_0 /
Q4_0 layers on activations rounded to int8 per 32 as llama.cpp computes them; K-quant layers keep fp32
activations, where llama.cpp rounds them to int8 per 256), llama.cpp memory-maps it.
Protocol as benchmarks/vs_llamacpp.py (batch 1, --threads each): prefill = one forward over --prefill-tokens into
an empty cache; decode = --decode-tokens greedy steps after a 16-token prompt. --rounds interleaved rounds,
alternating which engine goes first; medians reported. Bandwidth: a 2 GB read (torch sum, --threads threads),
the best of 7 passes before and after the runs; decode's share = bytes of weights per token x tok/s / bandwidth.

    python benchmarks/scale.py                                # both shapes, Q8_0 / Q4_0 / Q4_K_M (+ F16 at 1.1B)
    python benchmarks/scale.py --shapes tinyllama-1.1b --types Q4_0 --rounds 1 --out /tmp/scale
Writes docs/scale.json and docs/scale.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHAPES = {
    "tinyllama-1.1b": {"dim": 2048, "n_layers": 22, "ffn_dim": 5632, "n_heads": 32, "n_kv_heads": 4,
                       "vocab_size": 32000, "context": 2048, "rope_theta": 10000.0, "tied": False},
    "mistral-7b": {"dim": 4096, "n_layers": 32, "ffn_dim": 14336, "n_heads": 32, "n_kv_heads": 8,
                   "vocab_size": 32000, "context": 32768, "rope_theta": 1000000.0, "tied": False},
}
TYPES = ("F16", "Q8_0", "Q4_0", "Q4_K_M")
RSS_BOUND = 1.3  # issue 12: peak RSS <= 1.3 x the file (+ the KV cache)


# ---------------------------------------------------------------------------------------------------------------------
# Files.

def file_stem(shape_name: str) -> str:
    digest = hashlib.sha256(json.dumps(SHAPES[shape_name], sort_keys=True).encode()).hexdigest()[:8]
    return f"{shape_name}-random-{digest}"


def write_quantized_shape(path: Path, shape: dict, type_name: str, seed: int = 0) -> Path:
    """`shape` as a llama GGUF whose matrices are all `type_name` (Q8_0 or Q4_0), streamed: one tensor is generated,
    quantized and written at a time (a 7B file needs about one tensor of memory, not the model)."""
    if path.exists():
        return path
    import gguf
    import numpy as np
    from gguf.quants import quantize

    from vs_llamacpp import add_shape_metadata, shape_tensors

    qtype = gguf.GGMLQuantizationType[type_name]
    ftype = {"Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[type_name]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    w = gguf.GGUFWriter(str(partial), "llama")
    add_shape_metadata(w, shape, f"random-weight {path.stem}", ftype)
    tensors = shape_tensors(shape)
    for name, dims in tensors:
        if len(dims) == 1:
            w.add_tensor_info(name, dims, np.dtype(np.float32), dims[0] * 4)
        else:
            w.add_tensor_info(name, (dims[0], dims[1] // block * size), np.dtype(np.uint8),
                              dims[0] * dims[1] // block * size, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for i, (name, dims) in enumerate(tensors):
        if len(dims) == 1:
            w.write_tensor_data(np.ones(dims, dtype=np.float32))
            continue
        values = rng.standard_normal(dims, dtype=np.float32)
        values *= np.float32(0.02)
        w.write_tensor_data(quantize(values, qtype))
        del values
        if i % 25 == 0:
            print(f"  {path.name}: {i + 1}/{len(tensors)} tensors, {time.perf_counter() - t0:.0f} s", flush=True)
    w.close()
    partial.rename(path)
    return path


def make_files(shape_name: str, types: list[str], cache: Path, threads: int) -> dict[str, Path]:
    from vs_llamacpp import llamacpp_quantize, quiet_llamacpp, write_shape_gguf

    stem, shape, files = file_stem(shape_name), SHAPES[shape_name], {}
    for t in types:
        if t == "F16":
            if shape_name == "mistral-7b":
                print("  F16 is skipped at the 7B shape (a 14.5 GB file)", flush=True)
                continue
            files[t] = write_shape_gguf(cache / f"{stem}-F16.gguf", shape)
        elif t in ("Q8_0", "Q4_0"):
            files[t] = write_quantized_shape(cache / f"{stem}-{t}.gguf", shape, t)
        else:
            try:
                import llama_cpp
            except ImportError:
                print(f"  {t} needs llama.cpp's quantizer (the bench extra): skipped", flush=True)
                continue
            quiet_llamacpp(llama_cpp)
            source = write_quantized_shape(cache / f"{stem}-Q8_0.gguf", shape, "Q8_0")
            files[t] = llamacpp_quantize(llama_cpp, source, cache / f"{stem}-{t}.gguf", t, threads)
    return files


# ---------------------------------------------------------------------------------------------------------------------
# One measurement per child process.

def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: of its own address space; ru_maxrss would carry over the parent's peak
    across fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e6  # KiB -> MB (10^6 bytes, as the file sizes)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


def child_ligero(path: Path, threads: int, prefill: int, decode: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    import ligero.kernels
    from ligero.eval.speed import measure_speed
    from ligero.io.checkpoint import load_model

    ligero.kernels.warm()
    base = peak_rss_mb()
    t0 = time.perf_counter()
    loaded = load_model(str(path), device="cpu", keep_quantized=True, int8_activations=True)
    load_s = time.perf_counter() - t0
    loaded_rss = peak_rss_mb()
    res = measure_speed(loaded.model, prefill_tokens=prefill, decode_tokens=decode, repeats=1, warmup=0)
    return {"load_s": load_s, "peak_rss_mb": peak_rss_mb(), "load_peak_rss_mb": loaded_rss, "import_rss_mb": base,
            "prefill_tok_s": res.prefill_tok_s, "decode_tok_s": res.decode_tok_s, "weight_bytes": res.weight_bytes,
            "kv_cache_bytes": res.kv_cache_bytes}


def child_llamacpp(path: Path, threads: int, prefill: int, decode: int) -> dict:
    import llama_cpp

    from vs_llamacpp import LlamaCppEngine, quiet_llamacpp, speed_tokens

    quiet_llamacpp(llama_cpp)
    llama_cpp.llama_backend_init()
    base = peak_rss_mb()
    t0 = time.perf_counter()
    engine = LlamaCppEngine(llama_cpp, path, threads, n_ctx=prefill + decode + 32, n_batch=prefill)
    load_s = time.perf_counter() - t0
    tokens = speed_tokens(engine.n_vocab, prefill)
    prefill_s = engine.time_prefill(tokens)
    decode_s = engine.time_decode(tokens[:16], decode)
    out = {"load_s": load_s, "peak_rss_mb": peak_rss_mb(), "import_rss_mb": base, "prefill_tok_s": prefill / prefill_s,
           "decode_tok_s": decode / decode_s, "weight_bytes": engine.size_bytes}
    engine.close()
    return out


def read_bandwidth_gbs(threads: int, gigabytes: float = 2.0, repeats: int = 7) -> float:
    """Best GB/s of summing a `gigabytes` fp32 buffer with `threads` threads (a streaming read): the fastest of
    `repeats` passes (a read test's slow passes are interference, not the memory's speed)."""
    import torch

    torch.set_num_threads(threads)
    buf = torch.ones(int(gigabytes * 1e9 / 4))
    buf.sum()  # touch every page first
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - t0)
    return gigabytes / min(times)


def run_child(engine: str, path: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--child", engine, "--file", str(path), "--threads", str(args.threads),
           "--prefill-tokens", str(args.prefill_tokens), "--decode-tokens", str(args.decode_tokens)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------------------------------------------------
# The report.

def summarize(runs: list[dict], bandwidth: float) -> list[dict]:
    """Medians per (shape, type, engine) and the Ligero / llama.cpp ratios."""
    rows = []
    for key in dict.fromkeys((r["shape"], r["type"]) for r in runs):
        row = {"shape": key[0], "type": key[1]}
        for engine in ("ligero", "llamacpp"):
            ok = [r for r in runs if (r["shape"], r["type"], r["engine"]) == (*key, engine) and "error" not in r]
            if not ok:
                errors = [r["error"] for r in runs if (r["shape"], r["type"], r["engine"]) == (*key, engine)]
                row[engine] = {"error": errors[0] if errors else "not measured"}
                continue
            med = {k: statistics.median(r[k] for r in ok) for k in ("load_s", "peak_rss_mb", "prefill_tok_s",
                                                                     "decode_tok_s", "weight_bytes", "import_rss_mb")}
            med["rounds"] = len(ok)
            med["file_bytes"] = ok[0]["file_bytes"]
            med["rss_x_file"] = med["peak_rss_mb"] * 1e6 / med["file_bytes"]
            if "kv_cache_bytes" in ok[0]:
                med["kv_cache_bytes"] = ok[0]["kv_cache_bytes"]
            med["bandwidth_share"] = med["file_bytes"] * med["decode_tok_s"] / (bandwidth * 1e9)
            row[engine] = med
        lig, ref = row["ligero"], row["llamacpp"]
        if "error" not in lig and "error" not in ref:
            row["decode_ratio"] = lig["decode_tok_s"] / ref["decode_tok_s"]
            row["prefill_ratio"] = lig["prefill_tok_s"] / ref["prefill_tok_s"]
            bound = RSS_BOUND * lig["file_bytes"] + lig.get("kv_cache_bytes", 0)
            row["rss_bound_ok"] = lig["peak_rss_mb"] * 1e6 <= bound
            # The same bound on what the load and the run added to the process (its imports excluded: torch alone
            # is ~0.3 GB, a fixed cost that a small file cannot amortize).
            row["rss_bound_net_ok"] = (lig["peak_rss_mb"] - lig["import_rss_mb"]) * 1e6 <= bound
        rows.append(row)
    return rows


def render_markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# Real scale: 1.1B and 7B shapes, Ligero and llama.cpp on the same files",
        "",
        f"Written by `benchmarks/scale.py` at commit `{m['commit']}` on {m['cpu']} ({m['cores']} cores), "
        f"{report['threads']} threads each, {report['rounds']} interleaved rounds (medians), batch 1: prefill "
        f"{report['prefill_tokens']} tokens, decode {report['decode_tokens']} tokens after a 16-token prompt. Files "
        "hold seeded random weights in the real shapes (never committed). Each measurement is its own process: peak "
        "RSS is the engine's own, imports included (the next column: the process before it loads the file, ~0.3 GB "
        "of torch for Ligero). Ligero loads the file as shipped "
        "(packed, no fp32 copy; activations rounded to int8 as llama.cpp rounds them: per 32 inputs for Q8_0 / "
        "Q4_0, per 256 (Q8_K) for the K-quants); "
        "llama.cpp memory-maps it. Read bandwidth measured in the same run: "
        f"**{report['bandwidth_gbs']:.1f} GB/s** ({report['threads']} threads, 2 GB torch sum); a decode's share = "
        "file bytes x tok/s / bandwidth.",
        "",
        "| shape | file | GB | engine | load s | peak RSS GB (x file) | of which imports GB | prefill tok/s | "
        "decode tok/s | bandwidth share | Ligero / llama.cpp |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        for engine, label in (("ligero", "Ligero"), ("llamacpp", "llama.cpp")):
            e = row[engine]
            head = f"| {row['shape']} | {row['type']} | "
            if "error" in e:
                lines.append(head + f" | {label} | {e['error'][:80]} | | | | | | |")
                continue
            ratio = ""
            if engine == "ligero" and "decode_ratio" in row:
                rss = ("within" if row["rss_bound_ok"] else
                       "OVER" + (" (within, net of the imports)" if row.get("rss_bound_net_ok") else ""))
                ratio = (f"decode {row['decode_ratio']:.2f}x, prefill {row['prefill_ratio']:.2f}x, RSS {rss} "
                         f"{RSS_BOUND}x file + KV")
            lines.append(head + f"{e['file_bytes'] / 1e9:.2f} | {label} | {e['load_s']:.1f} | "
                         f"{e['peak_rss_mb'] / 1e3:.2f} ({e['rss_x_file']:.2f}x) | {e['import_rss_mb'] / 1e3:.2f} | "
                         f"{e['prefill_tok_s']:.1f} | "
                         f"{e['decode_tok_s']:.2f} | {e['bandwidth_share']:.0%} | {ratio} |")
    shares = [row[e]["bandwidth_share"] for row in report["rows"] for e in ("ligero", "llamacpp")
              if "error" not in row[e]]
    if shares and max(shares) > 1:
        lines += ["", "Shares above 100 %: decode read faster than this run's read test did "
                  f"({report['bandwidth_gbs']:.1f} GB/s, the median of 5 torch sums at the start; runs since measure "
                  "the best pass, before and after): compare the shares between engines, not with 100 %."]
    if any(row["type"] == "F16" for row in report["rows"]):
        lines += ["", "F16: Ligero holds the 16-bit matrices in 16 bits (widened to fp32 in its kernels, fp32 sums; "
                  "prefill widens a block of rows at a time for torch's GEMM), llama.cpp keeps the file mapped."]
    lines += ["", "Issue 12's bounds: decode >= 0.9x and prefill >= 0.8x llama.cpp, peak RSS <= 1.3x the file plus the "
              "KV cache (judged on the whole process, and on what the load and the run added to it). A row that "
              "misses one says so above; `docs/scale.json` has every round."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--types", default=",".join(TYPES), help=f"comma-separated, of {', '.join(TYPES)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prefill-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "docs"))
    ap.add_argument("--markdown-only", action="store_true", help="rewrite scale.md from scale.json in --out")
    ap.add_argument("--child", choices=["ligero", "llamacpp"], help=argparse.SUPPRESS)
    ap.add_argument("--file", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.markdown_only:
        out = Path(args.out)
        (out / "scale.md").write_text(render_markdown(json.loads((out / "scale.json").read_text())))
        return 0
    if args.child:
        child = child_ligero if args.child == "ligero" else child_llamacpp
        print(json.dumps(child(Path(args.file), args.threads, args.prefill_tokens, args.decode_tokens)), flush=True)
        return 0

    from common import machine
    from ligero.paths import cache_root

    shapes, types = args.shapes.split(","), args.types.split(",")
    unknown = [s for s in shapes if s not in SHAPES] + [t for t in types if t not in TYPES]
    if unknown:
        raise SystemExit(f"scale: unknown shape or type {unknown}; shapes {list(SHAPES)}, types {list(TYPES)}")
    try:
        import llama_cpp  # noqa: F401
        engines = ["ligero", "llamacpp"]
    except ImportError:
        print("scale: llama-cpp-python is not installed (make bench-llamacpp): measuring Ligero alone", flush=True)
        engines = ["ligero"]
    cache = cache_root() / "bench-scale"
    files = {(s, t): p for s in shapes for t, p in make_files(s, types, cache, args.threads).items()}
    bandwidth = read_bandwidth_gbs(args.threads)
    print(f"read bandwidth {bandwidth:.1f} GB/s", flush=True)
    runs = []
    for r in range(args.rounds):
        for (shape, type_name), path in files.items():
            order = engines if r % 2 == 0 else engines[::-1]
            for engine in order:
                res = run_child(engine, path, args)
                res.update(shape=shape, type=type_name, engine=engine, round=r, file_bytes=path.stat().st_size)
                runs.append(res)
                print(f"round {r + 1}: {shape} {type_name} {engine}: " + (res.get("error") or
                      f"load {res['load_s']:.1f} s, RSS {res['peak_rss_mb'] / 1e3:.2f} GB, prefill "
                      f"{res['prefill_tok_s']:.1f}, decode {res['decode_tok_s']:.2f} tok/s"), flush=True)
    bandwidth = max(bandwidth, read_bandwidth_gbs(args.threads))  # measured again after the runs: the better one
    report = {"machine": machine(), "threads": args.threads, "rounds": args.rounds,
              "prefill_tokens": args.prefill_tokens, "decode_tokens": args.decode_tokens,
              "bandwidth_gbs": bandwidth, "rows": summarize(runs, bandwidth), "runs": runs}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "scale.md").write_text(render_markdown(report))
    print(f"wrote {out / 'scale.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
