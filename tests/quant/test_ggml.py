"""llama.cpp's block types (Q5_0, Q5_1, K-quants): the torch dequantizers agree with gguf's, the quantizers with
llama.cpp's reference C code byte for byte, the native kernels with the torch reference; the mixes give each
tensor the type llama-quantize gives it."""

import hashlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from ligero.errors import LigeroError
from ligero.kernels import cpu_kernels
from ligero.quant import ggml
from ligero.quant.config import GGMLConfig, GGMLMixConfig, PartsConfig, Recipe, recipe_for
from ligero.quant.ggml_mix import resolve_mix, tensor_type, use_more_bits
from ligero.quant.modules import GGMLLinear

TYPES = list(ggml.GGML_BLOCKS)

# sha256 (first 16 hex digits) of llama.cpp's quantize_row_<type>_ref output on `_golden_input()`, computed with
# ggml-quants.c (llama.cpp c392e509) built as a shared library and called through ctypes; not reproducible in CI,
# which has no llama.cpp: these pin Ligero's quantizers to it.
LLAMA_CPP_SHA = {"Q5_0": "5eea6fd2a7379f1f", "Q5_1": "88fc53b5cc991575", "Q2_K": "a6120577937e5cfb",
                 "Q3_K": "dbc6314474e90d4a", "Q4_K": "5ab6aabaa9324272", "Q5_K": "ed2ef1083a3323f3",
                 "Q6_K": "d5e885b3835e9a1a"}
# Gaussian weights: SQNR (dB) each type must reach (llama.cpp's own results on the same data: 27.3, 28.4, 10.6,
# 16.5, 22.9, 28.9, 35.1)
SPLIT_KERNELS = ("Q4_K", "Q5_K", "Q6_K")  # AVX2 integer kernels on split activations; the others expand rows
MIN_SQNR = {"Q5_0": 27, "Q5_1": 28, "Q2_K": 10, "Q3_K": 16, "Q4_K": 22.5, "Q5_K": 28.5, "Q6_K": 34.5}


def _golden_input() -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randn(16, 512, generator=g) * torch.exp(0.5 * torch.randn(16, 512, generator=g))


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("type_name", TYPES)
def test_quantizer_is_llama_cpps_byte_for_byte(type_name, native):
    if native and (type_name not in ggml.NATIVE_QUANTIZERS or cpu_kernels() is None):
        pytest.skip("no native quantizer for this type here")
    data = ggml.quantize_rows(_golden_input(), type_name, native=native)
    assert hashlib.sha256(data.numpy().tobytes()).hexdigest()[:16] == LLAMA_CPP_SHA[type_name]


@pytest.mark.parametrize("type_name", ggml.NATIVE_QUANTIZERS)
def test_native_quantizer_is_the_torch_reference_byte_for_byte(type_name):
    """On heavy-tailed weights and the corner cases: empty, constant and tiny blocks, an outlier."""
    if cpu_kernels() is None:
        pytest.skip("no compiled kernels here")
    g = torch.Generator().manual_seed(5)
    w = torch.randn(48, 1024, generator=g) * torch.exp(torch.randn(48, 1024, generator=g))
    w[0] = 0
    w[1, :256] = 3.0
    w[2, 256:512] = -1.5
    w[3] *= 1e-20
    w[4, 100] = 1e4
    w[5, :32] = 0
    assert torch.equal(ggml.quantize_rows(w, type_name), ggml.quantize_rows(w, type_name, native=False))


@pytest.mark.parametrize("type_name", TYPES)
def test_dequantizer_matches_gguf_and_quality_holds(type_name):
    w = torch.randn(8, 1024, generator=torch.Generator().manual_seed(0))
    data = ggml.quantize_rows(w, type_name)
    assert data.shape == (8, ggml.row_bytes(type_name, 1024)) and data.dtype == torch.uint8
    ours = ggml.dequantize_rows(data, type_name)
    theirs = dequantize(data.numpy(), GGMLQuantizationType[type_name]).reshape(8, 1024)
    assert np.array_equal(ours.numpy(), theirs)
    sqnr = 10 * torch.log10(w.pow(2).sum() / (w - ours).pow(2).sum())
    assert sqnr > MIN_SQNR[type_name]


@pytest.mark.parametrize("type_name", sorted(ggml.LEGACY_BLOCKS))
def test_legacy_block_dequantizer_matches_gguf(type_name):
    """Q8_0 / Q4_0 / Q4_1 (int8 / int4 layers when packed): a full-precision load dequantizes them in torch."""
    from gguf.quants import quantize

    w = torch.randn(6, 256, generator=torch.Generator().manual_seed(3)) * 0.1
    data = quantize(w.numpy(), GGMLQuantizationType[type_name])
    theirs = dequantize(data, GGMLQuantizationType[type_name]).reshape(6, 256)
    assert np.array_equal(ggml.dequantize_rows(torch.from_numpy(data), type_name).numpy(), theirs)


def test_all_zero_and_constant_rows_are_exact():
    w = torch.zeros(3, 256)
    w[1] = 0.5
    w[2, 7] = -3.0
    for type_name in TYPES:
        back = ggml.dequantize_rows(ggml.quantize_rows(w, type_name), type_name)
        assert torch.equal(back[0], w[0]), type_name
        assert torch.isfinite(back).all(), type_name


@pytest.mark.skipif(cpu_kernels() is None, reason="no C++ compiler: the kernels are not built")
@pytest.mark.parametrize("type_name", TYPES)
def test_kernels_match_the_torch_reference(type_name):
    ext = cpu_kernels()
    g = torch.Generator().manual_seed(1)
    w = torch.randn(37, 512, generator=g)
    data = ggml.quantize_rows(w, type_name)
    type_id = ggml.GGML_TYPE_IDS[type_name]
    reference = ggml.dequantize_rows(data, type_name)
    assert torch.equal(ext.dequant_ggml(data, type_id, 512), reference)  # same products, same order
    for rows in (1, 3, 8):
        x = torch.randn(rows, 512, generator=g)
        got = ext.linear_ggml(x, data, type_id)
        if type_name in SPLIT_KERNELS and ext.isa() != "generic":
            # integer kernels on ~16-bit activations (as int4's): bounded by the size of the terms summed
            assert ((got - x @ reference.T).abs() <= 1e-4 * (x.abs() @ reference.abs().T) + 1e-6).all()
        else:  # rows expanded to fp32, then dotted
            torch.testing.assert_close(got, x @ reference.T, rtol=1e-5, atol=1e-4)
        assert torch.equal(got, torch.cat([ext.linear_ggml(x[i:i + 1], data, type_id) for i in range(rows)]))


def _heavy_tailed(rows, n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g) * torch.exp(torch.randn(rows, n, generator=g))
    x[:, 3] = -40.0  # the signed maximum of its 256: llama.cpp's Q8_K scales by it (iscale = -127 / max)
    return x


@pytest.mark.parametrize("type_name", TYPES)
def test_native_activation_rounding_is_the_torch_reference(compiled_kernels, type_name):
    x = torch.cat([_heavy_tailed(5, 512, 7), torch.zeros(1, 512)])
    got = compiled_kernels.round_act_ggml(x, ggml.GGML_TYPE_IDS[type_name])
    assert torch.equal(got, ggml.round_activations(x, type_name))
    if type_name not in ("Q5_0", "Q5_1"):  # Q8_K: 255 levels per 256 inputs, the largest |x| exactly at -127 steps
        step = (x.view(6, 2, 256).abs().amax(-1, keepdim=True) / 127).view(6, 2, 1)
        assert ((got.view(6, 2, 256) - x.view(6, 2, 256)).abs() <= step / 2 * 1.0001 + 1e-6).all()
        assert torch.equal(got[:, 3], x[:, 3])


@pytest.mark.parametrize("type_name", TYPES)
def test_llama_cpp_activation_mode_is_its_arithmetic(compiled_kernels, type_name):
    """act_int8_blocks: the layer computes x_hat @ w^T with x_hat rounded as llama.cpp rounds it (integer kernels
    for Q4_K / Q5_K / Q6_K, in any batch; the row-expanding types round, then multiply); prefill agrees."""
    w = torch.randn(37, 512, generator=torch.Generator().manual_seed(11))
    layer = GGMLLinear.from_float(w, GGMLConfig(type_name, act_int8_blocks=True))
    exact = GGMLLinear.from_float(w, GGMLConfig(type_name))
    full = layer.dequantize().double()
    for rows in (1, 3, 8, 20):  # decode kernels, then prefill (rounding + torch's GEMM)
        x = _heavy_tailed(rows, 512, rows)
        x_hat = ggml.round_activations(x, type_name).double()
        with torch.inference_mode():
            got = layer(x)
            alone = torch.cat([layer(x[i:i + 1]) for i in range(rows)])
            assert not torch.allclose(got, exact(x), rtol=1e-5, atol=1e-5)  # the rounding is really there
        bound = 1e-5 * (x_hat.abs() @ full.abs().T) + 1e-6  # fp32 sums of exact integer block products
        assert ((got.double() - x_hat @ full.T).abs() <= bound).all(), rows
        if rows <= 8:
            assert torch.equal(got, alone)  # a row's result does not depend on its batch


@torch.inference_mode()
def test_layer_decode_and_prefill_agree():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(2))
    layer = GGMLLinear.from_float(w, GGMLConfig("Q4_K"))
    assert layer.stored_bytes() == 64 * 144  # the file's bytes: 4.5 bits per weight
    full = layer.dequantize()
    for rows in (1, 8, 40):  # the packed kernel (~16-bit activations), then dequantize + GEMM
        x = torch.randn(rows, 256)
        assert ((layer(x) - F.linear(x, full)).abs() <= 1e-4 * (x.abs() @ full.abs().T) + 1e-6).all()


def test_mix_rules():
    # use_more_bits: the first and last eighth of the layers and every third one between (llama.cpp)
    assert [i for i in range(16) if use_more_bits(i, 16)] == [0, 1, 4, 7, 10, 13, 14, 15]
    assert tensor_type("Q4_K_M", "v", 0, 16, 1) == "Q6_K" and tensor_type("Q4_K_M", "v", 2, 16, 1) == "Q4_K"
    assert tensor_type("Q4_K_M", "output", 5, 16, 1) == "Q6_K"
    assert tensor_type("Q3_K_M", "o", 5, 16, 1) == "Q4_K" and tensor_type("Q2_K", "down", 5, 16, 1) == "Q3_K"
    assert tensor_type("Q2_K", "v", 5, 16, 4) == "Q4_K" and tensor_type("Q2_K", "v", 5, 16, 2) == "Q3_K"


def test_mix_reproduces_the_shipped_gemma_q4_k_m_types():
    """Ligero's q4_k_m of Gemma 3 gives every tensor the type llama-quantize gave it in the published file
    (including the width fallbacks: Q5_0 for the 640-wide projections, Q8_0 for Q6_K there)."""
    from ligero.io.gguf_file import GGUFFile, ligero_name
    from ligero.models.registry import REGISTRY
    from ligero.models.transformer import Transformer

    shipped = GGUFFile(REGISTRY["gemma3-270m"].locate())
    with torch.device("meta"):  # the rules need the shapes only
        model = Transformer(shipped.config())
    recipe = resolve_mix(Recipe(GGMLMixConfig("Q4_K_M")), model)
    for name, t in shipped.tensors.items():
        if t.tensor_type.name == "F32":
            continue
        layer = ligero_name(name).removesuffix(".weight")
        parent, _, leaf = layer.rpartition(".")
        roles = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
                 "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
        config = recipe.head if layer == "embed" else recipe.config_for(f"{parent}.{roles.get(leaf, (leaf, 0))[0]}")
        if isinstance(config, PartsConfig):
            config = config.configs()[roles[leaf][1]]
        ours = config.ggml_type if isinstance(config, GGMLConfig) else "Q8_0"
        assert ours == t.tensor_type.name, name


def test_mix_scheme_names():
    assert isinstance(recipe_for("q4_k_m").weights, GGMLMixConfig)
    assert recipe_for("q5_0").weights == GGMLConfig("Q5_0")


@torch.inference_mode()
def test_a_q4_k_m_model_saves_and_loads_back_identically(tmp_path):
    from ligero.eval.variants import build_variant
    from ligero.io.checkpoint import load_checkpoint, save_checkpoint

    variant = build_variant("smollm2-135m", recipe=recipe_for("q4_k_m"), device="cpu")
    save_checkpoint(variant.model, variant.tokenizer, tmp_path / "q4_k_m", {"format": "test"})
    back = load_checkpoint(tmp_path / "q4_k_m", "cpu", torch.float32)
    tokens = torch.tensor([[1, 504, 3458, 314, 4764]])
    assert torch.equal(back.model(tokens), variant.model(tokens))
    assert isinstance(back.model.layers[0].attn.qkv_proj.config, PartsConfig)  # Q5_0 q/k beside a Q8_0 v


def test_q8_0_quantizer_is_ggufs_byte_for_byte():
    """Ligero's q8_0 (the Q8_0 fallback of the mixes) against gguf's Q8_0 quantizer (llama.cpp's reference), on
    data with many exact halves (C's roundf takes them away from zero)."""
    from gguf.quants import quantize

    from ligero.quant.formats import quantize_int8_blocks

    g = torch.Generator().manual_seed(3)
    w = torch.cat([torch.randn(8, 256, generator=g), torch.randint(-254, 255, (8, 256), generator=g) / 2.0])
    w[:, ::32] = 127.0  # block maxima of 127: every half-integer is an exact tie
    q, scale = quantize_int8_blocks(w)
    ours = torch.cat([scale.view(torch.uint8).reshape(16, 8, 2), q.view(torch.uint8).reshape(16, 8, 32)], -1)
    assert np.array_equal(ours.reshape(16, -1).numpy(), quantize(w.numpy(), GGMLQuantizationType.Q8_0))


def test_q4_0_quantizer_is_ggufs_byte_for_byte():
    """int4-sym (Q4_0's grid; the Q2_K / Q3_K fallback of the mixes) against gguf's Q4_0 quantizer."""
    from gguf.quants import quantize

    from ligero.io.gguf_file import join_blocks
    from ligero.quant.config import IntGroupConfig
    from ligero.quant.modules import IntGroupLinear

    g = torch.Generator().manual_seed(4)
    w = torch.cat([torch.randn(8, 256, generator=g), torch.randint(-16, 17, (8, 256), generator=g) / 2.0])
    layer = IntGroupLinear.from_float(w, IntGroupConfig(32, symmetric=True))
    ours = join_blocks({"packed": layer.packed, "scale": layer.scale, "minimum": layer.minimum}, "Q4_0")
    assert np.array_equal(ours, quantize(w.numpy(), GGMLQuantizationType.Q4_0))


def test_q3_k_m_falls_back_to_q4_0_where_widths_are_not_multiples_of_256():
    from ligero.quant.config import IntGroupConfig
    from ligero.quant.ggml_mix import layer_config

    assert layer_config("Q3_K", 576, "Q3_K_M") == IntGroupConfig(32, symmetric=True)
    assert layer_config("Q3_K", 512, "Q3_K_M") == GGMLConfig("Q3_K")


def test_empty_and_malformed_rows():
    assert ggml.quantize_rows(torch.zeros(0, 256), "Q4_K").shape == (0, 144)
    assert ggml.dequantize_rows(torch.zeros(0, 144, dtype=torch.uint8), "Q4_K").shape == (0, 256)
    assert ggml.dequantize_rows(torch.zeros(0, 18, dtype=torch.uint8), "Q4_0").shape == (0, 32)
    with pytest.raises(LigeroError, match="Q4_K rows must be"):
        ggml.dequantize_rows(torch.zeros(144, dtype=torch.uint8), "Q4_K")  # 1-D: not [rows, bytes]
    with pytest.raises(LigeroError, match="unknown GGML block type"):
        ggml.dequantize_rows(torch.zeros(1, 8, dtype=torch.uint8), "Q9_9")


def test_a_mix_belongs_to_the_recipes_weights_and_parts_have_one_form():
    from ligero.quant.config import Int8WeightConfig, QuantConfig

    with pytest.raises(LigeroError, match="give it as the recipe's weights"):
        Recipe(None, head=GGMLMixConfig("Q4_K_M"))
    parts = [Int8WeightConfig(group_size=32).to_dict(), None]
    as_list, as_tuple = PartsConfig(parts), PartsConfig(tuple(parts))
    assert as_list == as_tuple and isinstance(as_list.parts, tuple)
    assert QuantConfig.from_dict(as_list.to_dict()) == as_tuple  # through JSON's lists
