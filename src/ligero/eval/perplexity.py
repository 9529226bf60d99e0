"""Perplexity over non-overlapping windows, with per-token log-probs for KL against another model.

Each window of `ctx` tokens is scored independently: token t is predicted from tokens < t of its own window,
so a window contributes ctx - 1 predictions. Bits per byte divide the total NLL (in bits) by the UTF-8 bytes
of the predicted tokens, which makes models with different tokenizers comparable.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F

from ligero.errors import LigeroError


@dataclass
class PerplexityResult:
    tokens: int  # predicted tokens
    windows: int
    ctx: int
    mean_nll: float
    ppl: float
    bits_per_byte: float
    bytes: int
    token_logprobs: list[float] = field(default_factory=list, repr=False)

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("token_logprobs")
        return d


def window_bos(tokenizer) -> int | None:
    """The BOS token each window starts with, for models trained with one (Gemma); None for SmolLM2."""
    meta = getattr(tokenizer, "meta", None)
    return meta.bos_id if meta is not None and meta.add_bos else None


def make_windows(ids: list[int], ctx: int, max_tokens: int | None = None, bos: int | None = None) -> list[list[int]]:
    """Non-overlapping windows of exactly `ctx` tokens (a shorter tail is dropped unless it is all there is).

    With `bos`, every window is BOS + ctx - 1 text tokens (as llama.cpp's perplexity does for BOS models):
    a model that always saw BOS first is not scored on a context it never had."""
    if ctx < 2:
        raise LigeroError(f"--ctx must be at least 2, got {ctx}")
    if bos is not None and ids[:1] == [bos]:
        ids = ids[1:]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    head, step = ([bos], ctx - 1) if bos is not None else ([], ctx)
    windows = [head + ids[i:i + step] for i in range(0, len(ids) - step + 1, step)]
    if not windows and len(head + ids) >= 2:
        windows = [head + ids]
    if not windows:
        raise LigeroError("the text is too short to evaluate (fewer than 2 tokens); give more text")
    return windows


def window_logprobs(model, windows: list[list[int]],
                    batch_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (log_softmax [N, ctx-1, V] float32, targets [N, ctx-1]) per batch of windows."""
    device = model.device
    for i in range(0, len(windows), batch_size):
        batch = torch.tensor(windows[i:i + batch_size], device=device)
        with torch.inference_mode():
            logits = model(batch[:, :-1])
        yield F.log_softmax(logits.float(), dim=-1), batch[:, 1:]


def perplexity(model, tokenizer, ids: list[int], ctx: int = 512, max_tokens: int | None = None,
               return_logprobs: bool = False, progress=None) -> PerplexityResult:
    if ctx > model.cfg.max_seq_len:
        raise LigeroError(f"--ctx {ctx} exceeds the model's context of {model.cfg.max_seq_len}; lower --ctx")
    windows = make_windows(ids, ctx, max_tokens, bos=window_bos(tokenizer))
    total_nll, count, n_bytes, logprobs = 0.0, 0, 0, []
    for logp, targets in window_logprobs(model, windows):
        tok_lp = logp.gather(-1, targets[..., None]).squeeze(-1)  # [N, ctx-1]
        total_nll -= float(tok_lp.double().sum())
        count += tok_lp.numel()
        for row in targets.tolist():
            n_bytes += len(tokenizer.decode(row, skip_special=False).encode("utf-8")) if tokenizer else 0
        if return_logprobs:
            logprobs.extend(tok_lp.flatten().tolist())
        if progress:
            progress()
    mean = total_nll / count
    bpb = total_nll / math.log(2) / n_bytes if n_bytes else float("nan")
    return PerplexityResult(count, len(windows), ctx, mean, math.exp(mean), bpb, n_bytes, logprobs)
