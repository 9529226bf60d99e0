"""Log-likelihood of whole texts under a causal LM, the way lm-evaluation-harness scores an empty context.

With no context, lm-eval conditions on one prefix token: the tokenizer's BOS, or EOS (end of text) when
there is no BOS (`prefix_token_id` in lm_eval/models/huggingface.py). The text is encoded without special
tokens and every one of its tokens is scored, the first one given only the prefix.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ligero.errors import LigeroError
from ligero.models.generate import batch_token_budget


def prefix_token(tokenizer) -> int:
    """lm-eval's prefix for an empty context: BOS if the tokenizer has one, else its (first) EOS."""
    if tokenizer.meta.bos_id is not None:
        return int(tokenizer.meta.bos_id)
    if tokenizer.eos_ids:
        return int(tokenizer.eos_ids[0])
    raise LigeroError("the tokenizer has neither a BOS nor an EOS token to condition on; pass prefix_ids")


def sequence_logprobs(model, tokenizer, texts: Sequence[str], batch_size: int = 8,
                      prefix_ids: Sequence[int] | None = None, progress=None) -> list[float]:
    """Total log-likelihood (natural log) of each text's tokens given the prefix, in the order of `texts`.

    `progress(n)` is called after each batch with the number of texts it scored.
    """
    prefix = list(prefix_ids) if prefix_ids is not None else [prefix_token(tokenizer)]
    if not prefix:
        raise LigeroError("prefix_ids is empty; give at least one token to condition the first token on")
    token_lists = [tokenizer.encode(text, add_bos=False) for text in texts]
    for i, ids in enumerate(token_lists):
        if not ids:
            raise LigeroError(f"text {i} ({texts[i]!r}) has no tokens to score; drop empty texts")
    return token_logprob_sums(model, prefix, token_lists, batch_size, tokenizer.pad_id, progress)


def token_logprob_sums(model, prefix: list[int], token_lists: list[list[int]], batch_size: int = 8,
                       pad_id: int = 0, progress=None) -> list[float]:
    """Sum of log p(token | prefix, earlier tokens) for each token list."""
    return _score_rows(model, [prefix + ids for ids in token_lists], [len(prefix)] * len(token_lists), batch_size,
                       pad_id, progress)


def continuation_logprobs(model, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 8,
                          progress=None) -> list[float]:
    """Log-likelihood of each continuation given its context, as lm-evaluation-harness scores multiple choice:
    context and continuation tokenized apart (the continuation keeps its leading space), the context after the
    BOS (or EOS) token; only the continuation's tokens count."""
    start = [prefix_token(tokenizer)]
    rows, n_prefix = [], []
    for i, (context, continuation) in enumerate(pairs):
        ctx_ids, cont_ids = tokenizer.encode(context, add_bos=False), tokenizer.encode(continuation, add_bos=False)
        if not cont_ids:
            raise LigeroError(f"continuation {i} ({continuation!r}) has no tokens to score; drop empty options")
        rows.append(start + ctx_ids + cont_ids)
        n_prefix.append(1 + len(ctx_ids))
    return _score_rows(model, rows, n_prefix, batch_size, tokenizer.pad_id or 0, progress)


def _score_rows(model, rows: list[list[int]], n_prefix: list[int], batch_size: int, pad_id: int,
                progress=None) -> list[float]:
    """Each row's summed log-likelihood past its first n_prefix tokens; batches rows of similar length, at most
    `batch_size` of them and (past the first) at most the model's batch_token_budget tokens, padding included."""
    if batch_size < 1:
        raise LigeroError(f"batch size must be at least 1, got {batch_size}")
    # Sorting by length keeps padding (wasted compute) small; results go back to their original slots.
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    cfg = getattr(model, "cfg", None)
    budget = batch_token_budget(cfg) if cfg is not None else float("inf")
    sums = [0.0] * len(rows)
    start = 0
    while start < len(order):
        stop = start + 1
        # Sorted by length, so the newest row is the widest: the padded batch is (count) x (its length).
        while stop < len(order) and stop - start < batch_size and (stop - start + 1) * len(rows[order[stop]]) <= budget:
            stop += 1
        batch = order[start:stop]
        for i, value in zip(batch, _score_batch(model, [rows[i] for i in batch], [n_prefix[i] for i in batch], pad_id)):
            sums[i] = value
        if progress:
            progress(len(batch))
        start = stop
    return sums


HEAD_CHUNK = 128  # positions per vocabulary-head call


def _score_batch(model, rows: list[list[int]], n_prefix: list[int], pad_id: int) -> list[float]:
    """Right-padded forward pass; only real tokens after each row's prefix count.

    Right padding needs no attention mask or positions: with causal attention a real token never sees the
    padding that follows it.
    """
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for j, row in enumerate(rows):
        tokens[j, :len(row)] = torch.tensor(row)
    lengths = torch.tensor([len(r) for r in rows])
    target_pos = torch.arange(1, width)[None, :]
    counted = (target_pos >= torch.tensor(n_prefix)[:, None]) & (target_pos < lengths[:, None])  # [B, T-1]
    row_of = counted.nonzero()[:, 0]  # each counted position's row
    tokens = tokens.to(model.device)
    targets = tokens[:, 1:][counted.to(tokens.device)]  # [N]: the token each counted position predicts
    sums = torch.zeros(len(rows), dtype=torch.float64)
    with torch.inference_mode():
        hidden = model(tokens[:, :-1], apply_head=False)[counted.to(tokens.device)]  # [N, D]
        # The vocabulary head only where a token is scored (a multiple-choice context is not), in chunks: [n, V]
        # logits instead of [B, T, V] (a 49k vocabulary at 8 x 120 tokens is 190 MB per copy).
        for start in range(0, len(hidden), HEAD_CHUNK):
            part = slice(start, start + HEAD_CHUNK)
            lp = F.log_softmax(model.logits(hidden[part]).float(), dim=-1).gather(-1, targets[part, None]).squeeze(-1)
            sums.index_add_(0, row_of[part], lp.double().cpu())
    return sums.tolist()
