"""`ligero lab collapse`: models trained on their predecessors' samples, generation after generation.

Generation 0 is trained on human text (a fixed pool of Wikipedia training passages). Each next generation is a fresh
model (same initialisation, same number of steps and tokens seen) trained on a pool built from the previous
generation's samples (unconditional, temperature 1, up to one document long) under one regime:

- replace: the previous generation's samples only (Shumailov et al. 2024's setting);
- human10: 90 % samples, 10 % of the human pool kept;
- accumulate: the human pool and every earlier generation's samples (Gerstgrasser et al. 2024);
- watermark_filter: human10's pool, but the generators watermark what they sample and documents the detector flags
  are dropped before training (detection-based filtering of synthetic data);
- likelihood_filter: human10's pool minus the documents the generating model finds least likely (the lowest 20 %
  by mean log-likelihood: outlier filtering).

Measured per generation: perplexity on held-out human text (the evaluation split), and of the new model's own samples
distinct-2 / -3, vocabulary coverage, the mass of rare tokens (those outside the human pool's most frequent ones: the
tails) and per-document perplexity under generation 0. Beside it, Shumailov et al.'s Gaussian model (fit a normal
distribution, sample from the fit, refit), with the variance's decay against theory, replacing and accumulating.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ligero.errors import LigeroError
from ligero.lab.bitnet import provenance
from ligero.lab.data import LabData
from ligero.lab.models import build_model, size_named, tiny_config
from ligero.lab.runs import best_rate, sweep_rates
from ligero.lab.trainer import TrainConfig, eval_loss, train
from ligero.models.generate import BatchGeneration, SamplingConfig
from ligero.watermark import Detector, Watermarker, WatermarkKey, WatermarkSettings

REGIMES = ("replace", "human10", "accumulate", "watermark_filter", "likelihood_filter")
ANCHORS = [
    ("Shumailov et al., Nature 2024", "recursive training on own samples loses the tails first, then variance; "
                                      "keeping 10 % of the original data slows the degradation"),
    ("Gerstgrasser et al. 2024 (arXiv 2404.01413)", "replacing the data each generation collapses; accumulating "
                                                    "real and synthetic data keeps the test error bounded"),
    ("arXiv 2502.15654", "resampling guided by a machine-text detector prevents collapse"),
]


@dataclass(frozen=True)
class Plan:
    size: str = "s"
    vocab_size: int = 4096
    seq_len: int = 128
    batch_rows: int = 16
    steps: int = 250
    pool_tokens: int = 200_000  # tokens in a generation's training pool (before a filter)
    doc_tokens: int = 128  # the longest document (human passages are cut to it; samples stop at it or at EOT)
    generations: int = 5
    seeds: tuple[int, ...] = (0,)
    lr_grid: tuple[float, ...] = (1e-3, 2e-3, 4e-3)
    eval_tokens: int = 16384
    metric_docs: int = 256  # samples per generation for the diversity / tail metrics
    rare_rank: int = 1024  # tokens ranked past this in the human pool's frequencies are "rare"
    human_share: float = 0.1
    likelihood_drop: float = 0.2
    gaussian_n: int = 100
    gaussian_chains: int = 2000
    gaussian_generations: int = 1000
    version: int = 1

    def __post_init__(self) -> None:
        size_named(self.size)
        object.__setattr__(self, "seeds", tuple(self.seeds))
        object.__setattr__(self, "lr_grid", tuple(self.lr_grid))
        if self.generations < 1 or self.pool_tokens < 10 * self.doc_tokens:
            raise LigeroError("the collapse lab needs at least one generation and a pool of >= 10 documents")


FULL = Plan()
QUICK = Plan(size="test", vocab_size=512, seq_len=64, batch_rows=8, steps=24, pool_tokens=6000, doc_tokens=48,
             generations=2, lr_grid=(4e-3,), eval_tokens=2048, metric_docs=48, rare_rank=128, gaussian_chains=400,
             gaussian_generations=200)


def _train_config(plan: Plan, lr: float, seed: int) -> TrainConfig:
    return TrainConfig(steps=plan.steps, batch_rows=plan.batch_rows, seq_len=plan.seq_len, lr=lr,
                       warmup_steps=max(1, plan.steps // 20), eval_every=plan.steps, eval_tokens=plan.eval_tokens,
                       checkpoint_every=plan.steps, seed=seed)


def stream_of(docs: list[list[int]], eot: int) -> torch.Tensor:
    """Documents as one training stream, EOT before each (the model learns where documents start and end)."""
    out: list[int] = []
    for d in docs:
        out.append(eot)
        out.extend(d)
    out.append(eot)
    return torch.tensor(out, dtype=torch.int64)


def human_documents(data: LabData, plan: Plan) -> list[list[int]]:
    """The human pool: training passages cut into documents of at most doc_tokens, in stream order, until
    pool_tokens."""
    eot = data.tokenizer.eos_ids[0]
    ids = data.train.tolist()
    docs: list[list[int]] = []
    total, start = 0, 0
    for i, t in enumerate(ids + [eot]):
        if t != eot:
            continue
        passage = ids[start:i]
        start = i + 1
        for j in range(0, len(passage), plan.doc_tokens):
            piece = passage[j: j + plan.doc_tokens]
            if len(piece) >= 8:
                docs.append(piece)
                total += len(piece)
        if total >= plan.pool_tokens:
            break
    return docs


@torch.inference_mode()
def sample_documents(model, n_tokens: int, plan: Plan, eot: int, seed: int, marker=None,
                     rows: int = 128) -> list[list[int]]:
    """Unconditional samples (prompt: EOT; temperature 1; stop at EOT or doc_tokens) until n_tokens."""
    model.eval()
    docs: list[list[int]] = []
    total, batch = 0, 0
    while total < n_tokens:
        sampling = SamplingConfig(temperature=1.0, seed=seed * 100_003 + batch, logits_processor=marker)
        gen = BatchGeneration(model, [[eot]] * rows, plan.doc_tokens, sampling, [eot], eot)
        while not gen.done:
            gen.step()
        for d in gen.tokens:
            if len(d) >= 1 and total < n_tokens:
                docs.append(d)
                total += len(d)
        batch += 1
    return docs


@torch.inference_mode()
def document_nll(model, docs: list[list[int]], eot: int) -> list[float]:
    """Mean negative log-likelihood per token of each document (after EOT) under `model`."""
    model.eval()
    out = []
    for d in docs:
        ids = torch.tensor([[eot] + d])
        logp = torch.log_softmax(model(ids[:, :-1]).float(), -1)
        out.append(-float(logp[0].gather(1, ids[0, 1:, None]).mean()))
    return out


def text_metrics(docs: list[list[int]], rare: set[int], vocab: int) -> dict:
    tokens = [t for d in docs for t in d]
    grams = lambda n: [tuple(d[i: i + n]) for d in docs for i in range(len(d) - n + 1)]  # noqa: E731
    g2, g3 = grams(2), grams(3)
    return {"tokens": len(tokens), "docs": len(docs), "mean_doc_tokens": len(tokens) / max(1, len(docs)),
            "distinct2": len(set(g2)) / max(1, len(g2)), "distinct3": len(set(g3)) / max(1, len(g3)),
            "vocab_coverage": len(set(tokens)) / vocab,
            "rare_mass": sum(t in rare for t in tokens) / max(1, len(tokens))}


def _quantiles(values: list[float]) -> dict:
    v = sorted(values)
    q = lambda p: v[min(len(v) - 1, int(p * len(v)))]  # noqa: E731
    return {"p05": q(0.05), "p25": q(0.25), "median": q(0.5), "p75": q(0.75), "p95": q(0.95),
            "mean": statistics.fmean(v)}


class Chain:
    """One seed's generations: the human pool, generation 0, and each regime's models."""

    def __init__(self, plan: Plan, data: LabData, out: Path, seed: int, lr: float, log):
        self.plan, self.data, self.out, self.seed, self.lr, self.log = plan, data, out, seed, lr, log
        self.eot = data.tokenizer.eos_ids[0]
        self.human = human_documents(data, plan)
        counts = np.bincount(np.concatenate([np.asarray(d) for d in self.human]), minlength=data.tokenizer.vocab_size)
        self.rare = set(np.argsort(-counts, kind="stable")[plan.rare_rank:].tolist())
        self.cfg = tiny_config(size_named(plan.size), data.tokenizer.vocab_size, plan.seq_len)
        key_secret = f"ligero-collapse-lab-{seed}".encode() * 2
        self.key = WatermarkKey(key_secret, WatermarkSettings(), data.tokenizer.sha256,
                                data.tokenizer.vocab_size, f"lab-collapse-{plan.size}")
        self.detector = Detector(self.key, min_scored=1)
        self.gen0 = None

    def fit(self, docs: list[list[int]], folder: Path, lr: float | None = None):
        """A fresh model trained on `docs` (reused when folder already holds it)."""
        model = build_model(self.cfg, seed=self.seed)
        weights = folder / "model.pt"
        if weights.exists():
            model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
            return model
        data = LabData(self.data.tokenizer, stream_of(docs, self.eot), self.data.eval, self.data.provenance)
        train(model, data, _train_config(self.plan, lr or self.lr, self.seed), folder, log=lambda _m: None)
        torch.save(model.state_dict(), weights)
        (folder / "checkpoint.pt").unlink(missing_ok=True)  # the finished weights are enough to resume
        return model

    def measure(self, model, folder: Path, generation: int) -> dict:
        path = folder / "metrics.json"
        if path.exists():
            return json.loads(path.read_text())
        windows = self.data.eval_windows(self.plan.seq_len, self.plan.eval_tokens)
        loss = eval_loss(model, windows)
        samples = sample_documents(model, self.plan.metric_docs * self.plan.doc_tokens // 2, self.plan, self.eot,
                                   seed=10_000 + self.seed)[: self.plan.metric_docs]
        m = {"generation": generation, "eval_loss": loss, "eval_ppl": math.exp(loss),
             **text_metrics(samples, self.rare, self.data.tokenizer.vocab_size),
             "ppl_under_gen0": _quantiles([math.exp(x) for x in document_nll(self.gen0 or model, samples, self.eot)])}
        path.write_text(json.dumps(m, indent=1))
        return m

    def run_regime(self, regime: str) -> list[dict]:
        plan = self.plan
        prev, rows = self.gen0, []
        synthetic_so_far: list[list[int]] = []
        n_human = round(plan.human_share * len(self.human))
        for g in range(1, plan.generations + 1):
            folder = self.out / f"seed{self.seed}" / regime / f"gen{g}"
            folder.mkdir(parents=True, exist_ok=True)
            pool_path = folder / "pool.json"
            if pool_path.exists():
                pool = json.loads(pool_path.read_text())
            else:
                pool = self._pool(regime, prev, g, synthetic_so_far, n_human)
                pool_path.write_text(json.dumps(pool))
            synthetic_so_far += pool["new_synthetic"]
            t0 = time.perf_counter()
            model = self.fit(pool["train"], folder)
            row = {**self.measure(model, folder, g), **pool["stats"], "regime": regime, "seed": self.seed,
                   "seconds": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            self.log(f"  seed {self.seed} {regime} generation {g}: eval ppl {row['eval_ppl']:.1f}, rare mass "
                     f"{row['rare_mass']:.3f}, distinct-3 {row['distinct3']:.3f}")
            prev = model
        return rows

    def _pool(self, regime: str, prev, g: int, synthetic_so_far: list[list[int]], n_human: int) -> dict:
        plan, eot = self.plan, self.eot
        seed = self.seed * 1000 + g * 10 + REGIMES.index(regime)
        mixed = regime in ("human10", "watermark_filter", "likelihood_filter")
        n_synth_tokens = round((1 - plan.human_share) * plan.pool_tokens) if mixed else plan.pool_tokens
        marker = Watermarker(self.key, self.cfg.vocab_size) if regime == "watermark_filter" else None
        synthetic = sample_documents(prev, n_synth_tokens, plan, eot, seed, marker)
        human = self.human[:n_human] if mixed else []
        stats = {"pool_synthetic_docs": len(synthetic), "pool_human_docs": len(human)}
        if regime == "replace":
            train_docs = synthetic
        elif regime == "accumulate":
            train_docs = self.human + synthetic_so_far + synthetic
            stats["pool_human_docs"] = len(self.human)
        elif regime == "human10":
            train_docs = human + synthetic
        elif regime == "watermark_filter":
            flagged_s = [self.detector.detect(d, check_length=False).watermarked for d in synthetic]
            flagged_h = [self.detector.detect(d, check_length=False).watermarked for d in human]
            train_docs = [d for d, f in zip(human, flagged_h) if not f] + [d for d, f in zip(synthetic, flagged_s)
                                                                          if not f]
            stats.update(dropped_synthetic_share=sum(flagged_s) / max(1, len(synthetic)),
                         dropped_human_share=sum(flagged_h) / max(1, len(human)))
        else:  # likelihood_filter: drop the least likely documents under the generating model
            docs = human + synthetic
            nll = document_nll(prev, docs, eot)
            cut = sorted(nll, reverse=True)[int(plan.likelihood_drop * len(docs))]
            keep = [x <= cut for x in nll]
            train_docs = [d for d, k in zip(docs, keep) if k]
            stats.update(dropped_synthetic_share=sum(not k for k in keep[len(human):]) / max(1, len(synthetic)),
                         dropped_human_share=sum(not k for k in keep[:len(human)]) / max(1, len(human)))
        stats["pool_train_tokens"] = sum(len(d) for d in train_docs)
        stats["pool_train_docs"] = len(train_docs)
        if not train_docs:
            raise LigeroError(f"{regime} generation {g}: the filter dropped every document")
        return {"train": train_docs, "new_synthetic": synthetic if regime == "accumulate" else [], "stats": stats}


def gaussian_collapse(n: int, chains: int, generations: int, seed: int = 0) -> dict:
    """Fit N(mu, sigma^2) to n samples, sample n from the fit, refit; `chains` independent chains. Variance after k
    generations, replacing (MLE and unbiased fits) and accumulating (fit on every sample so far), with theory:
    E[MLE variance] = ((n-1)/n)^k; the unbiased fit keeps E[variance] = 1 but its log drifts down by
    E[log(chi2_{n-1}/(n-1))] per generation, so the typical (median) variance decays exponentially."""
    rng = np.random.default_rng(seed)
    checkpoints = sorted({k for k in (1, 10, 30, 100, 300, 1000, 3000) if k <= generations} | {generations})
    out: dict = {"n": n, "chains": chains, "generations": generations, "points": []}
    mle = np.ones(chains)
    unbiased = np.ones(chains)
    mu_a, var_a = np.zeros(chains), np.ones(chains)
    pool_sum, pool_sq, pool_n = np.zeros(chains), np.zeros(chains), 0
    x0 = rng.standard_normal((chains, n))  # generation 0's data: human samples from N(0, 1)
    pool_sum += x0.sum(1)
    pool_sq += (x0 ** 2).sum(1)
    pool_n += n
    mu_m, mle = x0.mean(1), x0.var(1)
    mu_u, unbiased = x0.mean(1), x0.var(1, ddof=1)
    mu_a = pool_sum / pool_n
    var_a = pool_sq / pool_n - mu_a ** 2
    drift = float(np.mean(np.log(rng.chisquare(n - 1, 200_000) / (n - 1))))
    for k in range(1, generations + 1):
        xm = mu_m[:, None] + np.sqrt(mle)[:, None] * rng.standard_normal((chains, n))
        mu_m, mle = xm.mean(1), xm.var(1)
        xu = mu_u[:, None] + np.sqrt(unbiased)[:, None] * rng.standard_normal((chains, n))
        mu_u, unbiased = xu.mean(1), xu.var(1, ddof=1)
        xa = mu_a[:, None] + np.sqrt(var_a)[:, None] * rng.standard_normal((chains, n))
        pool_sum += xa.sum(1)
        pool_sq += (xa ** 2).sum(1)
        pool_n += n
        mu_a = pool_sum / pool_n
        var_a = pool_sq / pool_n - mu_a ** 2
        if k in checkpoints:
            out["points"].append({
                "generation": k + 1,  # fits so far: generation 0's and k refits
                "mle_mean": float(mle.mean()), "mle_theory": ((n - 1) / n) ** (k + 1),
                "unbiased_mean": float(unbiased.mean()), "unbiased_median": float(np.median(unbiased)),
                "unbiased_median_theory": math.exp(drift * (k + 1)),
                "accumulate_mean": float(var_a.mean()), "accumulate_median": float(np.median(var_a)),
                "mle_mean_abs_mu": float(np.abs(mu_m).mean())})
    return out


def run_lab(plan: Plan, out: str | Path, docs: str | Path | None, log=print) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_plan(plan, out)
    started = time.perf_counter()
    data = LabData.load(plan.vocab_size)
    result: dict = {"plan": dataclasses.asdict(plan), "regimes": list(REGIMES), "data": data.provenance,
                    "anchors": ANCHORS, "chains": {}, **provenance()}
    for seed in plan.seeds:
        probe = Chain(plan, data, out, seed, plan.lr_grid[0], log)
        gen0_folder = out / f"seed{seed}" / "gen0"
        if seed == plan.seeds[0]:
            def loss_at(lr: float) -> float:
                folder = out / "lr-sweep" / f"lr{lr:g}"
                folder.mkdir(parents=True, exist_ok=True)
                model = probe.fit(probe.human, folder, lr)
                return eval_loss(model, data.eval_windows(plan.seq_len, plan.eval_tokens))
            sweep = sweep_rates(plan.lr_grid, loss_at, 2, "generation 0")
            lr = best_rate(sweep, "generation 0")
            result["lr_sweep"] = {f"{k:g}": v for k, v in sweep.items()}
            result["lr"] = lr
            log(f"generation 0 learning rate {lr:g} (sweep: " + ", ".join(f"{k:g}: {v:.3f}" for k, v in
                                                                          sweep.items()) + ")")
        chain = Chain(plan, data, out, seed, result["lr"], log)
        if seed == plan.seeds[0]:  # the sweep's run at the chosen rate is this seed's generation 0
            gen0_folder = out / "lr-sweep" / f"lr{result['lr']:g}"
        gen0_folder.mkdir(parents=True, exist_ok=True)
        chain.gen0 = chain.fit(chain.human, gen0_folder)
        gen0 = {**chain.measure(chain.gen0, gen0_folder, 0), "regime": "human", "seed": seed,
                "pool_train_tokens": sum(len(d) for d in chain.human), "pool_train_docs": len(chain.human)}
        human_eval = human_eval_docs(data, plan)[: plan.metric_docs]
        reference = {**text_metrics(human_eval, chain.rare, data.tokenizer.vocab_size),
                     "ppl_under_gen0": _quantiles([math.exp(x) for x in document_nll(chain.gen0, human_eval,
                                                                                       chain.eot)])}
        rows = {regime: [gen0] + chain.run_regime(regime) for regime in REGIMES}
        result["chains"][str(seed)] = {"rows": rows, "human_reference": reference}
    result["gaussian"] = gaussian_collapse(plan.gaussian_n, plan.gaussian_chains, plan.gaussian_generations)
    result["minutes"] = (time.perf_counter() - started) / 60
    logs = [log_path.read_text().splitlines() for log_path in out.rglob("train.jsonl")]
    result["train_minutes"] = sum(json.loads(lines[-1])["seconds"] for lines in logs if lines) / 60
    result["findings"] = findings(result)
    if docs is not None:
        write_docs(result, Path(docs))
    return result


def _check_plan(plan: Plan, out: Path) -> None:
    """Runs in `out` are reused when the lab is rerun: only with the plan they were trained under (seeds may be
    added)."""
    path = out / "plan.json"
    mine = {k: v for k, v in dataclasses.asdict(plan).items() if k != "seeds"}
    if path.exists():
        theirs = json.loads(path.read_text())
        if theirs != json.loads(json.dumps(mine)):
            raise LigeroError(f"{out} holds collapse-lab runs of another plan; give another --out (or delete it)")
    else:
        path.write_text(json.dumps(mine, indent=1))


def human_eval_docs(data: LabData, plan: Plan) -> list[list[int]]:
    """Held-out human documents (the evaluation split cut as the pool is) for the reference metrics."""
    evaluation = LabData(data.tokenizer, data.eval, data.eval, data.provenance)
    return human_documents(evaluation, dataclasses.replace(plan, pool_tokens=plan.metric_docs * plan.doc_tokens))


# --- the report ------------------------------------------------------------------------------------------------
def _mean_over_seeds(result: dict, regime: str, key: str) -> list[float]:
    chains = list(result["chains"].values())
    n = len(chains[0]["rows"][regime])
    return [statistics.fmean(c["rows"][regime][g][key] for c in chains) for g in range(n)]


def _per_seed_change(result: dict, regime: str, key: str) -> list[float]:
    """Relative change of `key` from generation 0 to the last generation, per seed."""
    return [c["rows"][regime][-1][key] / c["rows"][regime][0][key] - 1 for c in result["chains"].values()]


def _spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:+.1%}"
    return f"{mean:+.1%} (seeds: {', '.join(f'{v:+.1%}' for v in values)})"


def findings(result: dict) -> list[str]:
    """What the numbers say, regime by regime, with every seed's value."""
    g = result["plan"]["generations"]
    ppl0 = _mean_over_seeds(result, "replace", "eval_ppl")[0]
    change = {r: _per_seed_change(result, r, "eval_ppl") for r in REGIMES}
    out = [f"Held-out perplexity from generation 0 ({ppl0:.1f}) to generation {g}: "
           + "; ".join(f"{r} {_spread(change[r])}" for r in REGIMES) + "."]
    worse = lambda r: min(change[r]) > 0  # noqa: E731 (every seed)
    out.append(f"Replacing the data {'degrades' if worse('replace') else 'does not degrade'} the model on human text "
               f"in every seed; accumulating {'also degrades it, less' if worse('accumulate') else 'holds it'} "
               f"({_spread(change['accumulate'])} against {_spread(change['replace'])}).")
    h10, wm, lk = (statistics.fmean(change[r]) for r in ("human10", "watermark_filter", "likelihood_filter"))
    out.append(f"Keeping 10 % human data: {statistics.fmean(change['human10']):+.1%} against replace's "
               f"{statistics.fmean(change['replace']):+.1%}. Dropping watermarked texts from that pool: "
               f"{wm:+.1%} ({'better' if wm < h10 else 'worse'} than the unfiltered pool's {h10:+.1%}); dropping the "
               f"least likely 20 %: {lk:+.1%}.")
    chain = list(result["chains"].values())[0]
    mean_of = lambda rows, key: statistics.fmean(x[key] for x in rows)  # noqa: E731
    for r in ("watermark_filter", "likelihood_filter"):
        rows = chain["rows"][r][1:]
        out.append(f"{r}: dropped {mean_of(rows, 'dropped_synthetic_share'):.1%} of the synthetic and "
                   f"{mean_of(rows, 'dropped_human_share'):.1%} of the human documents per generation, training on "
                   f"{mean_of(rows, 'pool_train_tokens'):,.0f} tokens of pool on average (human10: "
                   f"{mean_of(chain['rows']['human10'][1:], 'pool_train_tokens'):,.0f}).")
    rare0 = _mean_over_seeds(result, "replace", "rare_mass")[0]
    human_rare = chain["human_reference"]["rare_mass"]
    out.append(f"Tails: rare tokens are {human_rare:.1%} of held-out human text and {rare0:.1%} of generation 0's "
               f"samples; at generation {g}: " + ", ".join(
                   f"{r} {_mean_over_seeds(result, r, 'rare_mass')[-1]:.1%}" for r in REGIMES) + ".")
    return out


def write_docs(result: dict, docs: Path) -> None:
    from ligero.eval.metrics.plots import pyplot, save

    docs.mkdir(parents=True, exist_ok=True)
    figures = docs / "lab-collapse"
    figures.mkdir(exist_ok=True)
    plt = pyplot()
    metrics = [("eval_ppl", "perplexity on held-out human text"), ("rare_mass", "rare-token mass of samples"),
               ("distinct3", "distinct-3 of samples"), ("vocab_coverage", "vocabulary coverage of samples")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4))
    reference = list(result["chains"].values())[0]["human_reference"]
    for ax, (key, label) in zip(axes, metrics):
        for regime in REGIMES:
            ys = _mean_over_seeds(result, regime, key)
            ax.plot(range(len(ys)), ys, marker="o", ms=3, label=regime)
        if key in reference:
            ax.axhline(reference[key], color="black", lw=0.8, ls=":", label="human text")
        ax.set_xlabel("generation")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    save(fig, figures / "generations.png")
    chain = list(result["chains"].values())[0]["rows"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    boxes, labels = [], []
    for regime in REGIMES:
        for row in (chain[regime][0], chain[regime][-1]) if regime == "replace" else (chain[regime][-1],):
            q = row["ppl_under_gen0"]
            boxes.append({"med": q["median"], "q1": q["p25"], "q3": q["p75"], "whislo": q["p05"], "whishi": q["p95"],
                          "fliers": []})
            labels.append(f"{'gen 0' if row['generation'] == 0 else regime}\n(gen {row['generation']})")
    ax.bxp(boxes, showfliers=False)
    ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("per-document perplexity under gen 0")
    ax.grid(alpha=0.3, axis="y")
    save(fig, figures / "gen0-perplexity.png")
    gauss = result["gaussian"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    xs = [p["generation"] for p in gauss["points"]]
    for key, label, style in (("mle_mean", "MLE fit: mean variance", "-o"), ("mle_theory", "theory ((n-1)/n)^k", ":"),
                              ("unbiased_median", "unbiased fit: median variance", "-s"),
                              ("unbiased_median_theory", "theory exp(k E[log chi2/(n-1)])", ":"),
                              ("accumulate_median", "accumulate: median variance", "-^")):
        ax.plot(xs, [p[key] for p in gauss["points"]], style, ms=3, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("generation")
    ax.set_ylabel("fitted variance (true: 1)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save(fig, figures / "gaussian.png")
    (docs / "lab-collapse.json").write_text(json.dumps(result, indent=1))
    (docs / "lab-collapse.md").write_text(render(result))


def render(result: dict) -> str:
    plan = result["plan"]
    m = result["machine"]
    seeds = list(result["chains"])
    lines = [
        "# Lab: model collapse on synthetic data, and what prevents it",
        "",
        f"Written by `ligero lab collapse{' --quick' if plan['size'] == 'test' else ''}` at commit "
        f"{result['commit']}{' on ' + m['cpu'] if m.get('cpu') else ''} ({m.get('threads', '?')} threads), "
        f"{result['minutes']:.0f} min for this invocation (finished runs are reused); the {plan['generations']} "
        f"generations x {len(REGIMES)} regimes and the sweep took {result['train_minutes']:.0f} min of training as "
        "they ran (from their logs). Every "
        f"generation is a fresh `{plan['size']}` model (same initialisation) trained for {plan['steps']} steps of "
        f"{plan['batch_rows']} x {plan['seq_len']} tokens ({plan['steps'] * plan['batch_rows'] * plan['seq_len']:,} "
        f"tokens seen, the same in every regime) at learning rate {result['lr']:g} (swept on generation 0: "
        + ", ".join(f"{k}: {v:.3f}" for k, v in result["lr_sweep"].items()) + " nats). Pools hold about "
        f"{plan['pool_tokens']:,} tokens of documents up to {plan['doc_tokens']} tokens; generation 0's is human "
        f"(Wikipedia training passages, sha256 `{result['data']['train_split']['sha256'][:12]}…`, "
        f"{plan['vocab_size']}-entry BPE); samples are unconditional at temperature 1. Held-out perplexity is on "
        f"the first {plan['eval_tokens']:,} tokens of the evaluation split. Seeds: {', '.join(seeds)}"
        + (" (values are means over seeds)." if len(seeds) > 1 else " (one chain per regime: differences of a few "
                                                                     "percent are within seed noise)."),
        "",
        "## Held-out perplexity per generation",
        "",
        "| regime | " + " | ".join(f"gen {g}" for g in range(plan["generations"] + 1)) + " |",
        "|---|" + "---|" * (plan["generations"] + 1),
    ]
    for r in REGIMES:
        lines.append(f"| {r} | " + " | ".join(f"{x:.1f}" for x in _mean_over_seeds(result, r, "eval_ppl")) + " |")
    ref = list(result["chains"].values())[0]["human_reference"]
    lines += ["", "## The samples: tails and diversity (last generation)", "",
              f"Rare tokens: those ranked past {plan['rare_rank']} in the human pool's frequencies. Per-document "
              "perplexity: each sample scored by generation 0 (quartiles).", "",
              "| | rare-token mass | distinct-2 | distinct-3 | vocabulary coverage | mean tokens / doc | "
              "ppl under gen 0 (p25 / median / p75) |", "|---|---|---|---|---|---|---|",
              f"| human text (held out) | {ref['rare_mass']:.3f} | {ref['distinct2']:.3f} | {ref['distinct3']:.3f} | "
              f"{ref['vocab_coverage']:.3f} | {ref['mean_doc_tokens']:.0f} | {_q(ref['ppl_under_gen0'])} |"]
    chain = list(result["chains"].values())[0]["rows"]
    g0 = chain["replace"][0]
    lines.append(f"| generation 0 | {g0['rare_mass']:.3f} | {g0['distinct2']:.3f} | {g0['distinct3']:.3f} | "
                 f"{g0['vocab_coverage']:.3f} | {g0['mean_doc_tokens']:.0f} | {_q(g0['ppl_under_gen0'])} |")
    for r in REGIMES:
        last = chain[r][-1]
        lines.append(f"| {r}, gen {last['generation']} | {_mean_over_seeds(result, r, 'rare_mass')[-1]:.3f} | "
                     f"{_mean_over_seeds(result, r, 'distinct2')[-1]:.3f} | "
                     f"{_mean_over_seeds(result, r, 'distinct3')[-1]:.3f} | "
                     f"{_mean_over_seeds(result, r, 'vocab_coverage')[-1]:.3f} | {last['mean_doc_tokens']:.0f} | "
                     f"{_q(last['ppl_under_gen0'])} |")
    seen = plan["steps"] * plan["batch_rows"] * plan["seq_len"]
    lines += ["", "## The filters", "",
              "Both filters start from human10's pool (10 % human documents, 90 % samples; the watermark filter's "
              "generators mark their samples) and remove documents; nothing replaces them, so the model sees the "
              "same number of tokens from a smaller pool (more epochs over it).", "",
              "| regime | generation | synthetic docs dropped | human docs dropped | pool tokens | epochs over the "
              "pool |", "|---|---|---|---|---|---|"]
    for r in ("human10", "watermark_filter", "likelihood_filter"):
        for row in chain[r][1:]:
            dropped = [f"{row[k]:.1%}" if k in row else "-" for k in ("dropped_synthetic_share",
                                                                     "dropped_human_share")]
            lines.append(f"| {r} | {row['generation']} | {dropped[0]} | {dropped[1]} | {row['pool_train_tokens']:,} | "
                         f"{seen / row['pool_train_tokens']:.1f} |")
    gauss = result["gaussian"]
    lines += ["", "## The Gaussian model (Shumailov et al.)", "",
              f"{gauss['chains']} chains, n = {gauss['n']} samples per generation, the true variance 1.", "",
              "| fits | MLE: mean variance | theory ((n-1)/n)^k | unbiased: mean | unbiased: median | theory (median) "
              "| accumulate: median |", "|---|---|---|---|---|---|---|"]
    for p in gauss["points"]:
        lines.append(f"| {p['generation']} | {p['mle_mean']:.3g} | {p['mle_theory']:.3g} | {p['unbiased_mean']:.3g} | "
                     f"{p['unbiased_median']:.3g} | {p['unbiased_median_theory']:.3g} | {p['accumulate_median']:.3g} |")
    lines += ["", "## Findings", ""] + [f"- {f}" for f in result["findings"]]
    lines += ["", "## Anchors", ""] + [f"- {who}: {what}." for who, what in result["anchors"]]
    lines += ["", "![generations](lab-collapse/generations.png)", "",
              "![per-document perplexity under generation 0](lab-collapse/gen0-perplexity.png)", "",
              "![Gaussian](lab-collapse/gaussian.png)", ""]
    return "\n".join(lines)


def _q(q: dict) -> str:
    return f"{q['p25']:.0f} / {q['median']:.0f} / {q['p75']:.0f}"


def lab_collapse(quick: bool, out: str | Path, docs: str | Path | None, log=print) -> dict:
    """`ligero lab collapse [--quick]`."""
    return run_lab(QUICK if quick else FULL, out, docs, log=log)
