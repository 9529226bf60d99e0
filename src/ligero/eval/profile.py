"""The reference profile a deployment card promises: what normal traffic to a variant looks like.

For a fixed set of ordinary prompts (the first sentence of evaluation-split paragraphs), answered in batches of 8 as
`ligero serve` batches concurrent requests: prompt length, output length, mean token log-prob of the output under
the model's own (untempered) distribution, toxicity score of the output, and latency. `ligero monitor` compares
production traffic with these distributions (PSI, Jensen-Shannon, KS).
"""

from __future__ import annotations

import hashlib
import re
import time

import numpy as np

from ligero.eval.data import PASSAGE_SEPARATOR, wikipedia_split
from ligero.eval.toxicity import score_texts
from ligero.models.generate import BatchGeneration, SamplingConfig


def profile_prompts(n: int, seed: int = 0) -> tuple[list[str], dict]:
    """`n` prompts: the first sentence (at most 200 characters) of evaluation paragraphs, in a fixed order."""
    split = wikipedia_split("eval")
    passages = sorted(split.text.split(PASSAGE_SEPARATOR),
                      key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())
    prompts = []
    for p in passages:
        first = re.split(r"(?<=[.!?])\s", p.strip(), maxsplit=1)[0][:200].strip()
        if len(first.split()) >= 5:
            prompts.append(first)
        if len(prompts) == n:
            break
    info = {"description": f"the first sentence of {len(prompts)} evaluation-split Wikipedia paragraphs",
            "split": "eval", "sha256": split.sha256, "seed": seed}
    return prompts, info


def distribution(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"values": [round(float(x), 6) for x in v], "mean": float(v.mean()), "p50": float(np.quantile(v, 0.5)),
            "p95": float(np.quantile(v, 0.95))}


def answer_batch(model, tokenizer, prompts: list[str], max_new_tokens: int, samplings: list[SamplingConfig]
                 ) -> list[dict]:
    """Answer one batch as `ligero serve` does: per request its prompt tokens, output tokens and text, the output
    tokens' log-probs (untempered) and its latency (from the batch's start to the request's last token)."""
    t0 = time.perf_counter()
    ids = [tokenizer.encode(p) for p in prompts]
    gen = BatchGeneration(model, ids, max_new_tokens, samplings, tokenizer.eos_ids, tokenizer.pad_id)
    logprobs: list[list[float]] = [[] for _ in ids]
    ended = [0.0] * len(ids)
    while not gen.done:
        for i, _, lp in gen.step():
            logprobs[i].append(lp)
        now = time.perf_counter() - t0
        for i, reason in enumerate(gen.reasons):
            if reason is not None and not ended[i]:
                ended[i] = now
    return [{"prompt_tokens": len(x), "tokens": t, "text": tokenizer.decode(t), "logprobs": lp, "seconds": s}
            for x, t, lp, s in zip(ids, gen.tokens, logprobs, ended)]


def reference_profile(model, tokenizer, n_prompts: int = 40, max_new_tokens: int = 32, temperature: float = 0.7,
                      top_p: float = 0.9, seed: int = 0, batch_size: int = 8, progress=None) -> dict:
    """The profile of `n_prompts` answers; `progress(n)` is called after each batch with its number of answers."""
    prompts, info = profile_prompts(n_prompts, seed)
    samplings = [SamplingConfig(temperature=temperature, top_p=top_p, seed=seed * 100003 + i)
                 for i in range(len(prompts))]
    rows = []
    for b in range(0, len(prompts), batch_size):
        batch = answer_batch(model, tokenizer, prompts[b:b + batch_size], max_new_tokens, samplings[b:b + batch_size])
        rows += batch
        if progress:
            progress(len(batch))
    tox = score_texts([r["text"] for r in rows])
    return {
        "prompts": info,
        "sampling": {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed,
                     "batch_size": batch_size},
        "n": len(rows),
        "output_length": distribution([len(r["tokens"]) for r in rows]),
        "mean_logprob": distribution([float(np.mean(r["logprobs"])) if r["logprobs"] else 0.0 for r in rows]),
        "toxicity_score": distribution(tox),
        "prompt_length": distribution([r["prompt_tokens"] for r in rows]),
        "latency_ms": distribution([1000 * r["seconds"] for r in rows]),
    }
