"""The built-in schemes, registered in one place: each weight config's layer, learning pre-pass, shape rule,
calibration and grouping, then the scheme names users type (listed in this order in error messages).

Importing ligero.quant imports this module, so the registry is complete before any config is read or built.
"""

from __future__ import annotations

from ligero.quant import ggml
from ligero.quant.adaround import adaround_model
from ligero.quant.config import (
    AdaRoundConfig,
    Float16Config,
    FP4Config,
    FP8Config,
    GGMLConfig,
    GGMLMixConfig,
    Int8WeightConfig,
    IntGroupConfig,
    LSQConfig,
    NF4Config,
    PartsConfig,
    TernaryConfig,
    W8A8Config,
    register_named_scheme,
    register_scheme,
    scheme_spec,
)
from ligero.quant.ggml_mix import resolve_mix
from ligero.quant.lsq import lsq_model
from ligero.quant.modules import (
    Float16Linear,
    FP4Linear,
    FP8Linear,
    GGMLLinear,
    Int8Linear,
    IntGroupLinear,
    NF4Linear,
    PartsLinear,
    TernaryLinear,
    W8A8Linear,
)

# The 4-bit kernels read 32 inputs per block: group-wise, FP4 and ternary layers need in_features % 32 == 0.
KERNEL_BLOCK = 32

register_scheme(Int8WeightConfig, layer=Int8Linear,
                in_features_multiple=lambda config: KERNEL_BLOCK if config.blocks_of_32 else 1)
register_scheme(IntGroupConfig, layer=IntGroupLinear, in_features_multiple=KERNEL_BLOCK, grouped=True)
register_scheme(FP8Config, layer=FP8Linear)
register_scheme(Float16Config, layer=Float16Linear)
# llama.cpp's block types: rows of whole blocks (32 inputs for Q5_0 / Q5_1, 256 for the K-quants)
register_scheme(GGMLConfig, layer=GGMLLinear,
                in_features_multiple=lambda config: ggml.GGML_BLOCKS[config.ggml_type][0])
# llama.cpp's mixes resolve to per-layer GGML types (and Q8_0) for the model at hand; 32 is their fallbacks' block
register_scheme(GGMLMixConfig, layer=GGMLLinear, in_features_multiple=KERNEL_BLOCK, resolve=resolve_mix)
# A fused projection whose parts have different formats (GGUF files): each part's rule applies to the whole width.
register_scheme(PartsConfig, layer=PartsLinear, in_features_multiple=lambda config: max(
    [1] + [scheme_spec(c).input_multiple(c) for c in config.configs() if c is not None]))
register_scheme(FP4Config, layer=FP4Linear, in_features_multiple=KERNEL_BLOCK)
register_scheme(NF4Config, layer=NF4Linear, in_features_multiple=lambda config: config.group_size, grouped=True)
register_scheme(TernaryConfig, layer=TernaryLinear, in_features_multiple=KERNEL_BLOCK)
register_scheme(W8A8Config, layer=W8A8Linear, calibrates=lambda config: config.smooth_alpha is not None)
# Learned schemes store what round-to-nearest stores (scale and minimum per group); only the codes differ.
register_scheme(AdaRoundConfig, layer=IntGroupLinear, prepass=adaround_model, in_features_multiple=KERNEL_BLOCK,
                grouped=True)
register_scheme(LSQConfig, layer=IntGroupLinear, prepass=lsq_model, in_features_multiple=KERNEL_BLOCK, grouped=True)

register_named_scheme("int8", Int8WeightConfig)
register_named_scheme("int4", IntGroupConfig, group_size=32)
register_named_scheme("fp8", FP8Config, fmt="e4m3")
register_named_scheme("fp8-e5m2", FP8Config, fmt="e5m2")
# 16-bit weights, fp32 arithmetic (GGUF F16 / BF16): half of fp32's bytes, the fp32 model's results
register_named_scheme("f16", Float16Config, dtype="f16")
register_named_scheme("bf16", Float16Config, dtype="bf16")
register_named_scheme("mxfp4", FP4Config, fmt="mxfp4")
register_named_scheme("nvfp4", FP4Config, fmt="nvfp4")
register_named_scheme("nf4", NF4Config, group_size=64)  # QLoRA's base format (double-quantized scales)
register_named_scheme("mxfp4-w4a4", FP4Config, fmt="mxfp4", activations=True)
register_named_scheme("nvfp4-w4a4", FP4Config, fmt="nvfp4", activations=True)
register_named_scheme("b158", TernaryConfig)
register_named_scheme("w8a8", W8A8Config, smooth_alpha=0.5)
register_named_scheme("w8a8-naive", W8A8Config, smooth_alpha=None)
register_named_scheme("adaround", AdaRoundConfig, bits=4, group_size=128)
register_named_scheme("adaround-int3", AdaRoundConfig, bits=3, group_size=128)
register_named_scheme("int3", IntGroupConfig, bits=3, group_size=128)
register_named_scheme("lsq", LSQConfig, bits=4, group_size=128)
register_named_scheme("lsq-int3", LSQConfig, bits=3, group_size=128)
register_named_scheme("lsq-int2", LSQConfig, bits=2, group_size=128)
register_named_scheme("lsq-w4a8", LSQConfig, bits=4, group_size=128, act_int8=True)
# GGUF Q4_0's symmetric grid, and llama.cpp's int8 activations per 32 inputs (its Q4 x Q8_0 dot product).
register_named_scheme("int4-sym", IntGroupConfig, group_size=32, symmetric=True)
register_named_scheme("q4_0", IntGroupConfig, group_size=32, symmetric=True)  # llama.cpp's name for int4-sym
register_named_scheme("int4-a8", IntGroupConfig, group_size=32, act_int8_blocks=True)
register_named_scheme("int4-sym-a8", IntGroupConfig, group_size=32, symmetric=True, act_int8_blocks=True)
# int8 weights x int8 activations per 32 inputs: llama.cpp's Q8_0 x Q8_0 product (weights keep one scale per row).
register_named_scheme("int8-a8", Int8WeightConfig, act_int8_blocks=True)
# GGUF Q8_0's own format: an fp16 scale per 32 inputs (also what Q8_0 tensors of GGUF files load as).
register_named_scheme("q8_0", Int8WeightConfig, group_size=32)
# llama.cpp's own types and mixes (llama-quantize's algorithms, byte for byte): what llama.cpp users download.
register_named_scheme("q5_0", GGMLConfig, ggml_type="Q5_0")
register_named_scheme("q5_1", GGMLConfig, ggml_type="Q5_1")
register_named_scheme("q4_k_m", GGMLMixConfig, ftype="Q4_K_M")
register_named_scheme("q5_k_m", GGMLMixConfig, ftype="Q5_K_M")
register_named_scheme("q6_k", GGMLMixConfig, ftype="Q6_K")
register_named_scheme("q3_k_m", GGMLMixConfig, ftype="Q3_K_M")
register_named_scheme("q2_k", GGMLMixConfig, ftype="Q2_K")
