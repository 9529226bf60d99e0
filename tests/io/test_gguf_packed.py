"""GGUF Q8_0 / Q4_0 / Q4_1 tensors loaded as they are (packed layers, no fp32 copy), and written back by
`ligero export --format gguf`: byte-identical tensor data and metadata, on the real SmolLM2 file (Q4_1 + Q8_0) and
on Q4_0 / Q8_0 files Ligero itself exported."""

import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize

from ligero.io.checkpoint import load_model, resolve_spec
from ligero.io.gguf_file import GGUFFile, join_blocks, split_blocks
from ligero.models.transformer import Linear, stored_bytes
from ligero.quant.modules import Int8Linear, IntGroupLinear, QuantizedEmbedding


def ligero(*args):
    proc = subprocess.run([sys.executable, "-m", "ligero", *args], capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1"])
def test_blocks_split_into_layer_buffers_and_join_back_byte_for_byte(type_name):
    w = torch.randn(12, 96, generator=torch.Generator().manual_seed(0)).numpy()
    qtype = gguf.GGMLQuantizationType[type_name]
    raw = quantize(w, qtype)  # gguf-py's reference quantizer: [rows, row bytes]
    buffers = split_blocks(raw, type_name, 12)
    assert np.array_equal(join_blocks(buffers, type_name), raw)
    # and the layer holding the buffers dequantizes to exactly what the GGUF reference does
    from ligero.io.gguf_file import packed_config

    config = packed_config(type_name)
    layer = (Int8Linear if type_name == "Q8_0" else IntGroupLinear)(96, 12, config)
    for k, v in buffers.items():
        setattr(layer, k, v)
    assert torch.equal(layer.dequantize(), torch.from_numpy(dequantize(raw, qtype).reshape(12, 96)))


@pytest.fixture(scope="module")
def smollm2_packed():
    return load_model("smollm2-135m", device="cpu", keep_quantized=True)


def test_smollm2_loads_packed_with_the_files_bytes(smollm2_packed):
    model = smollm2_packed.model
    path = resolve_spec("smollm2-135m")
    assert not any(type(m) is Linear for m in model.modules())  # no full-precision copy of any matrix
    assert all(isinstance(model.layers[i].attn.qkv_proj, IntGroupLinear) for i in range(model.cfg.n_layers))
    assert isinstance(model.lm_head, Int8Linear) and model.lm_head.config.group_size == 32  # Q8_0 table
    assert isinstance(model.embed, QuantizedEmbedding) and model.embed.table is model.lm_head  # tied, held once
    held = stored_bytes(model)
    assert 0.9 * path.stat().st_size < held < 1.1 * path.stat().st_size  # what the file holds, as it is
    assert smollm2_packed.info["format"] == "gguf-packed"


def test_packed_logits_equal_the_dequantized_models(smollm2_packed):
    base = load_model("smollm2-135m", device="cpu").model  # every tensor dequantized to fp32
    ids = torch.tensor([[1, 504, 3458, 314, 260, 1345, 282, 2439]])
    with torch.inference_mode():
        packed, ref = smollm2_packed.model(ids), base(ids)
    # The same weights; the exact int4 kernels keep activations to ~16 bits (prefill: dequantize + GEMM, same values)
    assert (packed - ref).abs().max() <= 1e-3 * ref.abs().max()
    assert torch.equal(packed.argmax(-1), ref.argmax(-1))


def _tensors(path):
    f = GGUFFile(path)
    return f, {n: (t.tensor_type.name, np.asarray(t.data)) for n, t in f.tensors.items()}


def test_export_of_the_loaded_file_is_byte_identical(tmp_path):
    out = tmp_path / "smollm2-roundtrip.gguf"
    rc, stdout, err = ligero("export", "--model", "smollm2-135m", "--out", str(out))
    assert rc == 0, err
    src, before = _tensors(resolve_spec("smollm2-135m"))
    dst, after = _tensors(out)
    assert list(before) == list(after)
    for name, (type_name, data) in before.items():
        assert after[name][0] == type_name, name
        assert np.array_equal(after[name][1].view(np.uint8), data.view(np.uint8)), name
    for key in ("general.architecture", "llama.rope.freq_base", "tokenizer.chat_template", "llama.block_count"):
        assert dst.meta.get(key) == src.meta.get(key), key
    tokens = lambda f: f.reader.fields["tokenizer.ggml.tokens"].contents()  # noqa: E731
    assert tokens(dst) == tokens(src)
    assert "Q4_1" in stdout and "Q8_0" in stdout


@pytest.mark.parametrize("scheme, type_name, count", [("int4-sym", "Q4_0", 210), ("q8_0", "Q8_0", 210),
                                                     ("q4_k_m", "Q5_0", 150),  # SmolLM2's 576 inputs: Q5_0
                                                     ("f16", "F16", 211), ("bf16", "BF16", 211)])
def test_ligero_exports_a_gguf_type_and_reads_it_back_byte_for_byte(tmp_path, scheme, type_name, count):
    from ligero.eval.variants import build_variant
    from ligero.io.gguf_export import export_gguf, gguf_file_type, gguf_recipe
    from ligero.quant.config import recipe_for

    first, second = tmp_path / f"{scheme}.gguf", tmp_path / f"{scheme}-again.gguf"
    variant = build_variant("smollm2-135m", recipe=gguf_recipe(recipe_for(scheme)), device="cpu")
    export_gguf(variant.model, resolve_spec("smollm2-135m"), first)
    _, exported = _tensors(first)
    assert sum(t == type_name for t, _ in exported.values()) >= count  # every (or, for a mix, most) block linear
    # what the scheme's deployment card names: the type of the file export writes (a mix by llama.cpp's mix name)
    assert gguf_file_type(recipe_for(scheme))[0] == {"q4_k_m": "Q4_K_M"}.get(scheme, type_name)
    loaded = load_model(str(first), device="cpu", keep_quantized=True)
    assert all(type(m) is not Linear for m in loaded.model.modules())
    export_gguf(loaded.model, first, second)
    _, again = _tensors(second)
    for name, (t, data) in exported.items():
        assert again[name][0] == t and np.array_equal(again[name][1].view(np.uint8), data.view(np.uint8)), name


def test_a_scheme_without_a_gguf_type_is_a_clean_error(tmp_path):
    rc, _, err = ligero("export", "--model", "smollm2-135m", "--scheme", "int4-g128", "--out", str(tmp_path / "x.gguf"))
    assert rc == 2 and "Traceback" not in err
    assert "has no GGUF type" in err and "q8_0" in err and "group_size': 128" in err
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "x.gguf.tmp").exists()
    from ligero.io.gguf_export import gguf_file_type
    from ligero.quant.config import recipe_for

    kind, note = gguf_file_type(recipe_for("int4-g128"))
    assert kind is None and "llama.cpp cannot load it" in note
    assert gguf_file_type(recipe_for("int4"))[0] == "Q4_1"
    assert recipe_for("q4_0").weights == recipe_for("int4-sym").weights
    assert "KV cache" in gguf_file_type(recipe_for("int4+kv3"))[1]
