"""Where a decode token's time goes: Ligero's native kernels vs everything else, per scheme and kernel path.

For each scheme the model is built once; each kernel path (torch ops = no Ligero kernels, the portable C++ tier,
and the tier this CPU picks) then decodes batch 1, greedy, after a 16-token prompt, layer by layer
(LIGERO_DECODE_STEP=layers, the reference):
  1. an uninstrumented run gives tok/s;
  2. an instrumented run splits each token's time into: native kernel calls (timed around each call), the rest
     of the linear layers (Python and torch around the kernel, or torch's dequantize + GEMM without kernels), and
     everything else (attention, norms, RoPE, embeddings, the argmax, Python dispatch).
Instrumentation adds a little time of its own, so the split is read against the instrumented total.
With kernels, the same path then runs the native decode step (every layer in one native call, the default): tok/s
uninstrumented, then a run with the step's own timers on (inside the native call: projections, attention).

    python benchmarks/decode_profile.py [--model smollm2-135m] [--schemes fp32,int8,int4,b158,fp8,nvfp4]
        [--paths torch,generic,auto] [--tokens 32] [--threads 2] [--out docs]
Writes decode-profile.json and decode-profile.md under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

import ligero.kernels as kernels  # noqa: E402
from common import ForeignLoad, machine  # noqa: E402
from ligero.eval.variants import BASELINE, build_variant  # noqa: E402
from ligero.models import transformer  # noqa: E402
from ligero.quant import modules  # noqa: E402

PATH_LABELS = {"torch": "torch ops (no Ligero kernels)", "generic": "portable C++ kernels", "avx2": "AVX2 kernels",
               "auto": "this CPU's best tier"}
STEP_LABELS = {"layers": "layer by layer", "native": "native step"}


class TimedKernels:
    """Stands in for the compiled module: times and counts every call, linear kernels and attention apart."""

    def __init__(self, ext):
        self.ext = ext
        self.reset()

    def reset(self) -> None:
        self.seconds, self.calls, self.attention_seconds = 0.0, 0, 0.0

    def __getattr__(self, name):
        fn = getattr(self.ext, name)

        def timed(*args):
            t0 = time.perf_counter()
            result = fn(*args)
            elapsed = time.perf_counter() - t0
            if name.startswith("attend"):
                self.attention_seconds += elapsed
            else:
                self.seconds += elapsed
            self.calls += 1
            return result

        return timed


def use_path(path: str):
    """Switch the process to a kernel path; returns the loaded module (None for torch ops)."""
    os.environ.pop("LIGERO_NO_KERNELS", None)
    if path == "torch":
        os.environ["LIGERO_NO_KERNELS"] = "1"
    else:
        os.environ["LIGERO_KERNELS"] = path
    kernels.cpu_kernels.cache_clear()
    return kernels.cpu_kernels()


def patch_kernels(provider) -> None:
    transformer.cpu_kernels = provider
    modules.cpu_kernels = provider


@torch.inference_mode()
def decode(model, steps: int, seed: int = 0, on_start=lambda: None, on_cache=lambda cache: None) -> float:
    """Seconds for `steps` single-token steps after a 16-token prompt; `on_start()` runs after the prompt."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.cfg.vocab_size, (1, 16), generator=g)
    cache = model.new_cache(1, 16 + steps + 1)
    on_cache(cache)
    logits = model(prompt, kv_cache=cache, last_only=True)
    pos = torch.tensor([[16]])
    on_start()
    t0 = time.perf_counter()
    for _ in range(steps):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        logits = model(nxt, pos, kv_cache=cache)
        pos = pos + 1
    return time.perf_counter() - t0


def linear_layers(model) -> list:
    return [m for m in model.modules() if isinstance(m, (transformer.Linear, modules.QuantizedLinear))]


def set_step(step: str) -> None:
    os.environ["LIGERO_DECODE_STEP"] = step


def native_profile(model, steps: int) -> dict:
    """The native step: tok/s uninstrumented, then the step's own timers (inside the native call) split a run."""
    set_step("native")
    try:
        decode(model, 8)
        plain = decode(model, steps)
        plans, cache_of, head = [], [], {"seconds": 0.0, "start": 0.0}

        def start():  # the plan exists once the prompt ran: time only the decode steps
            plans.append(transformer.native_decode_plan(model, cache_of[0]))
            plans[0].set_profiling(True)
            plans[0].reset_timings()
            head["seconds"] = 0.0

        hooks = [model.lm_head.register_forward_pre_hook(lambda *_: head.update(start=time.perf_counter())),
                 model.lm_head.register_forward_hook(
                     lambda *_: head.update(seconds=head["seconds"] + time.perf_counter() - head["start"]))]
        try:
            total = decode(model, steps, on_start=start, on_cache=cache_of.append)
        finally:
            for h in hooks:
                h.remove()
        linear_s, attention_s = plans[0].timings()
        linear_s += head["seconds"]  # the output head runs after the step, as a module
        plans[0].set_profiling(False)
    finally:
        set_step("layers")
    per_token = lambda s: 1000 * s / steps  # noqa: E731
    return {"tok_s": steps / plain, "ms_per_token": per_token(plain), "instrumented_ms_per_token": per_token(total),
            "kernel_ms": per_token(linear_s), "linear_other_ms": 0.0, "attention_kernel_ms": per_token(attention_s),
            "rest_ms": per_token(total - linear_s - attention_s), "kernel_calls_per_token": 2.0,
            "linear_layers": len(linear_layers(model))}


def profile(model, ext, steps: int) -> dict:
    set_step("layers")
    decode(model, 8)  # warm-up: caches, layouts, allocator
    plain = decode(model, steps)
    timer = TimedKernels(ext) if ext is not None else None
    patch_kernels(lambda: timer)
    linear = {"seconds": 0.0, "start": 0.0, "depth": 0}  # a layer may call another (a wrapper): time the outer one

    def pre(_module, _inputs):
        if linear["depth"] == 0:
            linear["start"] = time.perf_counter()
        linear["depth"] += 1

    def post(_module, _inputs, _output):
        linear["depth"] -= 1
        if linear["depth"] == 0:
            linear["seconds"] += time.perf_counter() - linear["start"]

    handles = [h for m in linear_layers(model)
               for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    def reset():  # the prompt's prefill is not part of the decode time
        linear["seconds"] = 0.0
        if timer is not None:
            timer.reset()

    try:
        total = decode(model, steps, on_start=reset)
    finally:
        for h in handles:
            h.remove()
        patch_kernels(kernels.cpu_kernels)
    kernel_s = timer.seconds if timer else 0.0
    attention_s = timer.attention_seconds if timer else 0.0
    per_token = lambda s: 1000 * s / steps  # noqa: E731
    return {"tok_s": steps / plain, "ms_per_token": per_token(plain), "instrumented_ms_per_token": per_token(total),
            "kernel_ms": per_token(kernel_s), "linear_other_ms": per_token(linear["seconds"] - kernel_s),
            "attention_kernel_ms": per_token(attention_s),
            "rest_ms": per_token(total - linear["seconds"] - attention_s),
            "kernel_calls_per_token": (timer.calls if timer else 0) / steps,
            "linear_layers": len(linear_layers(model))}


def write_markdown(report: dict, path: Path) -> None:
    m = report["machine"]
    lines = [
        "# Decode time per token: native kernels vs everything else",
        "",
        f"Generated by `benchmarks/decode_profile.py` at commit `{m['commit']}` on {report['date']}: {m['cpu']}, "
        f"{m['cores']} cores, {report['threads']} threads, torch {m['torch']}. Model {report['model']}, batch 1, "
        f"greedy, {report['tokens']} tokens after a 16-token prompt. This CPU's best kernel tier: "
        f"{report['native_tier']}.",
        "",
        "Columns: tok/s from an uninstrumented run; then an instrumented run's milliseconds per token split into "
        "the linear layers' native kernels, the rest of the linear layers (Python/torch around the kernel; without "
        "kernels, torch's dequantize + GEMM), the native decode-attention kernel (torch's SDPA without kernels: "
        "then part of the rest), and everything else (norms, RoPE, KV-cache writes, embedding, argmax, dispatch). "
        "Layer by layer is the reference path (one module call per layer, LIGERO_DECODE_STEP=layers); the native "
        "step (the default; bit-identical logits) runs every layer in one native call, one call per token, timed "
        "by its own timers: projections (kernels, plus any projection that calls back into Python) and "
        "attention, plus the output head (a module after the step); its rest is norms, RoPE, cache writes and "
        "activations in C++, the embedding, the final norm, the argmax and the Python around the call.",
        "",
        "| scheme | kernel path | decode | tok/s | ms/token | linear kernels ms | linear other ms | "
        "attention kernel ms | rest ms | native calls/token |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        flag = " (machine busy)" if r["foreign_cpu_share"] > 0.1 else ""
        lines.append(f"| {r['scheme']} | {PATH_LABELS.get(r['path'], r['path'])}{flag} | "
                     f"{STEP_LABELS[r.get('step', 'layers')]} | {r['tok_s']:.1f} | "
                     f"{r['instrumented_ms_per_token']:.2f} | {r['kernel_ms']:.2f} | {r['linear_other_ms']:.2f} | "
                     f"{r['attention_kernel_ms']:.2f} | {r['rest_ms']:.2f} | {r['kernel_calls_per_token']:.0f} |")
    lines += ["", f"Other processes used {report['foreign_cpu_share']:.1%} of the machine's CPU time during the run; "
              "rows marked busy had more than 10 % during their own measurement.", ""]
    path.write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--schemes", default="fp32,int8,int4,b158,fp8,nvfp4")
    ap.add_argument("--paths", default="torch,generic,auto", help="kernel paths: torch, generic, avx2, auto")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "docs"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    paths = args.paths.split(",")
    for p in paths:  # build every tier before timing anything
        use_path(p)
    native = use_path("auto")
    report = {"model": args.model, "tokens": args.tokens, "threads": args.threads, "machine": machine(),
              "date": time.strftime("%Y-%m-%d"), "native_tier": kernels.warm() if native is not None else "none",
              "results": []}
    whole = ForeignLoad().start()
    for scheme in args.schemes.split(","):
        model = build_variant(args.model, None if scheme == BASELINE else scheme).model
        for p in paths:
            ext = use_path(p)
            load = ForeignLoad().start()
            rows = [{"scheme": scheme, "path": p, "step": "layers", **profile(model, ext, args.tokens)}]
            if ext is not None:
                rows.append({"scheme": scheme, "path": p, "step": "native", **native_profile(model, args.tokens)})
            for row in rows:
                row["foreign_cpu_share"] = load.share()
                report["results"].append(row)
                print(f"{scheme:11s} {p:8s} {row['step']:7s} {row['tok_s']:7.1f} tok/s  linear kernels "
                      f"{row['kernel_ms']:6.2f} ms  linear other {row['linear_other_ms']:6.2f} ms  attention "
                      f"{row['attention_kernel_ms']:5.2f} ms  rest {row['rest_ms']:6.2f} ms", flush=True)
    report["foreign_cpu_share"] = whole.share()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode-profile.json").write_text(json.dumps(report, indent=1))
    write_markdown(report, out / "decode-profile.md")
    print(f"wrote {out / 'decode-profile.md'}")


if __name__ == "__main__":
    main()
