"""Every GGUF type Ligero reads loads packed, as stored: small llama-shaped files written here, one per type (plus
one mixing types inside fused projections), load into the layers that hold them (the file's bytes in memory, no
fp32 copy, int4 in its kernel layout only),
give the logits of the dequantize-then-fp32 path, and export back byte for byte."""

import numpy as np
import pytest
import torch

from gguf_files import DIM, write_model
from ligero.io.checkpoint import build_model
from ligero.io.gguf_export import export_gguf
from ligero.io.gguf_file import GGUFFile
from ligero.kernels import cpu_kernels
from ligero.quant.api import compact_layers
from ligero.quant.modules import Float16Linear, GGMLLinear, Int8Linear, IntGroupLinear, PartsLinear
from tiny_models import held_storage_bytes

LAYER_CLASS = {"Q8_0": Int8Linear, "Q4_0": IntGroupLinear, "Q4_1": IntGroupLinear, "F16": Float16Linear,
               "BF16": Float16Linear}


def _load_both(path):
    gf = GGUFFile(path)
    cfg = gf.config()
    # as load_model(keep_quantized=True) holds them: int4 read straight into the kernel layout (compact_layers
    # covers the case without kernels: then nothing is compact and the checks below still hold)
    state, recipe = gf.packed_state_dict(cfg, compact_int4=True)
    packed = build_model(cfg, state.items(), "cpu", torch.float32, recipe.to_dict())
    compact_layers(packed)
    full = build_model(cfg, gf.state_dict(cfg), "cpu", torch.float32)
    return gf, packed, full


def _check_logits(packed, full):
    # the int4 kernels split activations into two int8 halves (~16-bit precision): agreement to ~1e-4 of the logits
    tokens = torch.tensor([[1, 5, 9, 33, 2, 60, 17, 4]])
    with torch.inference_mode():
        torch.testing.assert_close(packed(tokens), full(tokens), rtol=1e-3, atol=1e-3)
        for step in (tokens[:, :1], tokens[:, :3]):  # decode-sized inputs go through the packed kernels
            torch.testing.assert_close(packed(step), full(step), rtol=1e-3, atol=1e-3)


def _check_export(gf, packed, tmp_path, float16=False):
    out = tmp_path / "export.gguf"
    export_gguf(packed, gf.path, out, float16=float16)
    back = GGUFFile(out)
    for name, t in gf.tensors.items():
        assert back.tensors[name].tensor_type == t.tensor_type, name
        assert np.array_equal(np.asarray(back.tensors[name].data).view(np.uint8),
                              np.asarray(t.data).view(np.uint8)), name


@pytest.mark.parametrize("type_name", ["Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0",
                                       "Q4_1", "F16", "BF16"])
def test_each_type_loads_packed_as_stored(tmp_path, type_name):
    path = tmp_path / f"{type_name}.gguf"
    write_model(path, {"default": type_name})
    gf, packed, full = _load_both(path)
    expected = LAYER_CLASS.get(type_name, GGMLLinear)
    layers = [m for n, m in packed.named_modules() if n.endswith("_proj") or n == "lm_head"]
    assert layers and all(type(m) is expected for m in layers)
    # the file's bytes in memory, nothing more (Q4_0's minimum is implied by its scale)
    file_bytes = sum(t.n_bytes for n, t in gf.tensors.items() if t.tensor_type.name == type_name)
    held = sum(m.stored_bytes() for m in layers) + packed.embed.table.stored_bytes()
    if cpu_kernels() is not None or type_name != "Q4_0":  # without kernels Q4_0 also keeps its minimum
        assert held == file_bytes
        assert held_storage_bytes(*layers, packed.embed.table) == file_bytes  # no hidden storage behind them
    assert not any(p.numel() > DIM for p in packed.parameters())  # no fp32 copy of a matrix
    _check_logits(packed, full)
    _check_export(gf, packed, tmp_path)


def test_fused_projections_of_mixed_types_load_part_by_part(tmp_path):
    """As llama-quantize writes Q4_K_M: q/k Q4_K with a Q6_K v, gate Q5_K beside an F16 up (kept in 16 bits)."""
    path = tmp_path / "mixed.gguf"
    write_model(path, {"default": "Q4_K", "attn_v": "Q6_K", "ffn_gate": "Q5_K", "ffn_up": "F16",
                       "ffn_down": "Q3_K", "token_embd": "Q8_0", "output": "Q6_K"})
    gf, packed, full = _load_both(path)
    qkv, gate_up = packed.layers[0].attn.qkv_proj, packed.layers[0].mlp.gate_up_proj
    assert isinstance(qkv, PartsLinear) and [p.config.ggml_type for p in qkv.parts] == ["Q4_K", "Q4_K", "Q6_K"]
    assert isinstance(gate_up, PartsLinear) and isinstance(gate_up.parts[1], Float16Linear)
    assert isinstance(packed.embed.table, Int8Linear) and packed.lm_head.config.ggml_type == "Q6_K"
    _check_logits(packed, full)
    _check_export(gf, packed, tmp_path)  # the F16 part's values, exactly, in 16 bits again


@pytest.mark.parametrize("default", ["Q4_0", "Q4_K"])
def test_llama_cpp_arithmetic_on_request(tmp_path, default):
    """int8_activations: every layer rounds its inputs as llama.cpp does for its type (int8 per 32 for Q4_0 / Q8_0,
    Q8_K per 256 for the K-quants; integer kernels); the bytes held do not change."""
    path = tmp_path / f"{default}.gguf"
    write_model(path, {"default": default, "token_embd": "Q8_0", "output": "Q8_0"})
    gf = GGUFFile(path)
    cfg = gf.config()
    state, recipe = gf.packed_state_dict(cfg, compact_int4=True, int8_activations=True)
    packed = build_model(cfg, state.items(), "cpu", torch.float32, recipe.to_dict())
    full = build_model(cfg, gf.state_dict(cfg), "cpu", torch.float32)
    assert packed.layers[0].attn.qkv_proj.config.act_int8_blocks and packed.lm_head.config.act_int8_blocks
    tokens = torch.tensor([[1, 5, 9, 33, 2, 60, 17, 4]])
    with torch.inference_mode():
        got, ref = packed(tokens), full(tokens)
    assert (got - ref).abs().max() <= 5e-2 * ref.abs().max()  # one int8 rounding of every activation
    _check_export(gf, packed, tmp_path)
