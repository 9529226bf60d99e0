"""Tiny decoders for the labs, built from Ligero's own runtime (ModelConfig + Transformer), so a trained model
saves, loads, quantizes, evaluates and serves like any other. Ternary models (BitNet b1.58) swap their block
linears for ligero.quant.ternary's BitLinear; the norm before each quantized matmul is the block's pre-norm
(Llama's placement)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ligero.errors import LigeroError
from ligero.models.config import ModelConfig
from ligero.models.transformer import Transformer
from ligero.quant.ternary import to_bitlinear


@dataclass(frozen=True)
class Size:
    """A tiny Llama-style decoder's shape (grouped-query attention, SwiGLU, tied embeddings)."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int

    def non_embedding_params(self) -> int:
        head_dim = self.dim // self.n_heads
        attn = self.dim * (self.n_heads + 2 * self.n_kv_heads) * head_dim + self.n_heads * head_dim * self.dim
        return self.n_layers * (attn + 3 * self.dim * self.ffn_dim + 2 * self.dim) + self.dim

    def widened(self, factor: int) -> "Size":
        """The same depth with hidden and FFN widths times `factor` (Reloaded's doubled ternary models)."""
        return Size(self.dim * factor, self.n_layers, self.n_heads, self.n_kv_heads, self.ffn_dim * factor)

    def wider_ffn(self, factor: int) -> "Size":
        """The FFN alone `factor` times wider (a dense model with an MoE's total parameters)."""
        return Size(self.dim, self.n_layers, self.n_heads, self.n_kv_heads, self.ffn_dim * factor)


# Widths are multiples of 64 so the packed ternary model runs on the kernel (it takes inputs in 64s).
SIZES = {
    "test": Size(64, 2, 2, 1, 128),  # tests only
    "xs": Size(64, 3, 2, 1, 192),  # 0.15M non-embedding parameters
    "s": Size(128, 4, 4, 2, 320),  # 0.69M non-embedding parameters
    "m": Size(192, 5, 6, 2, 512),  # 2.0M
    "l": Size(320, 6, 8, 4, 896),  # 7.0M
}


def size_named(name: str) -> Size:
    if name not in SIZES:
        raise LigeroError(f"unknown model size '{name}'; use one of: {', '.join(SIZES)}")
    return SIZES[name]


def tiny_config(size: Size, vocab_size: int, seq_len: int, experts: int = 0, top_k: int = 0) -> ModelConfig:
    """The runtime config of a lab model; with `experts`, every FFN is a mixture of that many experts, `top_k` per
    token, each expert ffn_dim / top_k wide (so a token runs through as many FFN parameters as in the dense model).
    Top-1 weights the expert's output by its router probability (Switch Transformer: renormalising one weight
    would make it 1 and leave the router without gradient); top-k > 1 renormalises over the k (Mixtral)."""
    if size.dim % size.n_heads or size.n_heads % size.n_kv_heads:
        raise LigeroError(f"width {size.dim} with {size.n_heads} heads / {size.n_kv_heads} KV heads does not split "
                          "evenly; choose heads that divide the width")
    moe = {}
    if experts:
        if not 1 <= top_k <= experts or size.ffn_dim % top_k:
            raise LigeroError(f"top-{top_k} of {experts} experts does not fit: choose 1 <= top-k <= experts, "
                              f"dividing the FFN width {size.ffn_dim}")
        moe = dict(n_experts=experts, n_experts_per_token=top_k, expert_ffn_dim=size.ffn_dim // top_k,
                   moe_renormalize=top_k > 1)
    cfg = ModelConfig(arch="llama", vocab_size=vocab_size, dim=size.dim, n_layers=size.n_layers,
                      n_heads=size.n_heads, n_kv_heads=size.n_kv_heads, head_dim=size.dim // size.n_heads,
                      ffn_dim=size.ffn_dim, max_seq_len=seq_len, norm_eps=1e-5, tie_embeddings=True, **moe)
    cfg.validate()
    return cfg


def build_model(cfg: ModelConfig, seed: int, ternary: bool = False, weight_scale: str = "absmean") -> Transformer:
    """A freshly initialised model: N(0, 0.02) weights, the residual outputs (o, down) scaled by 1/sqrt(2 L)
    (GPT-2's init), norms at 1; with `ternary`, every block linear a BitLinear."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Transformer(cfg)
        model.tie_weights()
        for name, p in model.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * cfg.n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) \
                    else 0.02
                nn.init.normal_(p, 0.0, std)
            else:
                nn.init.ones_(p)
    if ternary:
        to_bitlinear(model, weight_scale)
    return model
