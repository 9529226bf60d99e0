"""Calibration: statistics of each linear layer's inputs on calibration windows (built in ligero.eval.variants)."""

from __future__ import annotations

import torch

from ligero.models.transformer import Linear, Transformer
from ligero.quant.modules import QuantizedLinear


@torch.inference_mode()
def input_absmax(model: Transformer, windows: list[list[int]]) -> dict[str, torch.Tensor]:
    """Per input channel max |x| seen by every linear layer (full precision, or a packed source's), over all
    calibration tokens."""
    stats: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(_module, args):
            amax = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float().cpu()
            stats[name] = torch.maximum(stats[name], amax) if name in stats else amax
        return hook

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in model.named_modules()
             if isinstance(m, (Linear, QuantizedLinear))]
    try:
        for window in windows:
            model(torch.tensor([window], device=model.device))
    finally:
        for h in hooks:
            h.remove()
    return stats
