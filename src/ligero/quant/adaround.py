"""AdaRound (Nagel et al., 2020): learn, per weight, whether to round down or up.

Layer by layer in model order: inputs come from the model quantized so far, targets from the full-precision
model. Per layer, minimise ||W x_fp - W~(h) x_q||^2 + lambda * sum(1 - |2h - 1|^beta) over h = clip(sigmoid(V)
* 1.2 - 0.1, 0, 1), initialised at the fractional part, beta annealed 20 -> 2 after a warm-up; then round hard.
The grid (fp16 scale and minimum per group) is round-to-nearest's, so the layer is stored as an IntGroupLinear.
"""

from __future__ import annotations

import copy
import math

import torch

from ligero.models.transformer import Linear, Transformer
from ligero.progress import progress_bar
from ligero.quant import formats
from ligero.quant.config import AdaRoundConfig
from ligero.quant.modules import IntGroupLinear

ZETA, GAMMA = 1.1, -0.1  # rectified sigmoid stretch: h = clip(sigmoid(V) * (ZETA - GAMMA) + GAMMA, 0, 1)


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


def adaround_layer(weight: torch.Tensor, x_q: torch.Tensor, x_fp: torch.Tensor, cfg: AdaRoundConfig,
                   segments=None) -> IntGroupLinear:
    """Learn the rounding of one [out, in] weight given its calibration inputs [N, in] (quantized / fp paths)."""
    layer = IntGroupLinear.from_float(weight, cfg, segments)  # the grid: scales and minimums as round-to-nearest
    n = weight.shape[1]
    scale = formats.expand_groups(layer.scale.float(), cfg.group_size, n)
    minimum = formats.expand_groups(layer.minimum.float(), cfg.group_size, n)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    qmax = (1 << cfg.bits) - 1
    w_over_s = (weight.float() - minimum) / safe
    w_floor = w_over_s.floor()
    frac = (w_over_s - w_floor).clamp(0, 1)
    p = ((frac - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
    v = torch.log(p / (1 - p)).requires_grad_()  # rectified_sigmoid(v) == frac at the start
    target = x_fp @ weight.float().T  # [N, out]
    opt = torch.optim.Adam([v], lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed)
    warm = int(cfg.warmup * cfg.iters)
    for it in range(cfg.iters):
        idx = torch.randint(0, x_q.shape[0], (min(cfg.batch_tokens, x_q.shape[0]),), generator=g)
        h = rectified_sigmoid(v)
        w_hat = (w_floor + h).clamp(0, qmax) * scale + minimum
        rec = (x_q[idx] @ w_hat.T - target[idx]).pow(2).sum(1).mean()
        loss = rec
        if it >= warm:
            progress = (it - warm) / max(1, cfg.iters - warm)
            beta = cfg.beta[1] + 0.5 * (cfg.beta[0] - cfg.beta[1]) * (1 + math.cos(math.pi * progress))
            loss = rec + cfg.reg_weight * (1 - (2 * h - 1).abs().pow(beta)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        q = (w_floor + (v >= 0).float()).clamp(0, qmax).to(torch.uint8)
        layer.set_codes(q)
    return layer


def block_linears(block: torch.nn.Module) -> list[str]:
    """A block's linears in the order its forward runs them (an MoE layer's experts one after another); an MoE
    router stays in full precision, as Recipe.config_for keeps it."""
    return [n for n, m in block.named_modules() if isinstance(m, Linear) and not n.endswith("mlp.router")]


def _expert_inputs(block, fp_block, x_q, x_fp, name: str):
    """Paired inputs [N, in] of an expert's linear on the quantized and full-precision paths (x_q, x_fp: the MoE
    layer's inputs on each), over the tokens the full-precision router sends to that expert (the quantized router
    may send others; AdaRound's reconstruction needs the same tokens on both sides). (None, None) when no token
    goes there."""
    expert_path, _, _ = name.rpartition(".")  # mlp.experts.E
    expert = int(expert_path.rpartition(".")[2])
    rows = (fp_block.mlp.route(x_fp).experts == expert).any(-1)
    if not rows.any():
        return None, None

    def inputs(b, x):
        seen = {}
        hook = b.get_submodule(name).register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0]))
        try:
            b.get_submodule(expert_path)(x[rows])
        finally:
            hook.remove()
        return seen["x"].detach()

    return inputs(block, x_q), inputs(fp_block, x_fp)


def _capture_inputs(block, x, ctx, names) -> dict[str, torch.Tensor]:
    """Run one block and return the input [N, in] of each named submodule."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [block.get_submodule(n).register_forward_pre_hook(
        lambda _m, args, n=n: seen.__setitem__(n, args[0].detach().reshape(-1, args[0].shape[-1]))) for n in names]
    try:
        block(x, ctx)
    finally:
        for h in hooks:
            h.remove()
    return seen


@torch.no_grad()
def adaround_model(model: Transformer, cfg: AdaRoundConfig, calibration: list[list[int]], layer_filter=None) -> None:
    """Replace every block linear of `model` (in place) by its AdaRound-quantized IntGroupLinear."""
    fp_model = copy.deepcopy(model)
    tokens = torch.tensor(calibration, device=model.device)
    positions = torch.arange(tokens.shape[1], device=model.device).expand_as(tokens)
    ctx = model.attention_inputs(positions, model.dtype)
    h_q = model.embed_tokens(tokens)
    h_fp = fp_model.embed_tokens(tokens)
    selected = [[name for name in block_linears(block) if layer_filter is None
                 or layer_filter(f"layers.{i}.{name}", block.get_submodule(name))]
                for i, block in enumerate(model.layers)]
    with progress_bar("AdaRound layers", total=sum(map(len, selected))) as advance:
        for i, (block, fp_block) in enumerate(zip(model.layers, fp_model.layers)):
            kind_ctx = ctx[model.cfg.layer_types[i]]
            mlp_inputs = None
            for name in selected[i]:
                if ".experts." in name:
                    if mlp_inputs is None:  # the experts' input does not depend on the experts: once per block
                        mlp_inputs = (_capture_inputs(block, h_q, kind_ctx, ["mlp"])["mlp"],
                                      _capture_inputs(fp_block, h_fp, kind_ctx, ["mlp"])["mlp"])
                    x_q, x_fp = _expert_inputs(block, fp_block, *mlp_inputs, name)
                else:
                    x_q = _capture_inputs(block, h_q, kind_ctx, [name])[name]
                    x_fp = _capture_inputs(fp_block, h_fp, kind_ctx, [name])[name]
                lin = block.get_submodule(name)
                segments = getattr(lin, "segments", None)
                if x_q is None:  # an expert no calibration token is routed to: nothing to learn from
                    new = IntGroupLinear.from_float(lin.weight.detach().float(), cfg, segments)
                else:
                    with torch.enable_grad():
                        new = adaround_layer(lin.weight.detach().float(), x_q, x_fp, cfg, segments)
                parent, _, child = name.rpartition(".")
                setattr(block.get_submodule(parent), child, new)
                advance()
            h_q = block(h_q, kind_ctx)
            h_fp = fp_block(h_fp, kind_ctx)
