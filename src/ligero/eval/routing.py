"""Expert routing of a quantized MoE model against its baseline: does the variant send each token to the same experts,
and how far does each expert's output move when it is given the baseline's inputs?

Routing agreement is measured on the same tokens through both models (each model's own hidden states: a routing
change upstream counts where it shows). Per-expert shift isolates the experts' weights: every expert of the variant
runs on exactly the inputs the baseline routed to it, and its output is compared with the baseline expert's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ligero.models.transformer import MoEMLP, Transformer


def moe_layers(model: Transformer) -> list[int]:
    return [i for i, layer in enumerate(model.layers) if isinstance(layer.mlp, MoEMLP)]


@dataclass
class BaselineRouting:
    """What the baseline's MoE layers did on the audit's windows: per MoE layer, the FFN inputs [N, C], the chosen
    experts [N, k] (most probable first) and each expert's output on the tokens routed to it."""

    layers: list[int]
    inputs: list[torch.Tensor]
    experts: list[torch.Tensor]
    outputs: list[dict[int, torch.Tensor]]


@torch.inference_mode()
def _record(model: Transformer, windows: list[list[int]], keep_inputs: bool,
            progress: Callable[..., None] | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(FFN inputs, chosen experts) of every MoE layer over all windows' tokens, in order."""
    layers = moe_layers(model)
    inputs: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    experts: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    hooks = []
    for i in layers:
        mlp = model.layers[i].mlp
        mlp.routing_log = []
        if keep_inputs:
            hooks.append(mlp.register_forward_pre_hook(
                lambda _m, args, i=i: inputs[i].append(args[0].reshape(-1, args[0].shape[-1]).float().clone())))
    try:
        for window in windows:
            model(torch.tensor([window], device=model.device))
            for i in layers:
                log = model.layers[i].mlp.routing_log
                experts[i] += [r.experts.cpu() for r in log]
                log.clear()
            if progress is not None:
                progress()
    finally:
        for h in hooks:
            h.remove()
        for i in layers:
            model.layers[i].mlp.routing_log = None
    return [torch.cat(inputs[i]) for i in layers] if keep_inputs else [], [torch.cat(experts[i]) for i in layers]


def baseline_routing(model: Transformer, windows: list[list[int]],
                     progress: Callable[..., None] | None = None) -> BaselineRouting:
    inputs, experts = _record(model, windows, keep_inputs=True, progress=progress)
    outputs = []
    with torch.inference_mode():
        for i, x, chosen in zip(moe_layers(model), inputs, experts):
            mlp = model.layers[i].mlp
            outputs.append({e: mlp.experts[e](x[rows].to(model.dtype)).float()
                            for e in range(len(mlp.experts)) if (rows := (chosen == e).any(-1)).any()})
    return BaselineRouting(moe_layers(model), inputs, experts, outputs)


def routing_comparison(base: BaselineRouting, model: Transformer, windows: list[list[int]],
                       progress: Callable[..., None] | None = None) -> dict:
    """Per MoE layer: the share of tokens routed to exactly the baseline's experts (`same_experts`), the mean share
    of the baseline's k experts still chosen (`overlap`), the share whose first choice is unchanged (`same_top1`),
    the tokens each expert receives in both models (`load_baseline`, `load_variant`), and per expert the relative
    RMS error of its output on the baseline's inputs (`expert_rel_error`; None for an expert no token reached).
    Totals over layers are token-layer shares."""
    _, experts = _record(model, windows, keep_inputs=False, progress=progress)
    layers = []
    for i, b, v, x, outs in zip(base.layers, base.experts, experts, base.inputs, base.outputs):
        k = b.shape[1]
        mlp = model.layers[i].mlp
        n_experts = len(mlp.experts)
        overlap = (b[:, :, None] == v[:, None, :]).any(-1).float().sum(-1) / k  # [N]
        errors: list[float | None] = [None] * n_experts
        with torch.inference_mode():
            for e, ref in outs.items():
                rows = (b == e).any(-1)
                out = mlp.experts[e](x[rows].to(model.dtype)).float()
                errors[e] = float((out - ref).norm() / ref.norm().clamp_min(1e-30))
        layers.append({"layer": i, "tokens": int(b.shape[0]),
                       "same_experts": float((overlap == 1).float().mean()), "overlap": float(overlap.mean()),
                       "same_top1": float((b[:, 0] == v[:, 0]).float().mean()),
                       "load_baseline": torch.bincount(b.flatten(), minlength=n_experts).tolist(),
                       "load_variant": torch.bincount(v.flatten(), minlength=n_experts).tolist(),
                       "expert_rel_error": errors})
    known = [(layer["layer"], e, err) for layer in layers for e, err in enumerate(layer["expert_rel_error"])
             if err is not None]
    worst = max(known, key=lambda t: t[2]) if known else None
    mean = lambda key: sum(x[key] for x in layers) / len(layers)  # noqa: E731 (every layer has the same tokens)
    return {"tokens": layers[0]["tokens"] if layers else 0, "experts_per_token": int(base.experts[0].shape[1]),
            "same_experts": mean("same_experts"), "overlap": mean("overlap"), "same_top1": mean("same_top1"),
            "worst_expert": {"layer": worst[0], "expert": worst[1], "rel_error": worst[2]} if worst else None,
            "layers": layers}
