"""llama.cpp's quantization mixes: the GGML type llama-quantize gives each tensor for Q2_K, Q3_K_M, Q4_K_M, Q5_K_M
and Q6_K (its llama_tensor_get_type rules for llama-like models), resolved for one model into a Recipe of
per-layer GGMLConfigs, so `ligero quantize --scheme q4_k_m` makes the file llama.cpp users download.

The rules (llama.cpp facts, as of its 2025 source):
- the output head (the token table when tied) is Q6_K;
- attn_v: Q4_K_M / Q5_K_M give Q6_K to the layers `use_more_bits` picks (the first and last eighth of the
  layers and every third one between); Q3_K_M gives Q5_K to the first two, Q4_K to the rest; Q2_K gives Q4_K
  where 4+ query heads share a KV head (Q3_K otherwise);
- ffn_down: Q4_K_M / Q5_K_M give Q6_K where `use_more_bits`; Q3_K_M gives Q5_K to the first 16th of the layers
  and Q4_K to the others; Q2_K gives Q3_K;
- attn_output: Q3_K_M gives Q4_K, Q2_K gives Q3_K;
- a tensor whose rows are not a multiple of 256 inputs cannot hold a K-type: Q2_K and Q3_K fall back to Q4_0,
  Q4_K to Q5_0, Q5_K to Q5_1, Q6_K to Q8_0 (as the llama.cpp of llama-cpp-python 0.3.36 writes them; some
  releases used IQ4_NL for Q2_K / Q3_K).
"""

from __future__ import annotations

import dataclasses

from ligero.quant.config import (
    Float16Config,
    GGMLConfig,
    GGMLMixConfig,
    Int8WeightConfig,
    IntGroupConfig,
    PartsConfig,
    QuantConfig,
    Recipe,
)

BASE_TYPE = {"Q2_K": "Q2_K", "Q3_K_M": "Q3_K", "Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K"}
_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def tensor_type(ftype: str, role: str, i_layer: int, n_layers: int, n_gqa: int, n_experts: int = 0) -> str:
    """The GGML type of one tensor (role: q, k, v, o, gate, up, down, output, token_embd) before the width
    fallback. A layer's experts take the type of its dense gate / up / down; 8-expert models (Mixtral) get
    Q8_0 attention keys and values and (at 4 bits and below) Q5_K attention outputs, as llama.cpp gives them."""
    base = BASE_TYPE[ftype]
    if role == "output":
        return "Q6_K"
    if n_experts == 8 and role in ("k", "v"):
        return "Q8_0"
    if n_experts == 8 and role == "o" and ftype in ("Q2_K", "Q3_K_M", "Q4_K_M"):
        return "Q5_K"
    if role == "v":
        if ftype == "Q2_K":
            return "Q4_K" if n_gqa >= 4 else "Q3_K"
        if ftype == "Q3_K_M":
            return "Q5_K" if i_layer < 2 else "Q4_K"
        if ftype in ("Q4_K_M", "Q5_K_M") and use_more_bits(i_layer, n_layers):
            return "Q6_K"
    if role == "down":
        if ftype == "Q2_K":
            return "Q3_K"
        if ftype == "Q3_K_M":
            return "Q5_K" if i_layer < n_layers // 16 else "Q4_K"
        if ftype in ("Q4_K_M", "Q5_K_M") and use_more_bits(i_layer, n_layers):
            return "Q6_K"
    if role == "o":
        if ftype == "Q2_K":
            return "Q3_K"
        if ftype == "Q3_K_M":
            return "Q4_K"
    return base


def layer_config(type_name: str, in_features: int, ftype: str) -> QuantConfig:
    """The Ligero config of a GGML type for a layer `in_features` wide, after llama.cpp's width fallback (a K-quant
    to a 32-block type where rows are not whole 256-blocks; F16 where they are not whole 32-blocks either)."""
    if in_features % 256 and type_name in _FALLBACK:
        type_name = _FALLBACK[type_name]
    if in_features % 32:
        return Float16Config("f16")
    if type_name == "Q4_0":
        return IntGroupConfig(32, symmetric=True)
    return Int8WeightConfig(group_size=32) if type_name == "Q8_0" else GGMLConfig(type_name)


def resolve_mix(recipe: Recipe, model) -> Recipe:
    """`recipe` (weights: a GGMLMixConfig) with one config per block linear, head and embedding of `model`."""
    mix: GGMLMixConfig = recipe.weights
    cfg = model.cfg
    n, gqa = cfg.n_layers, cfg.n_heads // cfg.n_kv_heads
    overrides: list[tuple[str, QuantConfig | None]] = []

    def fused(roles: list[str], i: int, in_features: int) -> QuantConfig:
        configs = [layer_config(tensor_type(mix.ftype, r, i, n, gqa, cfg.n_experts), in_features, mix.ftype)
                   for r in roles]
        return configs[0] if all(c == configs[0] for c in configs) else PartsConfig(tuple(c.to_dict() for c in configs))

    for i, block in enumerate(model.layers):
        attn = block.attn
        overrides += [(f"layers.{i}.attn.qkv_proj", fused(["q", "k", "v"], i, attn.qkv_proj.in_features)),
                      (f"layers.{i}.attn.o_proj", fused(["o"], i, attn.o_proj.in_features))]
        experts = getattr(block.mlp, "experts", None)  # an MoE layer: every expert (and shared expert) alike
        mlps = {f"mlp.experts.{e}": m for e, m in enumerate(experts)} if experts is not None else {"mlp": block.mlp}
        if getattr(block.mlp, "shared", None) is not None:
            mlps["mlp.shared"] = block.mlp.shared
        for name, mlp in mlps.items():
            overrides += [(f"layers.{i}.{name}.gate_up_proj", fused(["gate", "up"], i, mlp.gate_up_proj.in_features)),
                          (f"layers.{i}.{name}.down_proj", fused(["down"], i, mlp.down_proj.in_features))]
    head = layer_config("Q6_K", cfg.dim, mix.ftype)
    embed = head if cfg.tie_embeddings else layer_config(BASE_TYPE[mix.ftype], cfg.dim, mix.ftype)
    # the user's overrides come first: they win
    return dataclasses.replace(recipe, weights=None, head=head, embed=embed, overrides=recipe.overrides + overrides)
