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
from ligero.models.transformer import KVFormat, Transformer

HEAD_CHUNK = 128  # positions per vocabulary-head call


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
    BOS (or EOS) token; only the continuation's tokens count. The options of one context share its prefill where
    the model keeps a full-precision KV cache (the same sums, to float rounding)."""
    start = [prefix_token(tokenizer)]
    groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}  # context -> [(pair index, continuation)]
    for i, (context, continuation) in enumerate(pairs):
        ctx_ids, cont_ids = tokenizer.encode(context, add_bos=False), tokenizer.encode(continuation, add_bos=False)
        if not cont_ids:
            raise LigeroError(f"continuation {i} ({continuation!r}) has no tokens to score; drop empty options")
        groups.setdefault(tuple(start + ctx_ids), []).append((i, cont_ids))
    pad_id = tokenizer.pad_id or 0
    if len(groups) < len(pairs) and isinstance(model, Transformer) and type(model.kv_format) is KVFormat:
        return _score_shared_contexts(model, list(groups.items()), len(pairs), batch_size, pad_id, progress)
    rows, n_prefix, where = [], [], []
    for ctx, options in groups.items():
        for i, cont in options:
            rows.append(list(ctx) + cont)
            n_prefix.append(len(ctx))
            where.append(i)
    sums = [0.0] * len(pairs)
    for i, value in zip(where, _score_rows(model, rows, n_prefix, batch_size, pad_id, progress)):
        sums[i] = value
    return sums


def _score_shared_contexts(model, groups: list, n_pairs: int, batch_size: int, pad_id: int,
                           progress=None) -> list[float]:
    """continuation_logprobs over [(context, [(pair index, continuation)])]: batches of at most `batch_size`
    contexts of similar length whose prefill (past the first) holds at most batch_token_budget tokens; their
    continuations then run together (a few tokens each, from copies of the contexts' cache rows)."""
    sums = [0.0] * n_pairs
    for chosen in _length_batches([len(ctx) for ctx, _ in groups], batch_size, batch_token_budget(model.cfg)):
        batch = [groups[g] for g in chosen]
        for i, value in _score_context_batch(model, batch, pad_id):
            sums[i] = value
        if progress:
            progress(sum(len(options) for _, options in batch))
    return sums


def _score_context_batch(model, batch: list, pad_id: int) -> list[tuple[int, float]]:
    """Each context prefilled once (left-padded), then every continuation of every context in one pass from a copy
    of its context's cache row: [(pair index, log-likelihood)]."""
    device, G = model.device, len(batch)
    width = max(len(ctx) for ctx, _ in batch)
    options = [(g, i, cont) for g, (_, opts) in enumerate(batch) for i, cont in opts]
    cont_width = max(len(cont) for _, _, cont in options)
    tokens = torch.full((G, width), pad_id, dtype=torch.long)
    positions = torch.full((G, width), -1, dtype=torch.long)
    for g, (ctx, _) in enumerate(batch):
        tokens[g, width - len(ctx):] = torch.tensor(ctx)
        positions[g, width - len(ctx):] = torch.arange(len(ctx))
    cache = model.new_cache(G, width + cont_width)
    preds, targets, owner = [], [], []  # the hidden state that predicts each continuation token, the token, its row
    with torch.inference_mode():
        last = model(tokens.to(device), positions.to(device), kv_cache=cache, last_only=True,
                     apply_head=False)[:, -1]  # [G, C]: predicts each continuation's first token
        for r, (g, _, cont) in enumerate(options):
            preds.append(last[g])
            targets.append(cont[0])
            owner.append(r)
        if cont_width > 1:  # the continuations' own tokens predict their next ones
            R = len(options)
            steps = torch.full((R, cont_width - 1), pad_id, dtype=torch.long)
            step_pos = torch.full((R, cont_width - 1), -1, dtype=torch.long)
            for r, (g, _, cont) in enumerate(options):
                n, at = len(cont) - 1, len(batch[g][0])
                steps[r, :n] = torch.tensor(cont[:-1])
                step_pos[r, :n] = torch.arange(at, at + n)
            rows = torch.tensor([g for g, _, _ in options], device=device)
            hidden = model(steps.to(device), step_pos.to(device), kv_cache=cache.take_rows(rows),
                           apply_head=False)  # [R, cont_width - 1, C]
            for r, (_, _, cont) in enumerate(options):
                for j in range(1, len(cont)):
                    preds.append(hidden[r, j - 1])
                    targets.append(cont[j])
                    owner.append(r)
        lp = _head_logprobs(model, torch.stack(preds), torch.tensor(targets, device=device))
    sums = torch.zeros(len(options), dtype=torch.float64).index_add_(0, torch.tensor(owner), lp)
    return [(i, value) for (_, i, _), value in zip(options, sums.tolist())]


def _head_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) from final normed hidden states [N, C], the vocabulary head in chunks of HEAD_CHUNK positions
    ([n, V] logits instead of [N, V]: a 49k vocabulary at 8 x 120 tokens is 190 MB per copy); [N] float64."""
    out = []
    for start in range(0, len(hidden), HEAD_CHUNK):
        part = slice(start, start + HEAD_CHUNK)
        logits = model.logits(hidden[part]).float()
        out.append(F.log_softmax(logits, dim=-1).gather(-1, targets[part, None]).squeeze(-1).double().cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def _length_batches(lengths: list[int], batch_size: int, budget: float):
    """Indices into `lengths` in batches of similar length: sorted (padding is wasted compute), at most
    `batch_size` per batch and, past the first, at most `budget` tokens, padding included (the newest is the
    widest: a batch costs count x its length)."""
    if batch_size < 1:
        raise LigeroError(f"batch size must be at least 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    start = 0
    while start < len(order):
        stop = start + 1
        while stop < len(order) and stop - start < batch_size and (stop - start + 1) * lengths[order[stop]] <= budget:
            stop += 1
        yield order[start:stop]
        start = stop


def _score_rows(model, rows: list[list[int]], n_prefix: list[int], batch_size: int, pad_id: int,
                progress=None) -> list[float]:
    """Each row's summed log-likelihood past its first n_prefix tokens; batches rows of similar length, at most
    `batch_size` of them and (past the first) at most the model's batch_token_budget tokens, padding included."""
    cfg = getattr(model, "cfg", None)
    sums = [0.0] * len(rows)
    for batch in _length_batches([len(r) for r in rows], batch_size,
                                 batch_token_budget(cfg) if cfg is not None else float("inf")):
        for i, value in zip(batch, _score_batch(model, [rows[i] for i in batch], [n_prefix[i] for i in batch], pad_id)):
            sums[i] = value
        if progress:
            progress(len(batch))
    return sums


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
    with torch.inference_mode():
        hidden = model(tokens[:, :-1], apply_head=False)[counted.to(tokens.device)]  # [N, C]: scored positions only
        lp = _head_logprobs(model, hidden, targets)
    return torch.zeros(len(rows), dtype=torch.float64).index_add_(0, row_of, lp).tolist()
