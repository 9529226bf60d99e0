"""KV-cache quantization: exact at 16 bits, consistent between full forward and incremental decode."""

import pytest
import torch

from ligero.quant.api import quantize
from ligero.quant.config import KVQuantConfig, Recipe, recipe_for
from ligero.quant.kv import fake_quantize_keys, fake_quantize_values, quantized_key_mask
from models.test_cache import incremental_logits


def load(tiny_pair):
    from ligero.io.checkpoint import load_model

    return load_model(str(tiny_pair[2]), device="cpu").model


def with_kv(tiny_pair, **kw):
    return quantize(load(tiny_pair), Recipe(None, head=None, embed=None, kv=KVQuantConfig(**kw)))


def tokens(model, n=40, seed=0):
    return torch.randint(0, model.cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))


def test_keys_leave_the_residual_in_whole_groups():
    q_pos = torch.tensor([[0, 9, 10, 13, 14]])
    k_pos = torch.arange(14)[None]
    m = quantized_key_mask(q_pos, k_pos, KVQuantConfig(bits=4, group_size=4, residual=6))[0, 0]
    # Q(t) = floor(max(0, t + 1 - 6) / 4) * 4 -> 0, 4, 4, 8, 8
    assert m.sum(-1).tolist() == [0, 4, 4, 8, 8]


def test_16_bit_kv_equals_unquantized_attention(tiny_pair):
    x = tokens(load(tiny_pair))
    with torch.no_grad():
        ref = load(tiny_pair)(x)
        got = with_kv(tiny_pair, bits=16, group_size=4, residual=0)(x)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_fewer_bits_more_error(tiny_pair):
    x = tokens(load(tiny_pair))
    with torch.no_grad():
        ref = load(tiny_pair)(x)
        err = {b: float((with_kv(tiny_pair, bits=b, group_size=4, residual=4)(x) - ref).abs().mean())
               for b in (2, 4, 8)}
    assert 0 < err[8] < err[4] < err[2]


def test_incremental_decode_reads_the_same_quantized_cache(tiny_pair):
    model = with_kv(tiny_pair, bits=3, group_size=4, residual=8)
    x = tokens(model, seed=1)
    with torch.no_grad():
        full = model(x)
        inc = incremental_logits(model, x, [12] + [1] * 28)
    # Keys differ in the last float bit between chunkings; rarely that flips a code at a rounding boundary.
    torch.testing.assert_close(inc, full, atol=1e-3, rtol=0)


def test_groupwise_fake_quant_shapes_and_levels():
    k = torch.randn(1, 2, 8, 16)
    kq = fake_quantize_keys(k, torch.arange(8)[None], bits=2, group=4)
    assert kq.shape == k.shape
    # per (head, channel, group of 4 tokens): at most 4 distinct values at 2 bits
    assert all(kq[0, h, g * 4:(g + 1) * 4, c].unique().numel() <= 4
               for h in range(2) for g in range(2) for c in range(16))
    vq = fake_quantize_values(k, bits=2, group=8)
    assert all(vq[0, 0, t, g * 8:(g + 1) * 8].unique().numel() <= 4 for t in range(8) for g in range(2))


def test_combined_scheme_names():
    r = recipe_for("int4+kv3")
    assert r.weights.kind == "int4_weight" and r.kv.bits == 3
    r = recipe_for("kv2")
    assert r.weights is None and r.kv.bits == 2
    with pytest.raises(Exception, match="cannot combine"):
        recipe_for("int4+int8")


def packed_logits(model, x, chunks):
    """Decode x [B, T] through the model's own (packed) cache in chunks; return logits [B, T, V] and the cache."""
    cache = model.new_cache(x.shape[0], x.shape[1])
    out, start = [], 0
    for size in chunks:
        pos = torch.arange(start, start + size).expand(x.shape[0], size)
        out.append(model(x[:, start:start + size], pos, kv_cache=cache))
        start += size
    return torch.cat(out, dim=1), cache


@pytest.mark.parametrize("bits", [2, 3, 4, 16])
def test_packed_cache_decode_equals_the_no_cache_forward(tiny_pair, bits):
    # group 4, residual 6 and a sequence of 40: groups leave the residual many times, and with the tiny
    # sliding window of 8 the ring of packed groups wraps around several times.
    model = with_kv(tiny_pair, bits=bits, group_size=4, residual=6)
    x = tokens(model, seed=3)
    with torch.no_grad():
        full = model(x)
        inc, cache = packed_logits(model, x, [9] + [1] * 20 + [7, 4])
    assert type(cache).__name__ == "QuantizedKVCache"
    torch.testing.assert_close(inc, full, atol=1e-3, rtol=0)  # see the note above on rounding boundaries


def test_packed_cache_stores_codes_not_floats(tiny_pair):
    from ligero.models.transformer import KVCache

    model = with_kv(tiny_pair, bits=2, group_size=16, residual=0)
    x = tokens(model, n=128)
    with torch.no_grad():
        _, cache = packed_logits(model, x, [127, 1])
    fp = KVCache(model.cfg, 1, 128)
    assert cache.packed[0].k_codes.dtype == torch.uint8
    assert cache.packed[0].k_codes.shape[-1] == model.cfg.head_dim * 2 // 8  # 4 codes per byte
    if "local" in model.cfg.layer_types:
        pytest.skip("byte accounting below is for global layers (sliding-window layers keep a ring of groups)")
    # 2-bit codes + an fp16 minimum and scale per group of 16: 2 + 2 = 4 bits per element instead of 32 ...
    packed = sum(t.numel() * t.element_size() for p in cache.packed for t in p.tensors())
    assert packed == fp.nbytes() * 4 // 32
    # ... plus the newest tokens (here 16 of 128) in full precision.
    residual = cache.res_k[0].shape[2]
    assert residual == 16 and cache.nbytes() == packed + fp.nbytes() * residual // 128


def test_the_kv_format_set_by_quantization_picks_the_cache(tiny_pair):
    from ligero.models.transformer import FULL_PRECISION_KV, KVCache, KVCacheBase
    from ligero.quant.kv import KIVIFormat, QuantizedKVCache

    plain = load(tiny_pair)
    assert plain.kv_format is FULL_PRECISION_KV and type(plain.new_cache(1, 8)) is KVCache
    model = with_kv(tiny_pair, bits=4, group_size=4, residual=4)
    assert isinstance(model.kv_format, KIVIFormat) and model.kv_format.kv.bits == 4
    assert all(layer.attn.kv_format is model.kv_format for layer in model.layers)
    cache = model.new_cache(1, 8)
    assert isinstance(cache, QuantizedKVCache) and isinstance(cache, KVCacheBase)
