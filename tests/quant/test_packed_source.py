"""Quantizing a GGUF from its tensors as stored (a packed source): one layer dequantized at a time, the result bit
for bit what quantizing the fp32 load gives, each source layer released as soon as it is replaced."""

import gc
import weakref

import pytest
import torch
from torch import nn

from gguf_files import write_model
from ligero.errors import LigeroError
from ligero.io.checkpoint import build_model, load_model
from ligero.io.gguf_file import GGUFFile
from ligero.models.transformer import Linear
from ligero.quant.api import compact_layers, quantize, unpack
from ligero.quant.config import recipe_for
from ligero.quant.modules import GGMLLinear, Int8Linear, QuantizedEmbedding, QuantizedLinear

TOKENS = torch.tensor([[1, 5, 9, 33, 2, 60, 17, 4, 11, 40]])


def _same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert [k for k in sa if not torch.equal(sa[k], sb[k])] == []


@pytest.fixture(scope="module")
def mixed_gguf(tmp_path_factory):
    """Untied: Q4_0 embedding, Q6_K head, Q4_K / Q8_0 / Q4_1 linears (q, k, v of two types: a parts layer)."""
    path = tmp_path_factory.mktemp("gguf") / "mixed.gguf"
    write_model(path, {"default": "Q4_K", "token_embd": "Q4_0", "output": "Q6_K", "attn_v": "Q8_0",
                       "ffn_down": "Q4_1"})
    return path


def _load(path, packed: bool) -> nn.Module:
    """The file as load_model reads it (these files have no tokenizer): packed as stored, or dequantized to fp32."""
    gf = GGUFFile(path)
    cfg = gf.config()
    if not packed:
        return build_model(cfg, gf.state_dict(cfg), "cpu", torch.float32)
    state, recipe = gf.packed_state_dict(cfg, compact_int4=True)
    model = build_model(cfg, state.items(), "cpu", torch.float32, recipe.to_dict())
    compact_layers(model)
    model.packed_source = True
    return model


@pytest.mark.parametrize("scheme", ["int8", "w8a8"])
def test_smollm2_quantized_from_its_packed_tensors_is_bit_identical(scheme):
    # w8a8 calibrates: its statistics come from the packed model's forward passes (exact fp32 on prefill)
    windows = [list(range(1, 60))]
    full = load_model("smollm2-135m", "cpu")
    quantize(full.model, recipe_for(scheme), calibration=windows)
    packed = load_model("smollm2-135m", "cpu", keep_quantized=True)
    assert packed.model.packed_source
    quantize(packed.model, recipe_for(scheme), calibration=windows)
    assert not packed.model.packed_source  # quantized now: not a source any more
    _same_state(full.model, packed.model)
    assert isinstance(packed.model.embed, QuantizedEmbedding) and packed.model.embed.table is packed.model.lm_head


@pytest.mark.parametrize("scheme", ["q4_k_m", "int4"])
def test_mixed_types_untied_bit_identical(mixed_gguf, scheme):
    full, packed = _load(mixed_gguf, False), _load(mixed_gguf, True)
    quantize(full, recipe_for(scheme))
    quantize(packed, recipe_for(scheme))
    _same_state(full, packed)


def test_layers_the_recipe_keeps_in_full_precision_become_fp32(mixed_gguf):
    recipe = recipe_for("int8")
    recipe.head, recipe.embed = None, None  # the head and the table stay fp32
    full = _load(mixed_gguf, False)
    quantize(full, recipe)
    m = _load(mixed_gguf, True)
    assert isinstance(m.lm_head, GGMLLinear) and isinstance(m.embed, QuantizedEmbedding)
    quantize(m, recipe)
    _same_state(full, m)
    assert type(m.lm_head) is Linear and type(m.embed) is nn.Embedding  # the file's Q6_K / Q4_0 are gone
    assert all(isinstance(b.attn.qkv_proj, Int8Linear) for b in m.layers)
    with torch.inference_mode():
        torch.testing.assert_close(m(TOKENS), full(TOKENS), rtol=0, atol=0)


def test_unpack_gives_the_full_precision_load(mixed_gguf):
    full = _load(mixed_gguf, False)
    packed = unpack(_load(mixed_gguf, True))
    assert not any(isinstance(x, (QuantizedLinear, QuantizedEmbedding)) for x in packed.modules())
    assert packed.quant_recipe is None
    _same_state(full, packed)
    tied = unpack(load_model("smollm2-135m", "cpu", keep_quantized=True).model)
    assert tied.lm_head.weight is tied.embed.weight
    _same_state(load_model("smollm2-135m", "cpu").model, tied)


def test_each_source_layer_is_released_once_replaced(mixed_gguf):
    packed = _load(mixed_gguf, True)
    seen: dict[str, weakref.ref] = {}
    released = []

    def check(name, module):  # called for each layer as the walk reaches it (and by the shape checks before)
        gc.collect()
        for other, ref in seen.items():
            if packed.get_submodule(other) is not ref():  # replaced already: the source layer must be gone
                assert ref() is None, f"{other} still held while {name} is quantized"
                released.append(other)
        seen.setdefault(name, weakref.ref(module))
        return True

    quantize(packed, recipe_for("int8"), filter=check)
    assert len(set(released)) >= 8  # 8 block linears + head + table: the ones checked after their replacement


def test_a_model_loaded_with_llama_cpp_arithmetic_is_not_a_source():
    shipped = load_model("smollm2-135m", "cpu", keep_quantized=True, int8_activations=True)
    with pytest.raises(LigeroError, match="already quantized"):
        quantize(shipped.model, recipe_for("int8"))


@pytest.mark.parametrize("scheme", ["int8", "q8_0", "int4", "int3", "fp8", "q6_k", "f16"])
def test_large_layers_built_a_block_of_rows_at_a_time_are_the_same(scheme, monkeypatch):
    """Layers over BUILD_BLOCK_WEIGHTS are quantized a block of rows at a time: the same buffers as at once."""
    from ligero.quant import api
    from ligero.quant.config import scheme_spec

    config = recipe_for(scheme).weights
    if scheme == "q6_k":
        from ligero.quant.config import GGMLConfig

        config = GGMLConfig("Q6_K")
    layer_type = scheme_spec(config).layer
    assert layer_type.row_separable
    source = Linear(512, 300, bias=False)
    whole = layer_type.from_float(source.weight.detach(), config)
    monkeypatch.setattr(api, "BUILD_BLOCK_WEIGHTS", 512 * 7)  # blocks of 7 rows, the last one shorter
    monkeypatch.setattr(api, "BUILD_BY_ROWS_ABOVE", 0)
    blocked = api._build_rows(layer_type, source, config, 0, 300)
    for name, buffer in whole.named_buffers():
        assert torch.equal(blocked.get_buffer(name), buffer), name


def test_fused_projections_with_parts_of_their_own_formats_are_built_part_by_part(monkeypatch):
    """llama.cpp's mixes give q, k and v (gate and up) types of their own: such a layer is built one part, and
    within a part one block of rows, at a time, from an fp32 source or from a packed one whose parts differ from
    the new ones (a row block then straddles two source parts): the same buffers as built from the whole weight."""
    from ligero.quant import api
    from ligero.quant.config import GGMLConfig, PartsConfig
    from ligero.quant.modules import PartsLinear

    torch.manual_seed(0)
    source = Linear(512, 384, bias=False)  # q 256 rows, k 64, v 64
    weight = source.weight.detach().clone()
    config = PartsConfig((GGMLConfig("Q4_K").to_dict(), GGMLConfig("Q6_K").to_dict(), None))
    monkeypatch.setattr(api, "BUILD_BLOCK_WEIGHTS", 512 * 24)
    monkeypatch.setattr(api, "BUILD_BY_ROWS_ABOVE", 512 * 100)  # q by blocks of rows, k and v at once
    packed_source = PartsLinear.from_float(weight, PartsConfig((recipe_for("int8").weights.to_dict(), None)),
                                           [200, 184])
    for src in (source, packed_source):
        reference = api.source_weight(src)
        whole = PartsLinear.from_float(reference, config, [256, 64, 64])
        built = api._build_parts(src, config, [256, 64, 64])
        assert [type(p) for p in built.parts] == [type(p) for p in whole.parts]
        for (name, buffer), (_, mine) in zip(whole.named_buffers(), built.named_buffers(), strict=True):
            assert torch.equal(mine, buffer), name
        assert torch.equal(built.parts[2].weight, whole.parts[2].weight)
        assert torch.equal(api._source_rows(src, 190, 210), reference[190:210])
