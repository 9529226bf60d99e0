"""A compact Q8_0 layer (int8 weights with fp16 scales per 32 inputs and int8 activations, held only in the x8
kernel layout, as GGUF files load) computes as the row-major kernel does up to fp32 summation order, gives every
row the same result in any batch, saves, dequantizes and reports its size exactly as the layer it came from."""

import pytest
import torch
import torch.nn.functional as F

from ligero.errors import LigeroError
from ligero.models.transformer import stored_bytes
from ligero.quant import formats
from ligero.quant.config import Int8WeightConfig
from ligero.quant.modules import Int8Linear
from tiny_models import held_storage_bytes

Q8_0_A8 = Int8WeightConfig(group_size=32, act_int8_blocks=True)


def _layers(out: int, inp: int = 576) -> tuple[Int8Linear, Int8Linear]:
    w = torch.randn(out, inp, generator=torch.Generator().manual_seed(out)) * 0.05
    return Int8Linear.from_float(w, Q8_0_A8), Int8Linear.from_float(w, Q8_0_A8)


@pytest.mark.parametrize("out", [37, 64, 200])  # 37: a padded last bundle; 200: an odd number of bundles (25)
def test_compact_q8_0_is_the_same_layer(compiled_kernels, out):
    full, layer = _layers(out)
    saved = {k: v.clone() for k, v in full.state_dict().items()}
    assert layer.compact() and "q" not in layer._buffers and "scale" not in layer._buffers
    state = layer.state_dict()  # still row-major, as GGUF stores Q8_0
    assert list(state) == list(saved) and all(torch.equal(state[k], saved[k]) for k in saved)
    assert stored_bytes(layer) == stored_bytes(full) and layer.saved_bytes() == full.saved_bytes()
    padded = -(-out // 8) * 8
    assert held_storage_bytes(layer) == layer.stored_bytes() == padded * (576 + 576 // 32 * 2)  # the x8 bytes only
    picks = torch.tensor([3, 0, out - 1, 11])
    assert torch.equal(layer.dequantize(picks), full.dequantize(picks))  # embedding lookups read rows only
    assert torch.equal(layer.dequantize(), full.dequantize())
    assert torch.equal(layer.prefill_rows(2, 9), full.prefill_rows(2, 9))
    with pytest.raises(LigeroError, match=r"row ids must be in \[0, "):
        layer.dequantize(torch.tensor([out]))
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for rows in (1, 3, 4, 8, 13, 16, 40):  # every tile height, 256- and 512-bit paths, prefill-sized
            x = torch.randn(rows, 576, generator=g) * 3
            got, reference = layer(x), full(x)
            # the same integer products; only the fp32 summation order over the 18 blocks differs
            x_hat = formats.fake_quantize_int8_blocks(x)
            bound = 1e-5 * (x_hat.abs() @ full.dequantize().abs().T) + 1e-6
            assert ((got - reference).abs() <= bound).all()
            assert ((got - F.linear(x_hat, full.dequantize())).abs() <= bound).all()
            alone = torch.cat([layer(x[i : i + 1]) for i in range(rows)])
            assert torch.equal(got, alone)  # a row's result does not depend on its batch
    layer.scale = layer.scale * 2  # assigning a buffer expands the layer first
    assert "q" in layer._buffers and torch.equal(layer.q, full.q) and torch.equal(layer.scale, full.scale * 2)


def test_only_q8_0_with_int8_activations_compacts(compiled_kernels):
    w = torch.randn(16, 64)
    assert not Int8Linear.from_float(w, Int8WeightConfig()).compact()  # a scale per row
    assert not Int8Linear.from_float(w, Int8WeightConfig(group_size=32)).compact()  # fp32 activations


def test_the_native_step_runs_compact_q8_0(compiled_kernels, tmp_path):
    """A model whose projections and head are compact Q8_0 decodes in the native step exactly as layer by layer."""
    import os

    from ligero.io.checkpoint import load_model
    from ligero.quant.api import compact_layers, quantize
    from tiny_models import forced_decode_logits, tiny_hf_model

    tiny_hf_model("llama").save_pretrained(tmp_path)
    model = quantize(load_model(str(tmp_path), device="cpu").model, Q8_0_A8)  # as GGUF Q8_0 files load
    layers = [m for m in model.modules() if isinstance(m, Int8Linear) and m.act8 and m.scale.dim() == 2]
    assert len(layers) >= 4 * model.cfg.n_layers
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 160, (n,), generator=g).tolist() for n in (5, 12, 3)]
    forced = torch.randint(1, 160, (3, 10), generator=g)
    before = forced_decode_logits(model, prompts, forced)
    assert compact_layers(model) == len(layers)
    native = forced_decode_logits(model, prompts, forced)
    torch.testing.assert_close(native, before, rtol=1e-4, atol=1e-4)  # the x8 kernel's summation order
    os.environ["LIGERO_DECODE_STEP"] = "layers"
    try:
        assert torch.equal(forced_decode_logits(model, prompts, forced), native)
    finally:
        del os.environ["LIGERO_DECODE_STEP"]
