"""A compact int4 layer (the decode kernel's x8 layout only, as GGUF Q4_0 / Q4_1 files load) computes, saves,
dequantizes and reports its size exactly as the layer it came from, and expands back when its buffers are set."""

import pytest
import torch

from ligero.errors import LigeroError
from ligero.models.transformer import stored_bytes
from ligero.quant.config import IntGroupConfig
from ligero.quant.modules import IntGroupLinear
from tiny_models import held_storage_bytes


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("out", [37, 64])  # 37: a zero-padded last bundle of 8 rows
def test_compact_layer_is_the_same_layer_in_half_the_memory(compiled_kernels, symmetric, out):
    w = torch.randn(out, 576, generator=torch.Generator().manual_seed(out))
    full = IntGroupLinear.from_float(w, IntGroupConfig(32, symmetric=symmetric))
    layer = IntGroupLinear.from_float(w, IntGroupConfig(32, symmetric=symmetric))
    saved = {k: v.clone() for k, v in full.state_dict().items()}
    assert layer.compact() and "packed" not in layer._buffers
    state = layer.state_dict()  # still the row-major GGUF order
    assert list(state) == list(saved) and all(torch.equal(state[k], saved[k]) for k in saved)
    assert stored_bytes(layer) == stored_bytes(full)
    padded = -(-out // 8) * 8
    assert layer.stored_bytes() == padded * (576 // 2 + 576 // 32 * 2 * (1 if symmetric else 2))  # x8 bytes only
    assert held_storage_bytes(layer) == layer.stored_bytes()  # the row-major buffers are gone, views included
    with torch.inference_mode():
        for rows in (1, 5, 40):  # decode kernels, then prefill's weight
            x = torch.randn(rows, 576)
            assert torch.equal(layer(x), full(x))
    picks = torch.tensor([3, 0, out - 1, 11])
    assert torch.equal(layer.dequantize(picks), full.dequantize(picks))  # embedding lookups read rows only
    assert torch.equal(layer.dequantize(), full.dequantize())
    for bad in ([out], [-1], [padded - 1])[: 3 if padded > out else 2]:  # a padding row, a wrapped id: no rows
        with pytest.raises(LigeroError, match=r"row ids must be in \[0, "):
            layer.dequantize(torch.tensor(bad))
    layer.scale = layer.scale * 2  # assigning a buffer expands the layer first
    assert "packed" in layer._buffers and torch.equal(layer.packed, full.packed)
    assert torch.equal(layer.scale, full.scale * 2)


def test_three_bit_codes_stay_as_they_are(compiled_kernels):
    layer = IntGroupLinear.from_float(torch.randn(16, 256), IntGroupConfig(32, bits=3))
    assert not layer.compact() and "packed" in layer._buffers
