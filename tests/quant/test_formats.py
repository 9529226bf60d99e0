"""Formats: SQNR thresholds on random and real weights, bit-exact packing, kernels against the reference."""

import pytest
import torch
import torch.nn.functional as F

from ligero.quant import formats
from ligero.quant.config import FP4Config, FP8Config, Int8WeightConfig, IntGroupConfig
from ligero.quant.modules import FP4Linear, FP8Linear, Int8Linear, IntGroupLinear


def sqnr_db(w, w_hat):
    return float(10 * torch.log10(w.pow(2).sum() / (w - w_hat).pow(2).sum()))


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# Gaussian weights: int8 per channel ~41 dB, int4 g32 ~22 dB (theory); thresholds leave a small margin.
# FP8 E4M3 (3 mantissa bits) ~31 dB, E5M2 ~25 dB; FP4 blocks ~17-19 dB (NVFP4's finer scales beat MX's).
THRESHOLDS = {Int8WeightConfig(): 38.0, IntGroupConfig(32): 20.0, IntGroupConfig(64): 19.5,
              IntGroupConfig(128): 18.5, FP8Config("e4m3"): 29.0, FP8Config("e5m2"): 23.0,
              FP4Config("mxfp4"): 17.0, FP4Config("nvfp4"): 19.0}
LAYERS = {Int8WeightConfig: Int8Linear, IntGroupConfig: IntGroupLinear, FP8Config: FP8Linear, FP4Config: FP4Linear}


@pytest.mark.parametrize("config", list(THRESHOLDS), ids=lambda c: f"{c.kind}-{list(c.to_dict().values())[2:]}")
def test_sqnr_on_random_weights(config):
    w = randn(256, 576)
    layer = LAYERS[type(config)].from_float(w, config)
    assert sqnr_db(w, layer.dequantize()) > THRESHOLDS[config]


REAL_THRESHOLDS = {Int8WeightConfig(): 39.0, IntGroupConfig(128): 18.5, IntGroupConfig(128, bits=3): 12.0,
                   FP8Config("e4m3"): 29.5, FP8Config("e5m2"): 23.5, FP4Config("mxfp4"): 17.0,
                   FP4Config("nvfp4"): 19.0}


@pytest.mark.slow
def test_sqnr_on_real_weights(smollm2):
    from ligero.quant.config import TernaryConfig
    from ligero.quant.modules import TernaryLinear

    w = smollm2.model.layers[3].mlp.down_proj.weight
    for config, threshold in REAL_THRESHOLDS.items():
        assert sqnr_db(w, LAYERS[type(config)].from_float(w, config).dequantize()) > threshold, config
    # SmolLM2 ships as Q4_1 (group 32, scale + minimum): asymmetric int4 g32 recovers that grid exactly.
    assert torch.allclose(IntGroupLinear.from_float(w, IntGroupConfig(32)).dequantize(), w, atol=1e-6)
    # post-training ternarization keeps little (BitNet needs training): ~5.6 dB on this layer
    assert 4.0 < sqnr_db(w, TernaryLinear.from_float(w, TernaryConfig()).dequantize()) < 8.0


def test_int4_pack_unpack_is_bit_exact():
    q = torch.randint(0, 16, (7, 96), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    packed = formats.pack_nibbles(q)
    assert packed.shape == (7, 48) and packed.dtype == torch.uint8
    assert torch.equal(formats.unpack_nibbles(packed), q)
    # GGUF Q4 layout: byte j of a block holds value j (low nibble) and value j + 16 (high nibble).
    assert int(packed[0, 0]) == int(q[0, 0]) | (int(q[0, 16]) << 4)


def test_int4_partial_last_group_and_constant_groups():
    w = randn(4, 576)
    w[0, :128] = 0.25  # a constant group: zero range must not divide by zero
    w[1, 512:] = -0.5  # the short last group (576 = 4 x 128 + 64), also constant
    q, scale, minimum = formats.quantize_int_groups(w, 4, 128)
    assert scale.shape == (4, 5)  # 576 = 4 x 128 + 64
    w_hat = formats.dequantize_int_groups(q, scale, minimum, 128)
    assert torch.isfinite(w_hat).all()
    assert torch.allclose(w_hat[0, :128], torch.full((128,), 0.25), atol=1e-3)
    assert torch.allclose(w_hat[1, 512:], torch.full((64,), -0.5), atol=1e-3)


def test_int8_grid_and_scale():
    w = randn(8, 64)
    q, scale = formats.quantize_int8_per_channel(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    torch.testing.assert_close(scale, w.abs().amax(1) / 127)


@pytest.mark.parametrize("config", [Int8WeightConfig(), IntGroupConfig(32), IntGroupConfig(128),
                                    FP8Config("e4m3", activations=False), FP8Config("e5m2", activations=False),
                                    FP4Config("mxfp4"), FP4Config("nvfp4")],
                         ids=["int8", "int4-g32", "int4-g128", "fp8-e4m3", "fp8-e5m2", "mxfp4", "nvfp4"])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_packed_kernels_match_dequantized_reference(config, rows):
    w = randn(200, 576, seed=3)
    layer = LAYERS[type(config)].from_float(w, config)
    x = randn(rows, 576, seed=4)
    with torch.inference_mode():
        got = layer(x)  # packed kernel path (<= 8 rows)
    w_hat = layer.dequantize()
    # Kernels may round activations to ~16 bits (VNNI path): bound the error by the size of the terms summed.
    scale = x.abs() @ w_hat.abs().T
    assert ((got - F.linear(x, w_hat)).abs() <= 1e-4 * scale + 1e-6).all()
    with torch.inference_mode():  # prefill path: transient dequantization + GEMM
        big = randn(20, 576, seed=5)
        torch.testing.assert_close(layer(big), F.linear(big, w_hat), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("config", [Int8WeightConfig(), IntGroupConfig(32), IntGroupConfig(128), FP8Config("e4m3"),
                                    FP4Config("nvfp4")], ids=["int8", "int4-g32", "int4-g128", "fp8", "nvfp4"])
def test_batched_kernel_rows_equal_single_row_calls(config, compiled_kernels):
    """The decode kernels share each weight row's unpacking across the batch; every row's result must be exactly
    what it would be alone, so a served request's output does not depend on what it was batched with."""
    layer = LAYERS[type(config)].from_float(randn(200, 576, seed=6), config)
    x = randn(8, 576, seed=7)
    with torch.inference_mode():
        batched = layer(x)
        alone = torch.cat([layer(x[i : i + 1]) for i in range(8)])
    assert torch.equal(batched, alone)


@pytest.mark.parametrize("bits", [2, 3])
def test_dense_low_bit_packing_is_bit_exact(bits):
    q = torch.randint(0, 2**bits, (5, 64), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    packed = formats.pack_bits(q, bits)
    assert packed.shape == (5, 64 * bits // 8)
    assert torch.equal(formats.unpack_bits(packed, bits), q)


def test_int3_layer_stores_3_bits_and_decodes_like_its_reference():
    w = randn(64, 576)
    layer = IntGroupLinear.from_float(w, IntGroupConfig(128, bits=3))
    assert layer.packed.numel() * 8 == 3 * w.numel()  # codes at 3 bits; scales and minimums on top
    assert int(layer.codes().max()) <= 7
    x = randn(1, 576, seed=1)
    with torch.inference_mode():
        got = layer(x)
    w_hat = layer.dequantize()
    assert ((got - F.linear(x, w_hat)).abs() <= 1e-4 * (x.abs() @ w_hat.abs().T) + 1e-6).all()


def test_nvfp4_keeps_one_tensor_scale_per_fused_segment():
    # A fused projection whose parts differ 1000x in magnitude (as q / k / v can): NVFP4's fp32 tensor scale
    # is per original tensor, so the small part is quantized exactly as it would be on its own.
    big, small = randn(64, 64, seed=1) * 10.0, randn(32, 64, seed=2) * 0.01
    fused = FP4Linear.from_float(torch.cat([big, small]), FP4Config("nvfp4"), segments=(64, 32))
    alone = FP4Linear.from_float(small, FP4Config("nvfp4"))
    assert fused.tensor_scale.shape == (2,)
    torch.testing.assert_close(fused.dequantize()[64:], alone.dequantize(), rtol=0, atol=0)
    x = randn(3, 64, seed=3)
    torch.testing.assert_close(fused(x), x @ fused.dequantize().T, rtol=1e-5, atol=1e-4)  # kernel path agrees
