"""`ligero lab moe`: mixture of experts against dense models, trained from scratch on the same tokens.

Arms at one size, every one on the same batches in the same order, each with the best peak learning rate of its
own sweep: the dense model; an MoE of `experts` experts, top-2, each expert half the dense FFN (so a token runs
through the dense model's FFN parameters: equal active parameters), with the Switch load-balancing loss (0.01) and
the router z-loss (0.001), dropless; the same MoE without the balancing loss, without the z-loss, and with a
capacity factor (dropped assignments counted); top-1 routing with experts the dense FFN's size (Switch); and a
dense model whose FFN holds the top-2 MoE's total parameters. The dense and top-2 arms run several seeds.

Every run is a `ligero lab train` run folder under --out (finished runs are reused, interrupted ones resume). The
document, its figures and JSON are written from the results at the end.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ligero.eval.speed import ForeignLoad
from ligero.lab.bitnet import provenance
from ligero.lab.runs import RunSpec, best_rate, sweep_rates, train_run
from ligero.lab.trainer import TrainConfig

ANCHORS = [
    {"source": "Switch Transformer (arXiv 2101.03961), Table 1", "setting": "128 experts, 100k steps",
     "result": "neg. log perplexity: dense T5-Base -1.731, MoE top-2 -1.572, Switch top-1 -1.561 "
               "(MoE 0.16-0.17 nats better)"},
    {"source": "Switch Transformer", "setting": "capacity factor 1.0-1.25",
     "result": "dropped tokens typically < 1 %; balancing loss alpha = 0.01"},
    {"source": "OLMoE (arXiv 2409.02060)", "setting": "1B active / 7B total",
     "result": "reaches the dense model's quality with ~3x fewer tokens, ~2x faster in wall-clock; without the "
               "balancing loss tokens collapse onto few experts; router z-loss 0.001 reduces spikes"},
    {"source": "Mixtral (arXiv 2401.04088)", "setting": "8 experts, top-2",
     "result": "softmax over the two chosen logits"},
    {"source": "GPT-2-small upcycled to 8 experts (second-hand)", "setting": "tiny scale",
     "result": "-3.6 % eval loss; without balancing one expert took 73.6 % of tokens by step 500"},
]


@dataclass(frozen=True)
class Plan:
    size: str
    steps: int  # optimizer steps of every main run (the same tokens for every arm)
    experts: int = 8
    batch_rows: int = 32
    seq_len: int = 128
    vocab_size: int = 4096
    warmup_fraction: float = 0.1
    lr_grid: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    sweep_fraction: float = 0.3
    max_extensions: int = 2
    seeds: tuple[int, ...] = (0, 1, 2)  # for the dense and the top-2 arms
    capacity: float = 1.0
    eval_tokens: int = 16384
    eval_every: int = 25
    speed_repeats: int = 5
    preference_layer: int = -1  # the layer whose experts' favourite tokens are listed

    def tokens(self) -> int:
        return self.steps * self.batch_rows * self.seq_len


FULL = Plan(size="s", steps=300)
QUICK = Plan(size="test", steps=12, experts=4, batch_rows=8, seq_len=64, vocab_size=512,
             lr_grid=(1e-2, 3e-2, 1e-1), sweep_fraction=0.5, max_extensions=1, seeds=(0, 1), eval_tokens=1024,
             eval_every=4, speed_repeats=2)


def arms(plan: Plan) -> dict[str, RunSpec]:
    common = dict(vocab_size=plan.vocab_size)
    moe = dict(experts=plan.experts, **common)
    return {"dense": RunSpec(plan.size, **common),
            "moe-top2": RunSpec(plan.size, top_k=2, **moe),
            "moe-top1": RunSpec(plan.size, top_k=1, **moe),
            "moe-top2-no-balance": RunSpec(plan.size, top_k=2, balance=0.0, **moe),
            "moe-top2-no-z-loss": RunSpec(plan.size, top_k=2, z_loss=0.0, **moe),
            "moe-top2-capacity": RunSpec(plan.size, top_k=2, capacity=plan.capacity, **moe),
            "dense-total": RunSpec(plan.size, ffn_factor=max(1, plan.experts // 2), **common)}


SEEDED = ("dense", "moe-top2")


def _train_config(plan: Plan, lr: float, seed: int, steps: int) -> TrainConfig:
    return TrainConfig(steps=steps, batch_rows=plan.batch_rows, seq_len=plan.seq_len, lr=lr,
                       warmup_steps=max(1, int(plan.warmup_fraction * steps)), schedule="cosine", weight_decay=0.1,
                       eval_every=min(plan.eval_every, steps), eval_tokens=plan.eval_tokens,
                       checkpoint_every=max(1, steps // 5), seed=seed)


def run_lab(plan: Plan, out: str | Path, docs: str | Path | None, log=print) -> dict:
    out = Path(out)
    t_start = time.perf_counter()
    runs: dict[str, dict] = {}

    def run(name: str, spec: RunSpec, lr: float, seed: int, steps: int, role: str) -> dict:
        folder = f"{spec.label}-lr{lr:g}-seed{seed}-steps{steps}"
        log(f"[{role}] {name}: {folder}")
        summary = train_run(spec, _train_config(plan, lr, seed, steps), out / folder, log=lambda m: log(f"  {m}"))
        summary["role"], summary["folder"], summary["arm"] = role, folder, name
        runs[folder] = summary
        return summary

    sweep_steps = max(2, int(plan.sweep_fraction * plan.steps))
    best_lr, sweeps = {}, {}
    for name, spec in arms(plan).items():
        results = sweep_rates(plan.lr_grid, lambda lr: run(name, spec, lr, 0, sweep_steps, "sweep")["final_eval_loss"],
                              plan.max_extensions, name)  # loss_at is called within this iteration
        grid = list(results)
        best_lr[name] = best_rate(results, name)
        sweeps[name] = [{"lr": lr, "eval_loss": results[lr]} for lr in grid]
        log(f"{name}: learning rate {best_lr[name]:g}")
    main = {name: [run(name, spec, best_lr[name], s, plan.steps, "main")
                   for s in (plan.seeds if name in SEEDED else plan.seeds[:1])]
            for name, spec in arms(plan).items()}
    t_speed, load = time.perf_counter(), ForeignLoad().start()
    speed = _speed(plan, out, main, log)
    preferences = _preferences(plan, out, main["moe-top2"][0], log)
    shares = [r.get("foreign_cpu_share") for r in runs.values()]
    result = {"plan": asdict(plan) | {"tokens_per_run": plan.tokens()}, "best_lr": best_lr, "sweeps": sweeps,
              "rows": _rows(main), "utilisation": _utilisation(main), "speed": speed, "preferences": preferences,
              "main": {name: [_brief(r) for r in rs] for name, rs in main.items()},
              "speed_seconds": time.perf_counter() - t_speed, "speed_foreign_cpu_share": load.share(),
              "invocation_seconds": time.perf_counter() - t_start,
              "train_seconds": sum(r["train_seconds"] for r in runs.values()),
              "runs_seconds": sum(r.get("run_seconds", r["train_seconds"]) for r in runs.values()),
              "runs": len(runs), "max_foreign_cpu_share": max((x for x in shares if x is not None), default=None),
              "data": next(iter(runs.values()))["data"]} | provenance()
    (out / "lab-moe.json").write_text(json.dumps(result, indent=1))
    if docs is not None:
        write_docs(result, Path(docs))
    return result


def _brief(summary: dict) -> dict:
    keep = ("label", "folder", "non_embedding_params", "active_non_embedding_params", "final_eval_loss", "tokens",
            "train_seconds", "run_seconds", "foreign_cpu_share", "curve")
    return {k: summary[k] for k in keep if k in summary} | {"seed": summary["train_config"]["seed"],
                                                            "lr": summary["train_config"]["lr"]}


# --- what the runs show ---------------------------------------------------------------------------------------


def tokens_to_reach(curve: list[dict], target: float) -> float | None:
    """Training tokens at which the evaluation loss first reaches `target` (linear between evaluations), or None."""
    points = [(c["tokens"], c["eval_loss"]) for c in curve if "eval_loss" in c]
    for (t0, l0), (t1, l1) in zip([(0, math.inf)] + points, points):
        if l1 <= target:
            if not math.isfinite(l0) or l0 == l1:
                return float(t1)
            return t0 + (t1 - t0) * (l0 - target) / (l0 - l1)
    return None


def load_entropy(load: list[int]) -> float:
    """Entropy of the expert load, normalised: 1 = every expert equally used, 0 = one expert takes everything."""
    total = sum(load)
    if total == 0 or len(load) < 2:
        return 1.0
    p = [x / total for x in load if x]
    return -sum(x * math.log(x) for x in p) / math.log(len(load))


def loss_spikes(curve: list[dict], window: int = 10, rise: float = 0.05) -> int:
    """Steps whose training loss exceeds the mean of the previous `window` steps by more than `rise` (relative)."""
    losses = [c["loss"] for c in curve]
    return sum(1 for i in range(window, len(losses))
               if losses[i] > (1 + rise) * statistics.fmean(losses[i - window:i]))


def _mean_sd(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _rows(main: dict[str, list[dict]]) -> list[dict]:
    dense = main["dense"]
    dense_loss, _ = _mean_sd([r["final_eval_loss"] for r in dense])
    dense_tokens = dense[0]["tokens"]
    dense_spt = statistics.fmean(r["train_seconds"] / r["tokens"] for r in dense)
    rows = []
    for name, rs in main.items():
        loss, sd = _mean_sd([r["final_eval_loss"] for r in rs])
        reach = [tokens_to_reach(r["curve"], dense_loss) for r in rs] if name != "dense" else [dense_tokens]
        spt = statistics.fmean(r["train_seconds"] / r["tokens"] for r in rs)
        last = [c for c in rs[0]["curve"] if "expert_load" in c]
        loads = last[-1]["expert_load"] if last else []
        assigned = sum(sum(map(sum, c["expert_load"])) for c in last)  # over the run, every layer
        dropped = sum(c.get("dropped_assignments", 0) for c in last)
        row = {"arm": name, "label": rs[0]["label"], "seeds": len(rs), "lr": rs[0]["train_config"]["lr"],
               "top_k": rs[0]["spec"]["top_k"] if rs[0]["spec"].get("experts") else None,
               "non_embedding_params": rs[0]["non_embedding_params"],
               "active_non_embedding_params": rs[0].get("active_non_embedding_params", rs[0]["non_embedding_params"]),
               "eval_loss": loss, "eval_loss_sd": sd, "ppl": math.exp(loss),
               "gap_vs_dense_pct": 100 * (loss / dense_loss - 1),
               "paired_gaps_pct": [100 * (r["final_eval_loss"] / d["final_eval_loss"] - 1)
                                   for r, d in zip(rs, dense)] if name in SEEDED else None,
               "tokens_to_dense_loss": (statistics.fmean(reach) if all(x is not None for x in reach) else None),
               "token_saving": (dense_tokens / statistics.fmean(reach) if all(reach) else None),
               "seconds_per_mtoken": 1e6 * spt, "time_vs_dense": spt / dense_spt,
               "load_entropy_end": statistics.fmean(load_entropy(x) for x in loads) if loads else None,
               "max_expert_share_end": max(max(x) / sum(x) for x in loads) if loads else None,
               "dropped_share": dropped / assigned if assigned else None,
               "loss_spikes": statistics.fmean(loss_spikes(r["curve"]) for r in rs),
               "final_aux_loss": rs[0]["curve"][-1].get("aux_loss")}
        if row["tokens_to_dense_loss"] is not None:  # wall-clock to the dense model's final loss, against dense's
            row["wallclock_saving"] = dense_tokens * dense_spt / (row["tokens_to_dense_loss"] * spt)
        rows.append(row)
    return rows


def _utilisation(main: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Per MoE arm (seed 0), at every evaluation: tokens so far, the load entropy and largest expert share per layer
    (since the previous evaluation), and the load itself."""
    out = {}
    for name, rs in main.items():
        points = [c for c in rs[0]["curve"] if "expert_load" in c]
        if points:
            out[name] = [{"tokens": c["tokens"], "entropy": [load_entropy(x) for x in c["expert_load"]],
                          "max_share": [max(x) / max(1, sum(x)) for x in c["expert_load"]],
                          "load": c["expert_load"]} for c in points]
    return out


def _speed(plan: Plan, out: Path, main: dict[str, list[dict]], log) -> list[dict]:
    """The trained dense, dense-total and top-2 MoE models in the runtime: decode and prefill tokens/s."""
    from ligero.eval.speed import measure_speed
    from ligero.io.checkpoint import load_model

    rows = []
    for name in ("dense", "moe-top2", "moe-top1", "dense-total"):
        model = load_model(str(out / main[name][0]["folder"] / "model"), device="cpu").model
        log(f"speed: {name}")
        s = measure_speed(model, prefill_tokens=plan.seq_len - 1, decode_tokens=plan.seq_len - 17,
                          repeats=plan.speed_repeats)
        rows.append({"arm": name, "weight_bytes": s.weight_bytes, "decode_tok_s": s.decode_tok_s,
                     "prefill_tok_s": s.prefill_tok_s})
    return rows


def _preferences(plan: Plan, out: Path, run: dict, log, top: int = 6, min_count: int = 20) -> dict:
    """Which tokens each expert of one layer of the trained top-2 MoE prefers on the evaluation split: per expert,
    its share of the assignments and the tokens most over-represented among those it receives (lift: the token's
    share among the expert's tokens over its share in the text; tokens seen at least `min_count` times in the text,
    ties broken by how often the expert receives them)."""
    from ligero.io.checkpoint import load_model
    from ligero.lab.data import LabData
    from ligero.models.transformer import MoEMLP

    loaded = load_model(str(out / run["folder"] / "model"), device="cpu")
    model, tokenizer = loaded.model, loaded.tokenizer
    layers = [i for i, layer in enumerate(model.layers) if isinstance(layer.mlp, MoEMLP)]
    layer = layers[plan.preference_layer]
    mlp = model.layers[layer].mlp
    mlp.routing_log = []
    windows = LabData.load(plan.vocab_size).eval_windows(plan.seq_len, plan.eval_tokens)
    with torch.inference_mode():
        for i in range(0, windows.shape[0], 8):
            model(windows[i:i + 8, :-1])
    tokens = windows[:, :-1].flatten()
    chosen = torch.cat([r.experts for r in mlp.routing_log])  # [N, k]
    mlp.routing_log = None
    everywhere = Counter(tokens.tolist())
    n = tokens.numel()
    experts = []
    for e in range(len(mlp.experts)):
        mine = Counter(tokens[(chosen == e).any(-1)].tolist())
        total = sum(mine.values())
        lifts = sorted(((count / total) / (everywhere[t] / n), count, t) for t, count in mine.items()
                       if everywhere[t] >= min_count)
        experts.append({"expert": e, "share": total / chosen.numel(),
                        "tokens": [{"token": tokenizer.decode([t], skip_special=False), "lift": lift, "count": count}
                                   for lift, count, t in reversed(lifts[-top:])]})
    log(f"expert preferences: layer {layer}")
    return {"layer": layer, "tokens": n, "experts": experts}


# --- the document -----------------------------------------------------------------------------------------------


def write_docs(result: dict, docs: Path) -> None:
    from ligero.eval.metrics.plots import pyplot

    docs.mkdir(parents=True, exist_ok=True)
    figures = docs / "lab-moe"
    figures.mkdir(exist_ok=True)
    plt = pyplot()
    main = result["main"]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for name, rs in main.items():
        curve = [c for c in rs[0]["curve"] if "eval_loss" in c]
        ax.plot([c["tokens"] / 1e6 for c in curve], [c["eval_loss"] for c in curve], label=name,
                lw=2 if name in SEEDED else 1)
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("evaluation loss (nats)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(figures / "curves.png", dpi=110)
    plt.close(fig)
    util = result["utilisation"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, points in util.items():
        x = [p["tokens"] / 1e6 for p in points]
        axes[0].plot(x, [statistics.fmean(p["entropy"]) for p in points], label=name)
        axes[1].plot(x, [max(p["max_share"]) for p in points], label=name)
    axes[0].set_ylabel("load entropy (1 = uniform), mean over layers")
    axes[1].set_ylabel("largest expert's share of assignments (worst layer)")
    for ax in axes:
        ax.set_xlabel("training tokens (M)")
        ax.grid(alpha=0.3)
    axes[1].axhline(1 / result["plan"]["experts"], color="black", lw=0.8, ls=":")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(figures / "utilisation.png", dpi=110)
    plt.close(fig)
    names = [n for n in ("moe-top2", "moe-top2-no-balance", "moe-top1") if n in util]
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):  # each expert's share of assignments (mean over layers) over training
        points = util[name]
        shares = [[statistics.fmean(x[e] / max(1, sum(x)) for x in p["load"]) for p in points]
                  for e in range(result["plan"]["experts"])]
        ax.stackplot([p["tokens"] / 1e6 for p in points], shares, labels=[f"expert {e}" for e in range(len(shares))])
        ax.set_ylim(0, 1)
        ax.set_xlabel("training tokens (M)")
        ax.set_ylabel("share of assignments (mean over layers)")
        ax.set_title(name)
    axes[0][0].legend(fontsize=6, loc="upper right", ncol=2)
    fig.tight_layout()
    fig.savefig(figures / "histograms.png", dpi=110)
    plt.close(fig)
    names = [n for n in ("moe-top2", "moe-top2-no-balance") if n in util]
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        final = util[name][-1]["load"]
        grid = [[x / max(1, sum(layer)) for x in layer] for layer in final]
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=max(max(r) for r in grid))
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_title(f"{name}: share of assignments at the end")
        fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(figures / "load.png", dpi=110)
    plt.close(fig)
    (docs / "lab-moe.json").write_text(json.dumps(result, indent=1))
    (docs / "lab-moe.md").write_text(render(result))


def _pct(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f} %"


def render(result: dict) -> str:
    plan, rows, m = result["plan"], result["rows"], result.get("machine", {})
    quick = plan["steps"] < 50
    lines = [
        "# Lab: mixture of experts against dense models, from scratch",
        "",
        f"Written by `ligero lab moe{' --quick' if quick else ''}` at commit {result.get('commit', '?')}"
        f"{' on ' + m['cpu'] if m.get('cpu') else ''} ({m.get('threads', '?')} threads). {_timing(result)} Every arm "
        f"sees the same {plan['tokens_per_run']:,} training tokens in the same order ({plan['steps']} steps of "
        f"{plan['batch_rows']} x {plan['seq_len']} tokens) from the training split (sha256 "
        f"`{result['data']['train_split']['sha256'][:12]}…`, {result['data']['vocab_size']}-entry BPE); losses are "
        f"measured on the first {plan['eval_tokens']:,} tokens of the evaluation split. Size `{plan['size']}`; MoE "
        f"arms have {plan['experts']} experts per layer in every layer. AdamW, warm-up and cosine decay, weight "
        "decay 0.1; each arm's peak learning rate is the best of its own sweep (below).",
        "",
        "| arm | params (non-emb.) | active | seeds | eval loss | vs dense | tokens to dense's loss | s / M tokens "
        "| vs dense time | load entropy (end) | largest expert share | dropped | loss spikes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        loss = f"{r['eval_loss']:.4f}" + (f" ± {r['eval_loss_sd']:.4f}" if r["eval_loss_sd"] is not None else "")
        reach = (f"{r['tokens_to_dense_loss'] / 1e6:.2f}M ({r['token_saving']:.2f}x fewer)"
                 if r["tokens_to_dense_loss"] is not None else "not reached") if r["arm"] != "dense" else "-"
        lines.append(f"| {r['arm']} | {r['non_embedding_params'] / 1e6:.2f}M | "
                     f"{r['active_non_embedding_params'] / 1e6:.2f}M | {r['seeds']} | {loss} | "
                     f"{r['gap_vs_dense_pct']:+.1f} % | {reach} | {r['seconds_per_mtoken']:.0f} | "
                     f"{r['time_vs_dense']:.2f}x | "
                     f"{'' if r['load_entropy_end'] is None else format(r['load_entropy_end'], '.3f')} | "
                     f"{_pct(r['max_expert_share_end'])} | {_pct(r['dropped_share'], 2)} | {r['loss_spikes']:.1f} |")
    lines += ["", "Load entropy: of the share of assignments each expert received over the last evaluation interval, "
              "normalised (1 = all experts equally used), mean over layers; largest expert share: the worst layer "
              f"(uniform: {1 / plan['experts']:.3f}). Loss spikes: steps whose training loss exceeds the mean of the "
              "ten before by more than 5 %. Dropped: the share of assignments past an expert's capacity over the run.",
              "", "![evaluation loss](lab-moe/curves.png)", "![expert utilisation during training]"
              "(lab-moe/utilisation.png)", "![each expert's share of assignments during training]"
              "(lab-moe/histograms.png)", "![expert load per layer at the end](lab-moe/load.png)", "",
              "## What the numbers show, and what they do not", ""]
    lines += [f"- {f}" for f in findings(result)]
    pref = result["preferences"]
    lines += ["", f"## Which tokens each expert prefers (moe-top2, layer {pref['layer']}, {pref['tokens']:,} "
              "evaluation tokens)", "",
              "| expert | share of assignments | most over-represented tokens: lift (times the expert got it) |",
              "|---|---|---|"]
    for e in pref["experts"]:
        toks = ", ".join(f"`{t['token']!r}` {t['lift']:.1f} ({t.get('count', '?')})" for t in e["tokens"])
        lines.append(f"| {e['expert']} | {_pct(e['share'])} | {toks} |")
    lines += ["", "## In the runtime", "", "The trained models decoding on this machine (one sequence; tiny models "
              "show per-token overhead more than weight bandwidth: an MoE layer routes in Python and runs its chosen "
              "experts one after another).", "", "| arm | weights KB | decode tok/s | prefill tok/s |",
              "|---|---|---|---|"]
    lines += [f"| {s['arm']} | {s['weight_bytes'] / 1e3:.0f} | {s['decode_tok_s']:.0f} | {s['prefill_tok_s']:.0f} |"
              for s in result["speed"]]
    lines += ["", "## Learning-rate sweeps", "", "| arm | learning rate: evaluation loss | chosen |", "|---|---|---|"]
    for name, sweep in result["sweeps"].items():
        cells = ", ".join(f"{s['lr']:g}: {s['eval_loss']:.4f}" for s in sweep)
        lines.append(f"| {name} | {cells} | {result['best_lr'][name]:g} |")
    lines += ["", "## Beside the papers", "", "| source | setting | result |", "|---|---|---|"]
    lines += [f"| {a['source']} | {a['setting']} | {a['result']} |" for a in ANCHORS]
    return "\n".join(lines) + "\n"


def _timing(result: dict) -> str:
    whole = result["runs_seconds"] + result["speed_seconds"]
    text = (f"The whole lab takes {whole / 60:.0f} min on this machine: {result['runs']} training runs "
            f"{result['runs_seconds'] / 60:.0f} min, the runtime comparison and routing analysis "
            f"{result['speed_seconds'] / 60:.1f} min.")
    share = result.get("max_foreign_cpu_share")
    if share is not None:
        text += f" Other processes took at most {100 * share:.0f} % of the machine's CPU during any run."
    return text


def findings(result: dict) -> list[str]:
    """What the results say, computed from them (the same rules whatever the outcome)."""
    rows = {r["arm"]: r for r in result["rows"]}
    plan, out = result["plan"], []
    dense, top2 = rows["dense"], rows["moe-top2"]
    paired = top2["paired_gaps_pct"] or []
    noise = statistics.stdev(paired) if len(paired) > 1 else None
    mean = statistics.fmean(paired) if paired else top2["gap_vs_dense_pct"]
    verdict = ("" if noise is None else
               f" ({len(paired)} seeds paired: {mean:+.1f} ± {noise:.1f} % sd, "
               f"{'beyond' if abs(mean) > 2 * noise else 'within'} two standard deviations of zero)")
    better = "lower" if top2["gap_vs_dense_pct"] < 0 else "higher"
    out.append(f"At equal tokens and equal active parameters the top-2 MoE ends {abs(top2['gap_vs_dense_pct']):.1f} % "
               f"{better} in evaluation loss than the dense model{verdict}; the papers' direction is lower (Switch: "
               "0.16 nats at 100k steps and 128 experts; a tiny upcycled GPT-2: -3.6 %).")
    total = rows["dense-total"]
    out.append(f"The dense model with the MoE's total parameters ({total['non_embedding_params'] / 1e6:.2f}M, every "
               f"one active) ends at {total['gap_vs_dense_pct']:+.1f} % against the dense model: the MoE "
               + ("recovers part of what its extra parameters are worth when all of them run."
                  if total["gap_vs_dense_pct"] < top2["gap_vs_dense_pct"] < 0 else
                  "matches or beats what its parameters are worth when all run." if top2["gap_vs_dense_pct"] <=
                  total["gap_vs_dense_pct"] else "does not gain from its extra parameters here."))
    if top2["tokens_to_dense_loss"] is not None:
        wall = top2.get("wallclock_saving")
        out.append(f"Tokens to the dense model's final loss: the top-2 MoE gets there with {top2['token_saving']:.2f}x "
                   f"fewer tokens (OLMoE: ~3x), but a training token costs {top2['time_vs_dense']:.2f}x the dense "
                   f"model's wall-clock here, so reaching that loss takes {1 / wall:.2f}x the dense model's "
                   "training time (OLMoE: about half). "
                   + ("Routing overhead on this CPU erases the token saving." if wall < 1 else
                      "The token saving survives the routing overhead on this CPU."))
    else:
        out.append(f"The top-2 MoE does not reach the dense model's final loss within the run, so there is no token "
                   f"saving to report; a training token costs {top2['time_vs_dense']:.2f}x the dense model's "
                   "wall-clock here.")
    nobal = rows.get("moe-top2-no-balance")
    if nobal and nobal["max_expert_share_end"] is not None:
        collapsed = nobal["max_expert_share_end"] > 2 / plan["experts"]
        out.append(f"Without the balancing loss the largest expert takes {_pct(nobal['max_expert_share_end'])} of a "
                   f"layer's assignments at the end (with it: {_pct(top2['max_expert_share_end'])}; uniform "
                   f"{_pct(1 / plan['experts'])}; with {nobal['top_k']} experts per token one expert can take at most "
                   f"{_pct(1 / nobal['top_k'])}: every token), load entropy {nobal['load_entropy_end']:.3f} against "
                   f"{top2['load_entropy_end']:.3f}; evaluation loss {nobal['gap_vs_dense_pct']:+.1f} % vs dense. "
                   + ("Routing collapses toward few experts, as OLMoE reports." if collapsed else
                      "No collapse at this length: the load stays within twice the uniform share."))
    noz = rows.get("moe-top2-no-z-loss")
    if noz:
        out.append(f"Without the router z-loss: evaluation loss {noz['gap_vs_dense_pct']:+.1f} % vs dense (with it "
                   f"{top2['gap_vs_dense_pct']:+.1f} %), {noz['loss_spikes']:.1f} loss spikes against "
                   f"{top2['loss_spikes']:.1f}. At this scale and length the z-loss "
                   + ("reduces spikes, as OLMoE reports." if noz["loss_spikes"] > top2["loss_spikes"] + 0.5 else
                      "makes no visible difference to stability."))
    cap = rows.get("moe-top2-capacity")
    if cap:
        out.append(f"Capacity factor {plan['capacity']:g}: {_pct(cap['dropped_share'], 2)} of assignments dropped over "
                   f"the run (Switch: typically < 1 %), evaluation loss {cap['gap_vs_dense_pct']:+.1f} % vs "
                   f"dense against {top2['gap_vs_dense_pct']:+.1f} % dropless; training time "
                   f"{cap['time_vs_dense']:.2f}x dense's (capacity caps the slowest expert's work, which matters "
                   "on parallel hardware, not on a CPU that runs experts one after another).")
    top1 = rows.get("moe-top1")
    if top1:
        out.append(f"Top-1 (Switch; experts as wide as the dense FFN, so the same active parameters and twice the "
                   f"top-2 MoE's total): {top1['gap_vs_dense_pct']:+.1f} % vs dense against top-2's "
                   f"{top2['gap_vs_dense_pct']:+.1f} %, at {top1['time_vs_dense']:.2f}x dense's time per token.")
    out.append(f"What this does not show: {plan['tokens_per_run'] / 1e6:.2f}M training tokens per run on a "
               f"{dense['non_embedding_params'] / 1e6:.2f}M-parameter model is far from convergence and far below "
               "the papers' scales (Switch: billions of tokens; OLMoE: 5T), so the numbers measure early training. "
               "Only the dense and top-2 arms ran several seeds; differences of the other arms smaller than about "
               + (f"{2 * noise:.1f} %" if noise is not None else "the seed noise")
               + " are not resolved.")
    return out


def lab_moe(quick: bool, out: str | Path, docs: str | Path | None, log=print) -> dict:
    """`ligero lab moe [--quick]`."""
    return run_lab(QUICK if quick else FULL, out, docs, log=log)
