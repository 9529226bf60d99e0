"""The built-in schemes, registered in one place: each weight config's layer, learning pre-pass, shape rule,
calibration and grouping, then the scheme names users type (listed in this order in error messages).

Importing ligero.quant imports this module, so the registry is complete before any config is read or built.
"""

from __future__ import annotations

from ligero.quant.adaround import adaround_model
from ligero.quant.config import (
    AdaRoundConfig,
    FP4Config,
    FP8Config,
    Int8WeightConfig,
    IntGroupConfig,
    LSQConfig,
    TernaryConfig,
    W8A8Config,
    register_named_scheme,
    register_scheme,
)
from ligero.quant.lsq import lsq_model
from ligero.quant.modules import FP4Linear, FP8Linear, Int8Linear, IntGroupLinear, TernaryLinear, W8A8Linear

# The 4-bit kernels read 32 inputs per block: group-wise, FP4 and ternary layers need in_features % 32 == 0.
KERNEL_BLOCK = 32

register_scheme(Int8WeightConfig, layer=Int8Linear,
                in_features_multiple=lambda config: KERNEL_BLOCK if config.blocks_of_32 else 1)
register_scheme(IntGroupConfig, layer=IntGroupLinear, in_features_multiple=KERNEL_BLOCK, grouped=True)
register_scheme(FP8Config, layer=FP8Linear)
register_scheme(FP4Config, layer=FP4Linear, in_features_multiple=KERNEL_BLOCK)
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
register_named_scheme("mxfp4", FP4Config, fmt="mxfp4")
register_named_scheme("nvfp4", FP4Config, fmt="nvfp4")
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
register_named_scheme("int4-a8", IntGroupConfig, group_size=32, act_int8_blocks=True)
register_named_scheme("int4-sym-a8", IntGroupConfig, group_size=32, symmetric=True, act_int8_blocks=True)
# int8 weights x int8 activations per 32 inputs: llama.cpp's Q8_0 x Q8_0 product (weights keep one scale per row).
register_named_scheme("int8-a8", Int8WeightConfig, act_int8_blocks=True)
# GGUF Q8_0's own format: an fp16 scale per 32 inputs (also what Q8_0 tensors of GGUF files load as).
register_named_scheme("q8_0", Int8WeightConfig, group_size=32)
