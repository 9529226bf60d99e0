"""int8 weights with int8 activations per 32-input block (`int8-a8`, llama.cpp's Q8_0 x Q8_0 arithmetic): the
integer kernel against a plain-torch reference of the same arithmetic, the -128 code, batch and prefill invariance,
the path without kernels and the shape rule (whole models decoding the same tokens with and without kernels:
test_int4_act8.py's test over every -a8 scheme)."""

import pytest
import torch
import torch.nn.functional as F

from ligero.errors import LigeroError
from ligero.quant import formats, modules
from ligero.quant.config import Int8WeightConfig, recipe_for
from ligero.quant.modules import Int8Linear

A8 = Int8WeightConfig(act_int8_blocks=True)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def integer_reference(x: torch.Tensor, layer: Int8Linear) -> torch.Tensor:
    """The kernel's arithmetic in plain torch, in float64: per block, the exact integer dot product of the rounded
    activations with the weight codes, times the block's activation scale (amax / 127 in fp32, then fp16, as
    llama.cpp's Q8_0 stores it); summed over blocks; times the row scale."""
    xb = x.double().view(x.shape[0], -1, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    q_x = torch.round(xb * torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax)))  # as the kernel: ties to even
    per_block = torch.einsum("mbk,obk->mob", q_x, layer.q.double().view(layer.out_features, -1, 32))
    scale = (amax.float() / 127.0).half().double()
    return ((per_block * scale.squeeze(-1)[:, None, :]).sum(-1) * layer.scale.double()).float()


@pytest.mark.parametrize("rows", [1, 3, 8, 9, 40])
def test_kernel_equals_the_integer_reference(compiled_kernels, rows):
    layer = Int8Linear.from_float(randn(67, 608, seed=1) * 0.05, A8)
    x = randn(rows, 608, seed=rows) * 3
    x[:, 7] = 50.0  # an outlier channel: its block gets a coarse step, the others keep theirs
    with torch.inference_mode():
        got = layer(x)
        alone = torch.cat([layer(x[i : i + 1]) for i in range(rows)])
    ref = integer_reference(x, layer)
    bound = 1e-6 * (x.abs() @ layer.dequantize().abs().T) + 1e-7  # fp32 summation of exact block products only
    assert ((got - ref).abs() <= bound).all()
    assert torch.equal(got, alone)  # prefill runs the same kernel: a row's result does not depend on its batch
    # and it is not the exact-activation product: the option really rounds the activations
    exact = Int8Linear(608, 67, Int8WeightConfig())
    exact.q, exact.scale = layer.q, layer.scale
    with torch.inference_mode():
        assert not torch.allclose(got, exact(x), rtol=1e-6, atol=1e-6)


def test_the_extreme_code_minus_128_multiplies_exactly(compiled_kernels):
    # Ligero's quantizer writes codes in [-127, 127], but a loaded file may hold -128 (GGUF Q8_0 allows it):
    # |w| = 128 must not saturate the 16-bit pair sums (2 x 128 x 127 = 32512 < 32767).
    layer = Int8Linear(64, 5, A8)
    layer.q = torch.full((5, 64), -128, dtype=torch.int8)
    layer.q[1] = 127
    layer.scale = torch.ones(5)
    x = torch.full((1, 64), 1.0)
    x[0, 32:] = -2.0
    with torch.inference_mode():
        got = layer(x)
    assert torch.equal(got, integer_reference(x, layer))
    # each block's step is amax / 127 rounded to fp16: within 2^-11 of the exact products' sum
    assert got[0, 0].item() == pytest.approx(-128 * 32 * 1.0 + -128 * 32 * -2.0, rel=2**-11)


def test_prefill_runs_the_integer_kernel(compiled_kernels, monkeypatch):
    layer = Int8Linear.from_float(randn(300, 576, seed=3) * 0.05, A8)
    x = randn(20, 576, seed=4)
    with torch.inference_mode():
        decode = torch.cat([layer(x[i : i + 1]) for i in range(20)])
        monkeypatch.setattr(F, "linear", None)  # prefill must not fall back to dequantize + GEMM
        prefill = layer(x)
    assert torch.equal(prefill, decode)
    assert layer.kernel_prefills() and not Int8Linear.from_float(randn(8, 64), Int8WeightConfig()).kernel_prefills()


def test_without_kernels_the_layer_rounds_the_activations_like_the_kernel(compiled_kernels, monkeypatch):
    layer = Int8Linear.from_float(randn(40, 576, seed=3), A8)
    x = randn(12, 576, seed=4)
    with torch.inference_mode():
        fast = layer(x)
        monkeypatch.setattr(modules, "cpu_kernels", lambda: None)
        torch_path = layer(x)  # fake-quantized activations, dequantized weight, torch's GEMM
    x_hat, w_hat = formats.fake_quantize_int8_blocks(x), layer.dequantize()
    assert ((fast - torch_path).abs() <= 1e-5 * (x_hat.abs() @ w_hat.abs().T)).all()  # summation order only


def test_only_input_widths_in_blocks_of_32_take_int8_activations():
    from ligero.models.transformer import Linear
    from ligero.quant.api import _check_shapes
    from ligero.quant.config import Recipe

    model = torch.nn.Module()
    model.proj = Linear(48, 16, bias=False)
    with pytest.raises(LigeroError, match="proj: int8_weight needs in_features divisible by 32 .got 48.; exclude"):
        _check_shapes(model, Recipe(A8), None)
    _check_shapes(model, Recipe(Int8WeightConfig()), None)  # weight-only int8 takes any width


def test_a8_schemes_round_the_heads_activations_too():
    assert recipe_for("int4-sym-a8").head == Int8WeightConfig(act_int8_blocks=True)
    assert recipe_for("int8-a8").head == Int8WeightConfig(act_int8_blocks=True)
    assert recipe_for("int4").head == Int8WeightConfig()  # exact schemes keep an exact head
    assert recipe_for("int4-a8").embed == Int8WeightConfig()


@pytest.mark.parametrize("act8", [False, True], ids=["exact", "a8"])
@pytest.mark.parametrize("rows", [1, 8, 20])
def test_block_scaled_int8_q8_0_kernels_equal_torch(compiled_kernels, act8, rows):
    """GGUF Q8_0's layout (an fp16 scale per 32 inputs): GGUF's algorithm, and both kernels against torch."""
    w = randn(45, 256, seed=5) * 0.05
    layer = Int8Linear.from_float(w, Int8WeightConfig(act_int8_blocks=act8, group_size=32))
    assert layer.scale.shape == (45, 8) and layer.scale.dtype == torch.float16
    blocks = w.view(45, 8, 32)
    d = blocks.abs().amax(-1) / 127
    assert torch.equal(layer.q.view(45, 8, 32).float(), torch.round(blocks / d[..., None]))  # Q8_0's rounding
    w_hat = layer.dequantize()
    assert torch.equal(compiled_kernels.dequant_int8(layer.q, layer.scale), w_hat)  # prefill's weight, exactly
    x = randn(rows, 256, seed=rows)
    with torch.inference_mode():
        got = layer(x)
    x_in = formats.fake_quantize_int8_blocks(x) if act8 else x
    ref = F.linear(x_in.double(), w_hat.double()).float()
    assert ((got - ref).abs() <= 1e-5 * (x_in.abs() @ w_hat.abs().T) + 1e-6).all()
