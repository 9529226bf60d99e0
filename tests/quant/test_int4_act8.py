"""int4 with int8 activations per 32-input block (`int4-a8`, `int4-sym-a8`, llama.cpp's Q4 x Q8_0 arithmetic) and
the symmetric (Q4_0) grid: the kernel against a plain-torch reference of the same arithmetic, prefill and decode
agreeing (bit for bit: prefill runs the same kernel), and whole models decoding the same tokens
on both paths."""

import pytest
import torch
import torch.nn.functional as F

from ligero.quant import formats, modules
from ligero.quant.api import quantize
from ligero.quant.config import IntGroupConfig, recipe_for
from ligero.quant.modules import IntGroupLinear


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_fake_quantize_int8_blocks_rounds_each_block_to_127_levels():
    x = randn(3, 96, seed=1)
    x_hat = formats.fake_quantize_int8_blocks(x)
    blocks, hat = x.view(3, 3, 32), x_hat.view(3, 3, 32)
    step = blocks.abs().amax(-1, keepdim=True) / 127
    stored = step.half().float()  # the step as Q8_0 stores it (fp16)
    assert not torch.equal(stored, step)  # the fp16 rounding is really there
    assert ((hat - blocks).abs() <= step / 2 + 127 * (stored - step).abs() + 1e-7).all()
    assert torch.allclose((hat / stored).round(), hat / stored, atol=1e-4)  # integer multiples of the stored step
    assert torch.equal(formats.fake_quantize_int8_blocks(torch.zeros(1, 32)), torch.zeros(1, 32))


def test_native_block_rounding_equals_the_torch_reference_bit_for_bit(compiled_kernels):
    x = torch.cat([randn(37, 96, seed=9) * 10, torch.zeros(1, 96), randn(2, 96, seed=10) * 1e-30])
    x[3, 5] = 0.5 * x[3].abs().max() * 127 / 127  # ties and extremes included
    assert torch.equal(compiled_kernels.fake_quant_int8_blocks(x), formats.fake_quantize_int8_blocks(x))
    assert torch.equal(compiled_kernels.fake_quant_int8_blocks(x.view(2, 20, 96)),
                       formats.fake_quantize_int8_blocks(x).view(2, 20, 96))


def test_symmetric_grid_puts_zero_and_the_extreme_on_codes():
    w = randn(16, 64, seed=2)
    q, scale, minimum = formats.quantize_int_groups(w, 4, 32, symmetric=True)
    assert torch.equal(minimum.float(), -8 * scale.float())
    w_hat = formats.dequantize_int_groups(q, scale, minimum, 32)
    groups, hat = w.view(16, 2, 32), w_hat.view(16, 2, 32)
    extreme = groups.gather(-1, groups.abs().argmax(-1, keepdim=True))
    assert torch.allclose(hat.gather(-1, groups.abs().argmax(-1, keepdim=True)), extreme, rtol=1e-3)
    assert (q.view(16, 2, 32).float() - 8).abs().amax() <= 8
    # As good as the asymmetric grid within a factor (it spends one level on exact zero)
    q2, s2, m2 = formats.quantize_int_groups(w, 4, 32)
    err_sym = (w_hat - w).pow(2).mean()
    err_asym = (formats.dequantize_int_groups(q2, s2, m2, 32) - w).pow(2).mean()
    assert err_sym < 2.0 * err_asym


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("rows", [1, 5, 8, 9, 70])
def test_kernel_equals_torch_reference_of_the_same_arithmetic(compiled_kernels, symmetric, group, rows):
    cfg = IntGroupConfig(group, symmetric=symmetric, act_int8_blocks=True)
    layer = IntGroupLinear.from_float(randn(67, 608, seed=group) * 0.05, cfg)
    x = randn(rows, 608, seed=rows)
    with torch.inference_mode():
        got = layer(x)  # kernel up to 8 rows; more rows: dequantize + GEMM (a small layer)
        alone = torch.cat([layer(x[i : i + 1]) for i in range(rows)])
    x_hat, w_hat = formats.fake_quantize_int8_blocks(x), layer.dequantize()
    ref = F.linear(x_hat.double(), w_hat.double()).float()
    scale = (x_hat.abs() @ w_hat.abs().T)
    assert ((got - ref).abs() <= 1e-5 * scale + 1e-6).all()
    assert ((alone - ref).abs() <= 1e-5 * scale + 1e-6).all()
    if rows <= 8:  # the kernel: a row's result does not depend on the batch it came in
        assert torch.equal(got, alone)
    # and it is not the exact-activation product: the option really rounds the activations
    assert not torch.allclose(got, F.linear(x, w_hat), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("out, inp", [(40, 576), (2048, 2048)])
def test_prefill_runs_the_integer_kernel_equal_to_decode_bit_for_bit(compiled_kernels, monkeypatch, out, inp):
    layer = IntGroupLinear.from_float(randn(out, inp, seed=3) * 0.05, IntGroupConfig(32, act_int8_blocks=True))
    x = randn(20, inp, seed=4)
    with torch.inference_mode():
        decode = torch.cat([layer(x[i : i + 1]) for i in range(20)])
        monkeypatch.setattr(F, "linear", None)  # prefill must not fall back to dequantize + GEMM
        prefill = layer(x)  # 20 rows: the same kernel, tile by tile
    assert torch.equal(prefill, decode)
    assert layer.kernel_prefills()
    # The exact-activation path does twice the integer work: dequantize + torch's GEMM is faster there.
    assert not IntGroupLinear.from_float(randn(2048, 2048), IntGroupConfig(32)).kernel_prefills()


def test_prefill_without_kernels_rounds_the_activations_like_the_kernel(compiled_kernels, monkeypatch):
    layer = IntGroupLinear.from_float(randn(40, 576, seed=3), IntGroupConfig(32, act_int8_blocks=True))
    x = randn(12, 576, seed=4)
    with torch.inference_mode():
        fast = layer(x)
        monkeypatch.setattr(modules, "cpu_kernels", lambda: None)
        torch_path = layer(x)  # fake-quantized activations, dequantized weight, torch's GEMM
    x_hat, w_hat = formats.fake_quantize_int8_blocks(x), layer.dequantize()
    assert ((fast - torch_path).abs() <= 1e-5 * (x_hat.abs() @ w_hat.abs().T)).all()  # summation order only


@pytest.mark.parametrize("scheme", ["int4-sym", "int4-a8", "int4-sym-a8", "int8-a8"])
def test_schemes_decode_the_same_tokens_with_and_without_kernels(scheme, tiny_pair, monkeypatch, compiled_kernels):
    from ligero.io.checkpoint import load_model
    from ligero.models import transformer
    from ligero.models.generate import SamplingConfig, generate_tokens

    _, _, folder = tiny_pair
    model = load_model(str(folder), device="cpu").model
    quantize(model, recipe_for(scheme))
    prompt = [[1, 5, 9, 3]]
    greedy = SamplingConfig(temperature=0.0)
    with torch.inference_mode():
        fast = generate_tokens(model, prompt, 32, greedy, eos_ids=[])
        monkeypatch.setattr(modules, "cpu_kernels", lambda: None)
        monkeypatch.setattr(transformer, "cpu_kernels", lambda: None)
        reference = generate_tokens(model, prompt, 32, greedy, eos_ids=[])
    assert fast == reference


@pytest.mark.parametrize("rows", [1, 8, 40])
def test_symmetric_layers_let_the_kernel_derive_the_minimum(compiled_kernels, rows):
    layer = IntGroupLinear.from_float(randn(72, 576, seed=7), IntGroupConfig(32, symmetric=True, act_int8_blocks=True))
    assert layer.kernel_minimum().numel() == 0  # not read per token: minimum = -8 * scale exactly
    codes, scales, minimums = layer.kernel_layout(compiled_kernels)
    assert minimums.numel() == 0
    x = randn(rows, 576, seed=8)
    implied = compiled_kernels.linear_int4(x, codes, scales, minimums, 32, True, 72)  # -8 offset in integers
    explicit_layout = compiled_kernels.pack_int4_x8(layer.packed, layer.scale, layer.minimum)
    explicit = compiled_kernels.linear_int4(x, *explicit_layout, 32, True, 72)  # minimum term in fp32
    x_hat, w_hat = formats.fake_quantize_int8_blocks(x), layer.dequantize()
    bound = 1e-5 * (x_hat.abs() @ w_hat.abs().T)  # summation order only
    assert ((implied - x_hat @ w_hat.T).abs() <= bound).all()
    assert ((explicit - x_hat @ w_hat.T).abs() <= bound).all()
    asym = IntGroupLinear.from_float(randn(72, 576, seed=7), IntGroupConfig(32, act_int8_blocks=True))
    assert torch.equal(asym.kernel_minimum(), asym.minimum)
    layer.minimum = layer.minimum + 1e-3  # edited minimums (e.g. a loaded file) are read again, not assumed
    assert torch.equal(layer.kernel_minimum(), layer.minimum)
    assert layer.kernel_layout(compiled_kernels)[2].numel() == layer.minimum.numel()  # the kernel layout follows


def test_the_kernel_layout_follows_edits_made_in_place(compiled_kernels):
    layer = IntGroupLinear.from_float(randn(16, 64, seed=1), IntGroupConfig(32))
    x = randn(1, 64, seed=2)
    with torch.inference_mode():
        before = layer(x)
    with torch.no_grad():
        layer.scale.mul_(2)  # e.g. a learned-rounding pass writing its result into the buffers
    with torch.inference_mode():
        after = layer(x)
    assert not torch.equal(after, before)
    w_hat = layer.dequantize()
    assert ((after - F.linear(x, w_hat)).abs() <= 1e-4 * (x.abs() @ w_hat.abs().T)).all()  # ~16-bit activations


@pytest.mark.parametrize("blocks", [None, 32], ids=["row-scale", "q8_0"])
def test_int8_act8_kernel_equals_the_torch_reference_and_each_row_its_own_result(compiled_kernels, blocks):
    """The int8 x int8-activation kernel (llama.cpp's Q8_0 x Q8_0) on 37 output rows, decode and prefill batch
    sizes: every row gets the bits it gets alone, and the products are the rounded activations times the
    dequantized weight up to summation order."""
    from ligero.quant.config import Int8WeightConfig
    from ligero.quant.modules import Int8Linear

    cfg = Int8WeightConfig(act_int8_blocks=True, group_size=blocks) if blocks else \
        Int8WeightConfig(act_int8_blocks=True)
    layer = Int8Linear.from_float(randn(37, 576, seed=4) * 0.05, cfg)
    x = randn(40, 576, seed=5)
    with torch.inference_mode():
        alone = torch.cat([compiled_kernels.linear_int8(x[i : i + 1], layer.q, layer.scale, True) for i in range(40)])
        for rows in (2, 8, 11, 40):
            assert torch.equal(compiled_kernels.linear_int8(x[:rows], layer.q, layer.scale, True), alone[:rows]), rows
    x_hat, w_hat = formats.fake_quantize_int8_blocks(x), layer.dequantize()
    assert ((alone - F.linear(x_hat, w_hat)).abs() <= 1e-5 * (x_hat.abs() @ w_hat.abs().T) + 1e-7).all()
