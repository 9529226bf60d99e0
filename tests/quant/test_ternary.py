"""BitNet b1.58: ternary values and absmean scale, 5-trits-per-byte storage, the VNNI kernel, STE training."""

import pytest
import torch
import torch.nn.functional as F

from ligero.models.transformer import Linear
from ligero.quant import formats
from ligero.quant.config import TernaryConfig
from ligero.quant.modules import TernaryLinear
from ligero.quant.ternary import BitLinear, pack_ternary, ternary_values, to_bitlinear


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_ternary_values_and_absmean_scale():
    w = randn(64, 128)
    trits, scale = formats.ternarize(w)
    assert set(trits.unique().tolist()) == {-1, 0, 1}
    assert float(scale) == pytest.approx(float(w.abs().mean()), rel=1e-4)
    # RoundClip: |w| below half the scale -> 0, above -> sign
    assert torch.equal(trits, torch.round(w / scale).clamp(-1, 1).to(torch.int8))


def test_trit_packing_is_bit_exact_and_1_6_bits():
    t = torch.randint(-1, 2, (37, 71), generator=torch.Generator().manual_seed(1), dtype=torch.int8)
    packed = formats.pack_trits(t)
    assert packed.numel() == -(-t.numel() // 5) and int(packed.max()) <= 242
    assert torch.equal(formats.unpack_trits(packed, t.numel()).view_as(t), t)
    layer = TernaryLinear.from_float(randn(1536, 576), TernaryConfig())
    assert layer.packed.numel() * 8 / (1536 * 576) <= 1.6 + 1e-4  # 5 trits/byte, at most 4 trits of padding


def test_fused_projection_keeps_a_scale_per_segment():
    q, k = randn(64, 128), 10 * randn(32, 128, seed=2)
    layer = TernaryLinear.from_float(torch.cat([q, k]), TernaryConfig(), segments=(64, 32))
    assert layer.scale.shape == (2,)
    assert float(layer.scale[1]) == pytest.approx(10 * float(layer.scale[0]), rel=0.1)


@pytest.mark.parametrize("rows", [1, 3, 8, 9, 70])
def test_kernel_equals_int8_activation_reference(rows):
    layer = TernaryLinear.from_float(randn(200, 576, seed=3), TernaryConfig(), segments=(120, 80))
    x = randn(rows, 576, seed=4)
    with torch.inference_mode():
        got = layer(x)  # VNNI kernel (or its scalar fallback)
    expected = F.linear(formats.fake_quantize_int8_tokens(x), layer.dequantize())
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_bitlinear_ste_passes_gradients_and_converts():
    torch.manual_seed(0)  # the layer's initial weights
    layer = BitLinear(64, 32)
    x = randn(4, 64, seed=5).requires_grad_()
    y = layer(x)
    y.pow(2).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0
    # forward really uses ternary weights: equals the packed inference layer
    inference = layer.to_inference()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), inference(x.detach()), atol=1e-5, rtol=1e-5)
    # a few SGD steps reduce a simple regression loss through the STE
    target = randn(4, 32, seed=6)
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = F.mse_loss(layer(x.detach()), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("rows", [8, 100])
def test_batched_kernel_rows_equal_single_row_calls(compiled_kernels, rows, monkeypatch):
    layer = TernaryLinear.from_float(randn(200, 576, seed=5), TernaryConfig())
    x = randn(rows, 576, seed=6)
    with torch.inference_mode():
        single = torch.cat([layer(x[i : i + 1]) for i in range(rows)])
        monkeypatch.setattr(F, "linear", None)  # prefill-sized inputs run the integer kernel too, not a GEMM
        assert torch.equal(layer(x), single)


def _bitlinear(in_features, segments, weight_scale, seed=0):
    torch.manual_seed(seed)
    lin = Linear(in_features, sum(segments), bias=False)
    lin.segments = tuple(segments)
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.Module()])
    model.layers[0].proj = lin
    to_bitlinear(model, weight_scale)
    return model


@pytest.mark.parametrize("weight_scale", ["absmean", "absmedian"])
@pytest.mark.parametrize("rows", [1, 3, 40])  # the decode kernel (few rows), and the prefill path
def test_bitlinear_forward_equals_the_packed_b158_layer(weight_scale, rows):
    model = _bitlinear(128, [128, 64, 64], weight_scale)
    bit = model.layers[0].proj
    assert isinstance(bit, BitLinear)
    x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(rows))
    with torch.no_grad():
        trained = bit(x)
    expected = [ternary_values(w, weight_scale) for w in bit.weight.split([128, 64, 64])]
    pack_ternary(model)
    packed = model.layers[0].proj
    assert isinstance(packed, TernaryLinear)
    assert torch.equal(packed.trits(), torch.cat([t for t, _ in expected]))  # the same ternary values, bit for bit
    assert torch.equal(packed.scale, torch.stack([s for _, s in expected]))  # one scale per q, k, v
    with torch.no_grad():
        served = packed(x)
    torch.testing.assert_close(served, trained, rtol=1e-5, atol=1e-5)


def test_absmean_is_the_runtime_quantizer_itself():
    """A model trained with absmean ternarization packs into what post-training b158 quantization would make
    of the same latent weights."""
    model = _bitlinear(64, [64, 32, 32], "absmean", seed=3)
    latent = model.layers[0].proj.weight.detach().clone()
    pack_ternary(model)
    reference = TernaryLinear.from_float(latent, model.layers[0].proj.config, [64, 32, 32])
    assert torch.equal(model.layers[0].proj.packed, reference.packed)
    assert torch.equal(model.layers[0].proj.scale, reference.scale)
