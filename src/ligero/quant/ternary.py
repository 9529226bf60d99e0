"""BitNet b1.58 training layer: full-precision shadow weights, ternary weights and int8 activations in the
forward pass, straight-through gradients. `to_inference()` turns a trained layer into the packed TernaryLinear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ligero.quant import formats
from ligero.quant.config import TernaryConfig
from ligero.quant.modules import TernaryLinear


def ste(full: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """Forward: the quantized value; backward: identity to the full-precision value (straight-through)."""
    return full + (quantized - full).detach()


class BitLinear(nn.Linear):
    """nn.Linear trained as BitNet b1.58: W~ = RoundClip(W / mean|W|) * mean|W|, x~ = per-token int8 absmax."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, quantize_activations: bool = True,
                 **kwargs):
        super().__init__(in_features, out_features, bias=bias, **kwargs)
        self.quantize_activations = quantize_activations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        trits, scale = formats.ternarize(self.weight)
        w = ste(self.weight, (trits.float() * scale).to(self.weight.dtype))
        if self.quantize_activations:
            x = ste(x, formats.fake_quantize_int8_tokens(x))
        return F.linear(x, w, self.bias)

    @torch.no_grad()
    def to_inference(self) -> TernaryLinear:
        if self.bias is not None:
            raise ValueError("TernaryLinear has no bias; train BitLinear with bias=False")
        return TernaryLinear.from_float(self.weight.detach().float(), TernaryConfig())
