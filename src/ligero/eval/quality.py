"""Quality of a quantized model against its unquantized base on the same tokens (llama.cpp's conventions):
PPL of both, ΔPPL %, mean KL divergence KL(base || quantized) of the next-token distributions, same top token %.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from ligero.eval.perplexity import make_windows
from ligero.models.transformer import stored_bytes


@dataclass
class QualityResult:
    tokens: int
    windows: int
    ctx: int
    ppl_base: float
    ppl: float
    delta_ppl_pct: float
    kld: float  # mean over predicted tokens, nats
    kld_p99: float
    top1_agreement: float  # fraction of positions where both models rank the same token first
    bits_per_weight: float
    size_mb: float
    base_size_mb: float
    # mean NLL(variant) - NLL(base) per block of ~64 consecutive positions: the units ΔPPL's paired test resamples
    # (neighbouring tokens' differences are correlated; blocks far less)
    nll_diff_blocks: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        return asdict(self)


def bits_per_weight(model) -> float:
    """Bytes actually stored (values, scales, minimums, full-precision norms) x 8 / number of weights."""
    return stored_bytes(model) * 8 / model.cfg.n_params()


HEAD_ROWS = 64  # positions per step through the vocabulary head: a [T, V] window is ~33 MB at T = 255, V = 32k


def _row_blocks(n: int) -> list[slice]:
    """Near-equal blocks of at most about HEAD_ROWS positions. None is much shorter than the rest, so a block never
    drops to decode size (MAX_KERNEL_ROWS): every block takes the same prefill arithmetic as the whole window."""
    bounds = torch.linspace(0, n, math.ceil(n / HEAD_ROWS) + 1).round().long().tolist()
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def _head_logprobs(model, normed: torch.Tensor, rows: slice) -> torch.Tensor:
    return F.log_softmax(model.logits(normed[rows]).float(), -1)


@torch.inference_mode()
def base_logprobs(base, windows: list[list[int]], progress=None) -> list[torch.Tensor]:
    """The base model's next-token log-probs per window ([T, V] each), to reuse across many variants.
    `progress()` is called once per window."""
    out = []
    for w in windows:
        normed = base(torch.tensor([w[:-1]], device=base.device), apply_head=False)[0]  # [T, C]
        lp = None  # [T, V], filled a block of positions at a time
        for rows in _row_blocks(normed.shape[0]):
            block = _head_logprobs(base, normed, rows).cpu()
            lp = torch.empty(normed.shape[0], block.shape[-1]) if lp is None else lp
            lp[rows] = block
        out.append(lp)
        if progress:
            progress()
    return out


@torch.inference_mode()
def compare_models(base, quant, ids: list[int], ctx: int = 512, max_tokens: int | None = None,
                   progress=None, bos: int | None = None, base_lp: list[torch.Tensor] | None = None,
                   base_bytes: int | None = None) -> QualityResult:
    """Both models on the same windows (each starting with `bos` when given: see make_windows). `base_lp`
    (from base_logprobs on the same windows) saves recomputing the base model for every variant; with it and
    `base_bytes` (its stored_bytes), `base` may be None (the base model released).

    The vocabulary head runs a block of positions at a time (the same blocks as base_logprobs), so no [T, V]
    temporaries are held beyond the baseline's log-probs: at a 32k vocabulary each is ~33 MB per 255 positions."""
    if base is None and (base_lp is None or base_bytes is None):
        raise ValueError("compare_models without the base model needs base_lp and base_bytes")
    windows = make_windows(ids, ctx, max_tokens, bos=bos)
    nll_b = nll_q = 0.0
    kls, agree, count, blocks = [], 0, 0, []
    for i, window in enumerate(windows):
        x = torch.tensor([window])
        normed_q = quant(x[:, :-1].to(quant.device), apply_head=False)[0]  # [T, C]
        normed_b = base(x[:, :-1].to(base.device), apply_head=False)[0] if base_lp is None else None
        target = x[0, 1:, None]
        for rows in _row_blocks(target.shape[0]):
            lp_b = base_lp[i][rows] if base_lp is not None else _head_logprobs(base, normed_b, rows).cpu()
            lp_q = _head_logprobs(quant, normed_q, rows).to(lp_b.device)
            t = target[rows].to(lp_b.device)
            block_b, block_q = -float(lp_b.gather(-1, t).double().sum()), -float(lp_q.gather(-1, t).double().sum())
            nll_b, nll_q = nll_b + block_b, nll_q + block_q
            blocks.append((block_q - block_b) / t.shape[0])
            kls.append((lp_b.exp() * (lp_b - lp_q)).sum(-1))  # KL(base || variant) at each position
            agree += int((lp_b.argmax(-1) == lp_q.argmax(-1)).sum())
        count += target.shape[0]
        if progress:
            progress()
    kl = torch.cat(kls).double()
    ppl_b, ppl_q = math.exp(nll_b / count), math.exp(nll_q / count)
    return QualityResult(
        tokens=count, windows=len(windows), ctx=ctx, ppl_base=ppl_b, ppl=ppl_q,
        delta_ppl_pct=100 * (ppl_q / ppl_b - 1), kld=float(kl.mean()), kld_p99=float(torch.quantile(kl.float(), 0.99)),
        top1_agreement=agree / count, bits_per_weight=bits_per_weight(quant), size_mb=stored_bytes(quant) / 1e6,
        base_size_mb=(stored_bytes(base) if base_bytes is None else base_bytes) / 1e6, nll_diff_blocks=blocks,
    )
