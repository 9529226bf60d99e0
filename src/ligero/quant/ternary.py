"""BitNet b1.58 for training (arXiv 2402.17764): BitLinear keeps full-precision latent weights for the optimizer
and computes with ternary weights and int8 activations, gradients passing both roundings straight through (STE);
`pack_ternary` turns a trained model into the runtime's packed b158 layers (TernaryLinear) holding exactly the
ternary values the training forward pass used.

Weights: w_q = s * RoundClip(w / s, -1, 1) with s = mean|w| (absmean, the paper's) or median|w| ("absmedian",
BitNet b1.58 Reloaded, arXiv 2407.09527), one s per projection: q, k, v (gate, up) each their own inside Ligero's
fused layers, as TernaryLinear stores them. Activations: int8 per token by absmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ligero.errors import LigeroError
from ligero.models.transformer import Linear
from ligero.quant import formats
from ligero.quant.api import _set_module
from ligero.quant.config import Recipe, TernaryConfig
from ligero.quant.modules import TernaryLinear

WEIGHT_SCALES = ("absmean", "absmedian")
TERNARY_EPS = 1e-5  # formats.ternarize's: the scale is mean|w| + eps


def ste(full: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """Forward: the quantized value; backward: identity to the full-precision value (straight-through)."""
    return full + (quantized - full).detach()


def ternary_values(w: torch.Tensor, weight_scale: str = "absmean") -> tuple[torch.Tensor, torch.Tensor]:
    """(trits in {-1, 0, 1} as int8, fp32 scale) of one projection's weight; absmean is formats.ternarize, the
    post-training b158 quantizer, itself."""
    if weight_scale == "absmean":
        return formats.ternarize(w.detach(), TERNARY_EPS)
    if weight_scale == "absmedian":
        scale = w.detach().abs().median().float() + TERNARY_EPS
        return torch.round(w.detach().float() / scale).clamp_(-1, 1).to(torch.int8), scale
    raise LigeroError(f"unknown weight scale '{weight_scale}'; use one of: {', '.join(WEIGHT_SCALES)}")


class BitLinear(Linear):
    """A projection trained as BitNet b1.58. `segments` (set by the model on fused layers): the output rows of
    each part, each part ternarized with its own scale."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, weight_scale: str = "absmean",
                 **kwargs):
        super().__init__(in_features, out_features, bias=bias, **kwargs)
        if weight_scale not in WEIGHT_SCALES:
            raise LigeroError(f"unknown weight scale '{weight_scale}'; use one of: {', '.join(WEIGHT_SCALES)}")
        self.weight_scale = weight_scale

    def parts(self) -> list[int]:
        return list(getattr(self, "segments", None) or [self.out_features])

    def ternary_weight(self) -> torch.Tensor:
        """s * t per part, with the identity's gradient to the latent weight."""
        pieces = []
        for w in self.weight.split(self.parts()):
            t, s = ternary_values(w, self.weight_scale)
            pieces.append(ste(w, (t.float() * s).to(w.dtype)))
        return torch.cat(pieces)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = ste(x, formats.fake_quantize_int8_tokens(x.detach()))
        return F.linear(x, self.ternary_weight(), self.bias)

    @torch.no_grad()
    def to_inference(self) -> TernaryLinear:
        """The packed b158 layer with this layer's ternary values and scales."""
        if self.bias is not None:
            raise LigeroError("TernaryLinear has no bias; train BitLinear with bias=False")
        trits, scales = zip(*(ternary_values(w, self.weight_scale) for w in self.weight.split(self.parts())))
        layer = TernaryLinear(self.in_features, self.out_features, TernaryConfig(), self.parts())
        layer.packed = formats.pack_trits(torch.cat(trits))
        layer.scale = torch.stack([s.float() for s in scales])
        return layer


def _block_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if n.startswith("layers.") and isinstance(m, nn.Linear)]


def to_bitlinear(model: nn.Module, weight_scale: str = "absmean") -> nn.Module:
    """Every block linear of `model` as a BitLinear over the same latent weight, in place (embeddings and head
    stay in full precision, as in the paper)."""
    for name, lin in _block_linears(model):
        bit = BitLinear(lin.in_features, lin.out_features, bias=False, weight_scale=weight_scale, device="meta")
        bit.weight = lin.weight
        if getattr(lin, "segments", None):
            bit.segments = lin.segments
        _set_module(model, name, bit)
    return model


def pack_ternary(model: nn.Module) -> nn.Module:
    """A trained model for inference, in place: each BitLinear becomes a TernaryLinear (5 trits per byte, the
    ternary kernel) holding the same ternary values; saves and loads as a b158-quantized Ligero model."""
    for name, bit in _block_linears(model):
        if isinstance(bit, BitLinear):
            _set_module(model, name, bit.to_inference())
    model.quant_recipe = Recipe(TernaryConfig(), head=None, embed=None, name="b158-trained")
    return model
