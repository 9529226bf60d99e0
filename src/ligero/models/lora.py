"""Low-rank adapters (LoRA, Hu et al. 2021): a frozen linear layer W plus a trainable update (alpha / r) B A, with
A [r, in] random and B [out, r] zero, so training starts from the unchanged model. The base can be any module that
maps [..., in] to [..., out], a quantized one included (QLoRA's setting). After training the update is merged into
a full-precision base (W + (alpha / r) B A), so inference runs the plain layer at full speed.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ligero.errors import LigeroError

DEFAULT_TARGETS = ("qkv_proj", "o_proj")  # attention projections (q, k, v fused in one matrix here)


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, rank: int, alpha: float, in_features: int, out_features: int,
                 dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise LigeroError(f"LoRA rank must be at least 1, got {rank}")
        if rank > min(in_features, out_features):
            raise LigeroError(f"LoRA rank {rank} is larger than the layer ({in_features} -> {out_features}): an update "
                              f"of rank above {min(in_features, out_features)} adds nothing; choose a smaller --rank")
        if not 0.0 <= dropout < 1.0:
            raise LigeroError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.base, self.rank, self.alpha = base, rank, alpha
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, in_features))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()  # on the adapter's input only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = (self.dropout(x.to(self.lora_a.dtype)) @ self.lora_a.t()) @ self.lora_b.t()
        return self.base(x) + (update * self.scale).to(x.dtype)

    def delta(self) -> torch.Tensor:
        """The update to the weight, [out, in]."""
        return (self.lora_b @ self.lora_a) * self.scale


def _features(module: nn.Module) -> tuple[int, int]:
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    raise LigeroError(f"cannot put a LoRA adapter on {type(module).__name__}: its in / out features are unknown")


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, targets=DEFAULT_TARGETS,
             dropout: float = 0.0) -> list[nn.Parameter]:
    """Wrap every module whose name ends in one of `targets` (a frozen base) and return the adapters' parameters."""
    params = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and not isinstance(child, LoRALinear):
                for p in child.parameters():
                    p.requires_grad_(False)
                fin, fout = _features(child)
                device = next(iter([*child.parameters(), *child.buffers()])).device
                wrapped = LoRALinear(child, rank, alpha, fin, fout, dropout).to(device)
                setattr(module, child_name, wrapped)
                params += [wrapped.lora_a, wrapped.lora_b]
    if not params:
        raise LigeroError(f"no module named {', '.join(targets)} to adapt")
    return params


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors by module name (what is saved; the base weights are not)."""
    return {f"{name}.{part}": getattr(m, part).detach() for name, m in model.named_modules()
            if isinstance(m, LoRALinear) for part in ("lora_a", "lora_b")}


def load_lora(model: nn.Module, state: dict[str, torch.Tensor], rank: int, alpha: float, targets=DEFAULT_TARGETS):
    """Add adapters to `model` and fill them from `state` (as lora_state wrote it)."""
    add_lora(model, rank, alpha, targets)
    adapters = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    expected = {f"{n}.{p}" for n in adapters for p in ("lora_a", "lora_b")}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
        raise LigeroError(f"the LoRA state does not match this model (missing {missing}, unexpected {extra}); "
                          "use the adapter trained for this base model")
    with torch.no_grad():
        for key, value in state.items():
            name, part = key.rsplit(".", 1)
            getattr(adapters[name], part).copy_(value.float())


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its full-precision base weight and unwrap it; returns how many were merged."""
    merged = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                weight = getattr(child.base, "weight", None)
                if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.dim() != 2:
                    raise LigeroError("a LoRA adapter on a quantized layer cannot be merged; dequantize the base "
                                      "first or keep the adapter unmerged")
                with torch.no_grad():
                    weight += child.delta().to(weight.dtype)
                setattr(module, child_name, child.base)
                merged += 1
    return merged
