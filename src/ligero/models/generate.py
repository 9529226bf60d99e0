"""Batched generation: left padding, a static KV cache, greedy / temperature / top-k / top-p sampling."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ligero.errors import LigeroError
from ligero.models.transformer import Transformer


@dataclass
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise LigeroError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise LigeroError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise LigeroError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> next token ids [B]."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already reach top_p (the top token always stays).
        drop = probs.cumsum(-1) - probs >= cfg.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per sequence (stop token / stop string excluded)
    texts: list[str]
    finish_reasons: list[str]  # "eos", "stop", "length"
    prompt_tokens: list[int] = field(default_factory=list)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [B, T] and positions [B, T] (-1 on padding) for left-padded prompts."""
    longest = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    positions = torch.full((len(prompts), longest), -1, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, longest - len(p):] = torch.tensor(p, dtype=torch.long)
        positions[i, longest - len(p):] = torch.arange(len(p))
    return tokens, positions


@torch.inference_mode()
def generate_tokens(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    eos_ids: list[int] | None = None,
    pad_id: int = 0,
    on_token: Callable[[int, int], bool] | None = None,
) -> tuple[list[list[int]], list[str]]:
    """Generate token ids for a batch of prompts: (new tokens per sequence, EOS excluded; finish reasons).

    `on_token(i, token)` sees each new token of an unfinished sequence and returns True to finish it.
    """
    sampling = sampling or SamplingConfig()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise LigeroError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise LigeroError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    longest, ctx = max(len(p) for p in prompts), model.cfg.max_seq_len
    if longest >= ctx:
        raise LigeroError(f"the prompt is {longest} tokens but the model's context is {ctx}; shorten the prompt")
    max_new_tokens = min(max_new_tokens, ctx - longest)
    device = model.device
    tokens, positions = left_pad(prompts, pad_id)
    tokens, positions = tokens.to(device), positions.to(device)
    cache = model.new_cache(len(prompts), longest + max_new_tokens)
    generator = torch.Generator(device=device).manual_seed(sampling.seed) if sampling.temperature > 0 else None
    eos = set(eos_ids or [])
    done = [False] * len(prompts)
    reasons = ["length"] * len(prompts)
    new: list[list[int]] = [[] for _ in prompts]
    next_pos = positions[:, -1:] + 1  # [B, 1]
    logits = model(tokens, positions, kv_cache=cache, last_only=True)[:, -1]
    for _ in range(max_new_tokens):
        nxt = sample_next(logits, sampling, generator).tolist()
        for i, t in enumerate(nxt):
            if done[i]:
                nxt[i] = pad_id
            elif t in eos:
                done[i], reasons[i] = True, "eos"
            else:
                new[i].append(t)
                if on_token and on_token(i, t):
                    done[i], reasons[i] = True, "stop"
        if all(done):
            break
        logits = model(torch.tensor(nxt, device=device)[:, None], next_pos, kv_cache=cache)[:, -1]
        next_pos = next_pos + 1
    return new, reasons


def generate(
    model: Transformer,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 64,
    sampling: SamplingConfig | None = None,
    stop_strings: list[str] | None = None,
    on_text: Callable[[int, str], None] | None = None,
    add_bos: bool | None = None,
) -> GenerationResult:
    """Generate for a batch of text prompts; stop on EOS or a stop string; `on_text(i, delta)` streams text."""
    ids = [tokenizer.encode(p, add_bos=add_bos) for p in prompts]
    stop_strings = [s for s in (stop_strings or []) if s]
    hold = max([len(s) - 1 for s in stop_strings] + [0])  # text that could still grow into a stop string
    out: list[list[int]] = [[] for _ in prompts]
    texts, shown = [""] * len(prompts), [""] * len(prompts)

    def on_token(i: int, token: int) -> bool:
        out[i].append(token)
        text = tokenizer.decode(out[i])
        cuts = [c for c in (text.find(s) for s in stop_strings) if c >= 0]
        texts[i] = text[: min(cuts)] if cuts else text
        if on_text:
            # Never stream a half-decoded UTF-8 character or the start of a possible stop string.
            safe = texts[i] if cuts else texts[i][: len(texts[i]) - hold].rstrip("\ufffd")
            if len(safe) > len(shown[i]) and safe.startswith(shown[i]):
                on_text(i, safe[len(shown[i]):])
                shown[i] = safe
        return bool(cuts)

    new, reasons = generate_tokens(model, ids, max_new_tokens, sampling, tokenizer.eos_ids, tokenizer.pad_id, on_token)
    for i in range(len(prompts)):
        if on_text and len(texts[i]) > len(shown[i]):
            on_text(i, texts[i][len(shown[i]):])
    return GenerationResult(new, texts, reasons, [len(x) for x in ids])
