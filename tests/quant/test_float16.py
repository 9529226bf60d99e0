"""16-bit weights (fp16 / bf16) computed in fp32: the decode kernel against torch, the layer's prefill and
dequantization exact, the f16 / bf16 schemes on SmolLM2 (half the bytes, the fp32 model's predictions)."""

import pytest
import torch
import torch.nn.functional as F

from ligero.io.checkpoint import load_model
from ligero.kernels import MAX_KERNEL_ROWS, cpu_kernels
from ligero.models.transformer import stored_bytes
from ligero.quant.api import quantize
from ligero.quant.config import Float16Config, recipe_for
from ligero.quant.modules import Float16Linear, QuantizedEmbedding

DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("rows, in_features, out_features", [(1, 576, 67), (3, 100, 9), (8, 2048, 40)])
def test_kernel_equals_torch_on_the_widened_weights(dtype, rows, in_features, out_features):
    ext = cpu_kernels()
    if ext is None:
        pytest.skip("no compiled kernels here")
    g = torch.Generator().manual_seed(rows + in_features)
    w16 = torch.randn(out_features, in_features, generator=g).to(DTYPES[dtype])
    x = torch.randn(rows, in_features, generator=g)
    reference = x.double() @ w16.double().t()  # exact products of the 16-bit values, summed in double
    got = ext.linear_half(x, w16)
    # fp32 products and sums in another order: within fp32 rounding of the sum's terms
    bound = 1e-5 * (x.abs().double() @ w16.abs().double().t()) + 1e-6
    assert ((got.double() - reference).abs() <= bound).all()


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_layer_holds_16_bits_and_prefills_exactly(dtype):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 256, generator=g)
    layer = Float16Linear.from_float(w, Float16Config(dtype))
    assert layer.weight16.dtype == DTYPES[dtype] and layer.stored_bytes() == 2 * w.numel()
    assert torch.equal(layer.dequantize(), w.to(DTYPES[dtype]).float())
    x = torch.randn(2, 20, 256, generator=g)  # prefill-sized: torch's GEMM on the widened weights
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), F.linear(x, w.to(DTYPES[dtype]).float()), rtol=0, atol=0)
    with pytest.raises(Exception, match="f16 or bf16"):
        Float16Config("fp16")


def test_act16_rounds_activations_as_llama_cpp_does():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    layer = Float16Linear.from_float(w, Float16Config("f16", act16=True))
    x = torch.randn(5, 64) * 3
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), F.linear(x.half().float(), w.half().float()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme", ["f16", "bf16"])
def test_scheme_on_smollm2_halves_the_bytes_and_keeps_the_predictions(scheme):
    full = load_model("smollm2-135m", "cpu").model
    variant = load_model("smollm2-135m", "cpu").model
    quantize(variant, recipe_for(scheme))
    assert all(type(b.mlp.gate_up_proj) is Float16Linear for b in variant.layers)
    assert isinstance(variant.embed, QuantizedEmbedding) and variant.embed.table is variant.lm_head  # tied, 16-bit
    assert 0.49 < stored_bytes(variant) / stored_bytes(full) < 0.51
    tokens = torch.tensor([[1, 504, 2210, 314, 253, 1345, 30, 198, 60, 70, 11, 957]])
    with torch.inference_mode():
        lp_full, lp = F.log_softmax(full(tokens), -1), F.log_softmax(variant(tokens), -1)
        kl = (lp_full.exp() * (lp_full - lp)).sum(-1).mean()
        assert kl < (1e-4 if scheme == "f16" else 2e-3)
        assert torch.equal(lp.argmax(-1), lp_full.argmax(-1))
        # decode-sized steps go through the kernel: the same logits as the prefill's within fp32 noise
        step = variant(tokens[:, :1])
        torch.testing.assert_close(step[0, -1], variant(tokens)[0, 0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch, dtype", [("llama", torch.bfloat16), ("gemma3", torch.float16)])
def test_hugging_face_16_bit_folder_loads_in_16_bits(tmp_path, arch, dtype):
    """keep_quantized: the folder's 16-bit matrices stay in 16 bits (a source quantize() starts from, bit for bit
    as from the fp32 load); the logits are the fp32 load's."""
    from tiny_models import tiny_hf_model

    tiny_hf_model(arch).to(dtype).save_pretrained(tmp_path)
    full = load_model(str(tmp_path), "cpu").model
    half = load_model(str(tmp_path), "cpu", keep_quantized=True).model
    linears = [m for n, m in half.named_modules() if n.endswith("_proj") or n == "lm_head"]
    assert linears and all(type(m) is Float16Linear and m.weight16.dtype == dtype for m in linears)
    assert not any(p.dim() == 2 for p in half.parameters())  # no fp32 copy of a matrix
    assert stored_bytes(half) < 0.55 * stored_bytes(full)
    # More rows than MAX_KERNEL_ROWS: a prefill, the same fp32 GEMM on the same weights (16 rows would go to the
    # decode kernel, whose summation order depends on the CPU's instruction set)
    tokens = torch.tensor([[1, 5, 9, 33, 2, 60, 17, 4, 8, 21, 3, 40, 11, 6, 52, 7, 30, 12, 19, 44]])
    assert tokens.shape[1] > MAX_KERNEL_ROWS
    with torch.inference_mode():
        torch.testing.assert_close(half(tokens), full(tokens), rtol=0, atol=0)
    quantize(full, recipe_for("int8"))
    quantize(half, recipe_for("int8"))
    sa, sb = full.state_dict(), half.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
