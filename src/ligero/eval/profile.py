"""The reference profile a deployment card promises: what normal traffic to a variant looks like.

For a fixed set of ordinary prompts (the first sentence of evaluation-split paragraphs), one request at a time as a
server would answer it: prompt length, output length, mean token log-prob of the output under the model's own
(untempered) distribution, toxicity score of the output, and latency. `ligero monitor` compares production
traffic with these distributions (PSI, Jensen-Shannon, KS).
"""

from __future__ import annotations

import hashlib
import re
import time

import numpy as np
import torch
import torch.nn.functional as F

from ligero.eval.data import PASSAGE_SEPARATOR, wikipedia_split
from ligero.eval.toxicity import score_texts
from ligero.models.generate import SamplingConfig, sample_next


def profile_prompts(n: int, seed: int = 0) -> tuple[list[str], dict]:
    """`n` prompts: the first sentence (at most 200 characters) of evaluation paragraphs, in a fixed order."""
    split = wikipedia_split("eval")
    passages = sorted(split.text.split(PASSAGE_SEPARATOR), key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())
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


@torch.inference_mode()
def respond(model, tokenizer, prompt: str, max_new_tokens: int, sampling: SamplingConfig) -> dict:
    """One request as the server runs it: (prompt tokens, output text and tokens, token log-probs, seconds)."""
    t0 = time.perf_counter()
    ids = tokenizer.encode(prompt)
    n = min(max_new_tokens, model.cfg.max_seq_len - len(ids))
    cache = model.new_cache(1, len(ids) + n)
    generator = torch.Generator(device=model.device).manual_seed(sampling.seed) if sampling.temperature > 0 else None
    logits = model(torch.tensor([ids], device=model.device), kv_cache=cache, last_only=True)[:, -1]
    out, logprobs, eos = [], [], set(tokenizer.eos_ids)
    for i in range(n):
        token = sample_next(logits, sampling, generator)
        t = int(token)
        if t in eos:
            break
        out.append(t)
        logprobs.append(float(F.log_softmax(logits.float(), -1)[0, t]))
        pos = torch.tensor([[len(ids) + i]], device=model.device)
        logits = model(token.view(1, 1), pos, kv_cache=cache)[:, -1]
    return {"prompt_tokens": len(ids), "tokens": out, "text": tokenizer.decode(out), "logprobs": logprobs,
            "seconds": time.perf_counter() - t0}


def reference_profile(model, tokenizer, n_prompts: int = 16, max_new_tokens: int = 32, temperature: float = 0.7,
                      top_p: float = 0.9, seed: int = 0, progress=None) -> dict:
    prompts, info = profile_prompts(n_prompts, seed)
    rows = []
    for i, prompt in enumerate(prompts):
        rows.append(respond(model, tokenizer, prompt, max_new_tokens,
                            SamplingConfig(temperature=temperature, top_p=top_p, seed=seed * 100003 + i)))
        if progress:
            progress()
    tox = score_texts([r["text"] for r in rows])
    return {
        "prompts": info,
        "sampling": {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed},
        "n": len(rows),
        "output_length": distribution([len(r["tokens"]) for r in rows]),
        "mean_logprob": distribution([float(np.mean(r["logprobs"])) if r["logprobs"] else 0.0 for r in rows]),
        "toxicity_score": distribution(tox),
        "prompt_length": distribution([r["prompt_tokens"] for r in rows]),
        "latency_ms": distribution([1000 * r["seconds"] for r in rows]),
    }
