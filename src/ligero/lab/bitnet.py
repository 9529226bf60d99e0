"""`ligero lab bitnet`: BitNet b1.58 trained from scratch against full precision, at several sizes, on the same
tokens and data per size; each arm with its own learning rate from a small sweep; a ternary model of doubled
width (BitNet b1.58 Reloaded's finding); seeds at the smallest size for error bars; the trained ternary models
packed into the runtime's b158 layers and timed beside the full-precision model's fp32 / int8 / int4 variants.

Every run is a `ligero lab train` run folder under --out, so an interrupted lab resumes where it stopped (finished
runs are reused, the others resume from their checkpoints). The document and its figures are written from the
results at the end.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ligero.eval.speed import ForeignLoad
from ligero.lab.runs import RunSpec, best_rate, sweep_rates, train_run
from ligero.lab.trainer import TrainConfig

# Anchors: what the papers report, beside ours (see the document's text for the conditions of each).
ANCHORS = [
    {"source": "BitNet b1.58 (arXiv 2402.17764)", "params": "700M", "fp": "PPL 12.33", "ternary": "PPL 12.87",
     "gap": "+0.54 PPL (+4.4 %)"},
    {"source": "BitNet b1.58 (arXiv 2402.17764)", "params": "1.3B", "fp": "", "ternary": "", "gap": "+0.04 PPL"},
    {"source": "BitNet b1.58 (arXiv 2402.17764)", "params": "3B", "fp": "", "ternary": "",
     "gap": "ternary better than FP16"},
    {"source": "BitNet b1.58 Reloaded (arXiv 2407.09527)", "params": "100K-48M", "fp": "", "ternary": "",
     "gap": "ternary matches only with the hidden size doubled"},
    {"source": "a single-seed TinyStories report (second-hand)", "params": "944K", "fp": "loss 0.9337",
     "ternary": "loss 1.0545", "gap": "+12.9 % loss"},
]


@dataclass(frozen=True)
class Plan:
    sizes: tuple[str, ...]
    steps: int  # optimizer steps of every main run (the same tokens for every arm)
    batch_rows: int = 32
    seq_len: int = 128
    vocab_size: int = 4096
    warmup_fraction: float = 0.1
    lr_grid: dict = field(default_factory=lambda: {"fp": (1e-3, 3e-3, 1e-2), "b158": (3e-3, 1e-2, 3e-2)})
    sweep_fraction: float = 0.3  # sweep runs take this share of the steps
    max_extensions: int = 2  # grid steps added on the side of a best rate found at the edge of the grid
    seeds: tuple[int, ...] = (0, 1, 2)  # at the smallest size
    doubled: str | None = None  # the size whose ternary twin is trained at twice the width
    eval_tokens: int = 16384
    eval_every: int = 25
    speed_repeats: int = 5

    def tokens(self) -> int:
        return self.steps * self.batch_rows * self.seq_len


FULL = Plan(sizes=("xs", "s", "m"), steps=250, doubled="s")
QUICK = Plan(sizes=("test",), steps=16, batch_rows=8, seq_len=64, vocab_size=512,
             lr_grid={"fp": (3e-3, 1e-2), "b158": (1e-2, 3e-2)}, sweep_fraction=0.5, seeds=(0, 1), doubled="test",
             eval_tokens=1024, eval_every=8, speed_repeats=2)


def _arms(plan: Plan) -> list[RunSpec]:
    arms = []
    for size in plan.sizes:
        arms += [RunSpec(size, vocab_size=plan.vocab_size), RunSpec(size, ternary=True, vocab_size=plan.vocab_size)]
    if plan.doubled:
        arms.append(RunSpec(plan.doubled, ternary=True, width_factor=2, vocab_size=plan.vocab_size))
    return arms


def _train_config(plan: Plan, spec: RunSpec, lr: float, seed: int, steps: int) -> TrainConfig:
    # Full precision: cosine, weight decay 0.1. Ternary: the paper's two-stage schedule (weight decay 0.1 then 0).
    return TrainConfig(steps=steps, batch_rows=plan.batch_rows, seq_len=plan.seq_len, lr=lr,
                       warmup_steps=max(1, int(plan.warmup_fraction * steps)),
                       schedule="two_stage" if spec.ternary else "cosine", weight_decay=0.1,
                       eval_every=min(plan.eval_every, steps), eval_tokens=plan.eval_tokens,
                       checkpoint_every=max(1, steps // 5), seed=seed)


def _folder_name(spec: RunSpec, lr: float, seed: int, steps: int) -> str:
    return f"{spec.label}-lr{lr:g}-seed{seed}-steps{steps}"


def run_lab(plan: Plan, out: str | Path, docs: str | Path | None, log=print) -> dict:
    """Every run of the plan (reusing finished ones), then the speed comparison and the document."""
    out = Path(out)
    t_start = time.perf_counter()
    runs: dict[str, dict] = {}

    def run(spec: RunSpec, lr: float, seed: int, steps: int, role: str) -> dict:
        name = _folder_name(spec, lr, seed, steps)
        log(f"[{role}] {name}")
        summary = train_run(spec, _train_config(plan, spec, lr, seed, steps), out / name,
                            log=lambda m: log(f"  {m}"))
        summary["role"], summary["folder"] = role, name
        runs[name] = summary
        return summary

    sweep_steps = max(2, int(plan.sweep_fraction * plan.steps))
    best_lr: dict[str, float] = {}
    sweeps: dict[str, list] = {}
    for spec in _arms(plan):
        results = sweep_rates(plan.lr_grid["b158" if spec.ternary else "fp"],
                              lambda lr: run(spec, lr, 0, sweep_steps, "sweep")["final_eval_loss"],
                              plan.max_extensions, spec.label)
        grid = list(results)
        best_lr[spec.label] = best_rate(results, spec.label)
        sweeps[spec.label] = [{"lr": lr, "eval_loss": results[lr]} for lr in grid]
        edge = best_lr[spec.label] in (grid[0], grid[-1])
        log(f"{spec.label}: learning rate {best_lr[spec.label]:g}" + (" (at the edge of the grid)" if edge else ""))
    main_runs = {}
    for spec in _arms(plan):
        seeds = plan.seeds if spec.size == plan.sizes[0] and spec.width_factor == 1 else plan.seeds[:1]
        main_runs[spec.label] = [run(spec, best_lr[spec.label], s, plan.steps, "main") for s in seeds]
    t_speed, load = time.perf_counter(), ForeignLoad().start()
    speed = _speed(plan, out, main_runs, log)
    shares = [r.get("foreign_cpu_share") for r in runs.values()]
    result = {"plan": _plan_dict(plan), "best_lr": best_lr, "sweeps": sweeps,
              "main": {label: [_brief(r) for r in rs] for label, rs in main_runs.items()},
              "speed": speed, "speed_seconds": time.perf_counter() - t_speed, "speed_foreign_cpu_share": load.share(),
              "invocation_seconds": time.perf_counter() - t_start,  # this call (finished runs are reused)
              "train_seconds": sum(r["train_seconds"] for r in runs.values()),
              # every run as it ran (its own call's wall-clock), whichever invocation trained it
              "runs_seconds": sum(r.get("run_seconds", r["train_seconds"]) for r in runs.values()),
              "runs": len(runs), "max_foreign_cpu_share": max((x for x in shares if x is not None), default=None),
              "runs_without_load_record": sum(x is None for x in shares),
              "data": next(iter(runs.values()))["data"]}
    result["rows"] = _rows(plan, main_runs)
    result.update(provenance())
    (out / "lab-bitnet.json").write_text(json.dumps(result, indent=1))
    if docs is not None:
        write_docs(result, main_runs, Path(docs))
    return result


def _plan_dict(plan: Plan) -> dict:
    d = asdict(plan)
    d["tokens_per_run"] = plan.tokens()
    return d


def _brief(summary: dict) -> dict:
    keep = ("label", "folder", "non_embedding_params", "params", "final_eval_loss", "packed_eval_loss",
            "zero_weight_share", "tokens", "train_seconds", "run_seconds", "foreign_cpu_share", "curve")
    return {k: summary[k] for k in keep if k in summary} | {"seed": summary["train_config"]["seed"],
                                                            "lr": summary["train_config"]["lr"]}


def _mean_sd(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _rows(plan: Plan, main_runs: dict[str, list[dict]]) -> list[dict]:
    """One row per size: the full-precision and ternary arms side by side (mean and sd over seeds)."""
    rows = []
    for size in plan.sizes:
        fp, tern = main_runs[f"{size}-fp"], main_runs[f"{size}-b158"]
        fp_loss, fp_sd = _mean_sd([r["final_eval_loss"] for r in fp])
        t_loss, t_sd = _mean_sd([r["final_eval_loss"] for r in tern])
        row = {"size": size, "non_embedding_params": fp[0]["non_embedding_params"], "seeds": len(fp),
               "fp_loss": fp_loss, "fp_loss_sd": fp_sd, "b158_loss": t_loss, "b158_loss_sd": t_sd,
               "fp_ppl": math.exp(fp_loss), "b158_ppl": math.exp(t_loss),
               "gap_loss_pct": 100 * (t_loss / fp_loss - 1),
               "paired_gaps_pct": [100 * (t["final_eval_loss"] / f["final_eval_loss"] - 1) for f, t in zip(fp, tern)],
               "zero_share": statistics.fmean(r["zero_weight_share"] for r in tern),
               "packed_minus_trained": max(abs(r["packed_eval_loss"] - r["final_eval_loss"]) for r in tern),
               "fp_seconds": statistics.fmean(r["train_seconds"] for r in fp),
               "b158_seconds": statistics.fmean(r["train_seconds"] for r in tern),
               "fp_lr": fp[0]["train_config"]["lr"], "b158_lr": tern[0]["train_config"]["lr"]}
        if plan.doubled == size:
            wide = main_runs[f"{size}x2-b158"][0]
            row.update({"b158x2_loss": wide["final_eval_loss"], "b158x2_params": wide["non_embedding_params"],
                        "b158x2_gap_loss_pct": 100 * (wide["final_eval_loss"] / fp_loss - 1),
                        "b158x2_lr": wide["train_config"]["lr"], "b158x2_seconds": wide["train_seconds"]})
        rows.append(row)
    return rows


# --- down to the kernel ---------------------------------------------------------------------------------------


def _speed(plan: Plan, out: Path, main_runs: dict[str, list[dict]], log) -> list[dict]:
    """Per size: the trained ternary model packed in b158 layers against the full-precision model as fp32 and
    quantized after training to int8 and int4 (and to b158, which post-training destroys): bytes, eval loss,
    decode and prefill tokens/s on this machine."""
    from ligero.eval.speed import measure_speed
    from ligero.io.checkpoint import load_model
    from ligero.lab.data import LabData
    from ligero.lab.trainer import eval_loss
    from ligero.quant.api import quantize
    from ligero.quant.config import recipe_for

    data = LabData.load(plan.vocab_size)
    windows = data.eval_windows(plan.seq_len, plan.eval_tokens)
    rows = []
    for size in plan.sizes:
        fp_folder = out / main_runs[f"{size}-fp"][0]["folder"] / "model"
        tern_folder = out / main_runs[f"{size}-b158"][0]["folder"] / "model"
        fp = load_model(str(fp_folder), device="cpu").model
        models = {"fp32": fp}
        for scheme in ("int8", "int4", "b158"):
            models[f"{scheme} (after training)"] = quantize(copy.deepcopy(fp), recipe_for(scheme))
        models["b158 (trained ternary)"] = load_model(str(tern_folder), device="cpu").model
        for name, model in models.items():
            log(f"speed: {size} {name}")
            s = measure_speed(model, prefill_tokens=plan.seq_len - 1, decode_tokens=plan.seq_len - 17,
                              repeats=plan.speed_repeats)
            rows.append({"size": size, "model": name, "eval_loss": eval_loss(model, windows),
                         "weight_bytes": s.weight_bytes, "decode_tok_s": s.decode_tok_s,
                         "prefill_tok_s": s.prefill_tok_s})
    return rows


# --- the document ---------------------------------------------------------------------------------------------


def _fmt_sd(mean: float, sd: float | None) -> str:
    return f"{mean:.4f}" + (f" ± {sd:.4f}" if sd is not None else "")


def write_docs(result: dict, main_runs: dict[str, list[dict]], docs: Path) -> None:
    from ligero.eval.metrics.plots import pyplot

    docs.mkdir(parents=True, exist_ok=True)
    figures = docs / "lab-bitnet"
    figures.mkdir(exist_ok=True)
    plt = pyplot()
    plan = result["plan"]
    # loss curves: one panel per size, full precision against ternary (seed 0), evaluation loss
    fig, axes = plt.subplots(1, len(plan["sizes"]), figsize=(4.2 * len(plan["sizes"]), 3.4), squeeze=False)
    for ax, size in zip(axes[0], plan["sizes"]):
        for label, color in ((f"{size}-fp", "tab:blue"), (f"{size}-b158", "tab:red"), (f"{size}x2-b158", "tab:purple")):
            if label not in main_runs:
                continue
            curve = [c for c in main_runs[label][0]["curve"] if "eval_loss" in c]
            ax.plot([c["tokens"] / 1e6 for c in curve], [c["eval_loss"] for c in curve], color=color, label=label)
        ax.set_xlabel("training tokens (M)")
        ax.set_ylabel("evaluation loss (nats)")
        ax.set_title(size)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(figures / "curves.png", dpi=110)
    plt.close(fig)
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(5.4, 3.6))
    # error bars: the sd of the seed-paired gaps where there are several seeds
    spread = [statistics.stdev(r["paired_gaps_pct"]) if r["seeds"] > 1 else 0.0 for r in rows]
    ax.errorbar([r["non_embedding_params"] / 1e6 for r in rows], [r["gap_loss_pct"] for r in rows], yerr=spread,
                fmt="o-", capsize=3, color="tab:red", label="b158 vs fp, same width (± sd over seeds)")
    wide = [r for r in rows if "b158x2_loss" in r]
    if wide:  # at its own parameter count, against the full-precision model of the width it doubles
        ax.plot([r["b158x2_params"] / 1e6 for r in wide], [r["b158x2_gap_loss_pct"] for r in wide], "s",
                color="tab:purple", label="b158 at 2x width vs fp of half its width")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xscale("log")
    ticks = sorted({r["non_embedding_params"] / 1e6 for r in rows} | {r["b158x2_params"] / 1e6 for r in wide})
    ax.set_xticks(ticks, [f"{t:.2g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("non-embedding parameters (M)")
    ax.set_ylabel("evaluation loss gap (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(figures / "gap.png", dpi=110)
    plt.close(fig)
    (docs / "lab-bitnet.json").write_text(json.dumps(result, indent=1))
    (docs / "lab-bitnet.md").write_text(render(result))


def render(result: dict) -> str:
    plan, rows, m = result["plan"], result["rows"], result.get("machine", {})
    lines = [
        "# Lab: BitNet b1.58 trained from scratch against full precision",
        "",
        f"Written by `ligero lab bitnet{' --quick' if plan['steps'] < 50 else ''}` at commit "
        f"{result.get('commit', '?')}{' on ' + m['cpu'] if m.get('cpu') else ''} ({m.get('threads', '?')} threads). "
        f"{_timing(result)} Every arm of a "
        f"size sees the same {plan['tokens_per_run']:,} training tokens in the same order ({plan['steps']} steps of "
        f"{plan['batch_rows']} x {plan['seq_len']} tokens, batches drawn by (seed, step)) from the training split "
        f"(sha256 `{result['data']['train_split']['sha256'][:12]}…`, {result['data']['train_tokens']:,} tokens with a "
        f"{result['data']['vocab_size']}-entry BPE trained on it); the loss is measured on the first "
        f"{plan['eval_tokens']:,} tokens of the evaluation split, which shares no passage with training.",
        "",
        "Full precision trains with AdamW, warm-up and a cosine decay, weight decay 0.1. Ternary (BitNet b1.58: "
        "absmean ternary weights per projection, int8 per-token activations, straight-through gradients, "
        "embeddings and head in full precision) with the paper's two-stage schedule: the rate decays over the "
        "first half, drops, and decays again, weight decay 0.1 then 0. Each arm's peak learning rate is the best "
        f"of a sweep on runs of {int(plan['sweep_fraction'] * 100)} % of the steps, the grid extended by its own ratio "
        "when the best rate lay at its edge (table below).",
        "",
        "| size | non-embedding params | seeds | fp loss | b158 loss | gap (loss) | fp PPL | b158 PPL | b158 at 2x "
        "width: loss (gap) | zero trits | fp s / run | b158 s / run |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        wide = (f"{r['b158x2_loss']:.4f} ({r['b158x2_gap_loss_pct']:+.1f} %, {r['b158x2_params'] / 1e6:.1f}M)"
                if "b158x2_loss" in r else "")
        gap = f"{r['gap_loss_pct']:+.1f} %"
        if r["seeds"] > 1:
            sd = statistics.stdev(r["paired_gaps_pct"])
            gap += f" (paired by seed: ± {sd:.1f})"
        lines.append(f"| {r['size']} | {r['non_embedding_params'] / 1e6:.2f}M | {r['seeds']} | "
                     f"{_fmt_sd(r['fp_loss'], r['fp_loss_sd'])} | {_fmt_sd(r['b158_loss'], r['b158_loss_sd'])} | "
                     f"{gap} | {r['fp_ppl']:.1f} | {r['b158_ppl']:.1f} | {wide} | {100 * r['zero_share']:.0f} % | "
                     f"{r['fp_seconds']:.0f} | {r['b158_seconds']:.0f} |")
    lines += ["", "![evaluation loss during training](lab-bitnet/curves.png)",
              "![the ternary gap against size](lab-bitnet/gap.png)", "",
              "## What the numbers show, and what they do not", ""]
    lines += [f"- {f}" for f in findings(result)]
    lines += ["",
              "## Learning-rate sweeps", "", "| arm | learning rate: evaluation loss | chosen |", "|---|---|---|"]
    for label, sweep in result["sweeps"].items():
        cells = ", ".join(f"{s['lr']:g}: {s['eval_loss']:.4f}" for s in sweep)
        lines.append(f"| {label} | {cells} | {result['best_lr'][label]:g} |")
    lines += ["", "## Beside the papers", "", "| source | parameters | full precision | ternary | gap |",
              "|---|---|---|---|---|"]
    lines += [f"| {a['source']} | {a['params']} | {a['fp']} | {a['ternary']} | {a['gap']} |" for a in ANCHORS]
    lines += ["", "## Down to the kernel", "",
              "The trained ternary model packed into Ligero's b158 layers (5 trits per byte; the ternary kernel) "
              "holds the same ternary values as the training-time model: largest difference of evaluation loss "
              f"between the two, over all ternary runs: {max(r['packed_minus_trained'] for r in rows):.1e} nats. "
              "Beside it, the full-precision model of the same size as trained (fp32) and quantized after training. "
              "Tiny models decode in a few hundred microseconds a token, so the speeds show per-token overhead "
              "more than weight bandwidth.", "",
              "| size | model | weights KB | eval loss | decode tok/s | prefill tok/s |", "|---|---|---|---|---|---|"]
    for s in result["speed"]:
        lines.append(f"| {s['size']} | {s['model']} | {s['weight_bytes'] / 1e3:.0f} | {s['eval_loss']:.4f} | "
                     f"{s['decode_tok_s']:.0f} | {s['prefill_tok_s']:.0f} |")
    return "\n".join(lines) + "\n"


def _timing(result: dict) -> str:
    whole = result["runs_seconds"] + result["speed_seconds"]
    runs, train = _minutes(result["runs_seconds"]), _minutes(result["train_seconds"])
    text = (f"The whole lab takes {_minutes(whole)} min on this machine: {result['runs']} training runs {runs} min "
            f"(each run's wall-clock as it ran, {train} min of it training steps and evaluations) and the speed "
            f"comparison {_minutes(result['speed_seconds'])} min.")
    share = result.get("max_foreign_cpu_share")
    if share is not None:
        text += (f" Other processes took at most {100 * share:.0f} % of the machine's CPU during any run, "
                 f"{100 * result['speed_foreign_cpu_share']:.0f} % during the speed comparison")
        missing = result.get("runs_without_load_record", 0)
        text += f" ({missing} runs recorded no share)." if missing else "."
    return text


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f}" if seconds >= 600 else f"{seconds / 60:.1f}"


def findings(result: dict) -> list[str]:
    """What the results say, in words computed from them (the same rules for any outcome)."""
    rows, plan, out = result["rows"], result["plan"], []
    gaps = [r["gap_loss_pct"] for r in rows]
    sizes = ", ".join(f"{g:+.1f} % at {r['non_embedding_params'] / 1e6:.2f}M" for g, r in zip(gaps, rows))
    if len(rows) > 1:
        steps = [b - a for a, b in zip(gaps, gaps[1:])]
        trend = ("narrows as the models grow" if all(d < 0 for d in steps) else "widens as the models grow"
                 if all(d > 0 for d in steps) else "does not change monotonically with size")
        out.append(f"Ternary against full precision, same width: evaluation loss {sizes}. The gap {trend} over this "
                   f"{rows[-1]['non_embedding_params'] / rows[0]['non_embedding_params']:.0f}x range of sizes. "
                   "The paper's gap closes between 700M and 3B parameters, far above these sizes.")
    noise = None
    first = rows[0]
    if first["seeds"] > 1:
        paired = first["paired_gaps_pct"]
        mean, noise = statistics.fmean(paired), statistics.stdev(paired)
        verdict = "beyond" if abs(mean) > 2 * noise else "within"
        out.append(f"Seed noise: at {first['size']} the gap over {first['seeds']} seeds (paired by seed) is "
                   f"{mean:+.1f} ± {noise:.1f} % (sd), {verdict} two standard deviations of zero. The larger sizes "
                   f"ran one seed each, so differences between sizes smaller than about {2 * noise:.1f} points are not "
                   "resolved by this run (the noise is measured at the smallest size only; it may be smaller at the "
                   "larger ones).")
    for r in rows:
        if "b158x2_loss" in r:
            gap = r["b158x2_gap_loss_pct"]
            band = 2 * noise if noise is not None else 0.0
            verdict = ("beats full precision" if gap < -band else
                       "matches full precision within seed noise" if gap <= band else "stays behind full precision")
            nearest = min(rows, key=lambda x: abs(math.log(x["non_embedding_params"] / r["b158x2_params"])))
            out.append(f"Doubled width (BitNet b1.58 Reloaded's remedy): the ternary model at twice the width of "
                       f"{r['size']} ({r['b158x2_params'] / 1e6:.2f}M non-embedding parameters, "
                       f"{r['b158x2_params'] / r['non_embedding_params']:.1f}x) reaches {gap:+.1f} % of the "
                       f"full-precision loss: it {verdict} (Reloaded: it matches). Doubling the width quadruples "
                       f"the parameters; against the full-precision model nearest to it in parameters "
                       f"({nearest['size']}, {nearest['non_embedding_params'] / 1e6:.2f}M) the ternary model is at "
                       f"{100 * (r['b158x2_loss'] / nearest['fp_loss'] - 1):+.1f} %.")
    higher = sum(r["b158_lr"] > r["fp_lr"] for r in rows)
    chosen = ", ".join(f"{r['size']}: {r['b158_lr']:g} vs {r['fp_lr']:g}" for r in rows)
    out.append(f"Learning rates: the sweeps chose a higher peak rate for ternary than for full precision at {higher} "
               f"of {len(rows)} sizes ({chosen}); "
               "the papers report that ternary training wants higher rates. "
               + _edges(result))
    zeros = ", ".join(f"{100 * r['zero_share']:.0f} %" for r in rows)
    out.append(f"Zero trits: {zeros} of the ternary weights are 0 "
               "(absmean rounding of roughly normal weights gives about a third).")
    slow = [r["b158_seconds"] / r["fp_seconds"] for r in rows]
    span = f"{min(slow):.2f}" if max(slow) - min(slow) < 0.005 else f"{min(slow):.2f}-{max(slow):.2f}"
    out.append(f"Training cost on this CPU: a ternary run takes {span}x the wall-clock of "
               "full precision (weights and activations are quantized at every step, and the matmuls stay in fp32: "
               "there is no ternary training kernel).")
    speed = {(x["size"], x["model"]): x for x in result["speed"]}
    big = rows[-1]["size"]
    tern, fp32 = speed.get((big, "b158 (trained ternary)")), speed.get((big, "fp32"))
    int4, post = speed.get((big, "int4 (after training)")), speed.get((big, "b158 (after training)"))
    if tern and fp32 and int4 and post:
        out.append(f"Down to the kernel at {big}: the trained ternary model, packed, holds "
                   f"{tern['weight_bytes'] / fp32['weight_bytes']:.2f}x the bytes of the fp32 model "
                   f"({tern['weight_bytes'] / int4['weight_bytes']:.2f}x int4's; the embedding, tied to the head, "
                   f"stays in full precision) and decodes at {tern['decode_tok_s'] / fp32['decode_tok_s']:.2f}x fp32's "
                   f"speed ({tern['decode_tok_s'] / int4['decode_tok_s']:.2f}x int4's). Ternarizing the full-precision "
                   f"model after training instead gives evaluation loss {post['eval_loss']:.2f} against "
                   f"{tern['eval_loss']:.2f} trained ternary: "
                   + ("ternary weights have to be learned." if post["eval_loss"] > tern["eval_loss"] + 0.05 else
                      "no worse, so at this training length ternary training has not yet paid off."))
    tokens = plan["tokens_per_run"]
    largest = rows[-1]["non_embedding_params"]
    out.append(f"What this does not show: every run sees {tokens / 1e6:.2f}M tokens ({tokens / largest:.1f} per "
               f"non-embedding parameter at the largest size; the paper trains on 100B tokens, about 20-100 per "
               "parameter), so these models are far from converged and the gap partly measures how fast each arm "
               f"learns early on. The largest model here is {700e6 / largest:,.0f}x smaller than the paper's "
               "smallest (700M), so the paper's trend with size is neither confirmed nor refuted; the anchors are for "
               "comparison of direction only.")
    return out


def _edges(result: dict) -> str:
    extended = [label for label, sweep in result["sweeps"].items()
                if len(sweep) > len(result["plan"]["lr_grid"]["b158" if label.endswith("b158") else "fp"])]
    edges = [label for label, lr in result["best_lr"].items()
             if lr in (result["sweeps"][label][0]["lr"], result["sweeps"][label][-1]["lr"])]
    text = (f"Grids extended because the best rate was at an edge: {', '.join(extended)}. " if extended else "")
    return text + (f"Still at the edge of its grid (the best rate may lie beyond): {', '.join(edges)}." if edges
                   else "Every chosen rate lies inside its grid.")


def provenance() -> dict:
    """The machine, and the commit when run from a git checkout ('+changes' when the code differs from it)."""
    import subprocess

    from ligero.eval.audit import machine_info

    info = machine_info()
    root = Path(__file__).resolve().parents[3]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "src"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head, dirty = "", ""
    return {"machine": info, "commit": (head + ("+changes" if dirty else "")) if head else "not a git checkout"}


def lab_bitnet(quick: bool, out: str | Path, docs: str | Path | None, log=print) -> dict:
    """`ligero lab bitnet [--quick]`."""
    return run_lab(QUICK if quick else FULL, out, docs, log=log)
