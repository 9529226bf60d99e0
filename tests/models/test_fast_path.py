"""Decode's three paths on whole models: every scheme, all three architectures, batch 1 and a left-padded batch of
8, teacher-forced so the paths read the same tokens, then 32 greedy tokens.

- The native decode step (every layer in one native call) is bit-identical to the layer-by-layer modules with the
  same kernels (LIGERO_DECODE_STEP=layers): it mirrors their arithmetic op for op.
- Those kernels (quantized GEMVs, decode attention, RMSNorm) against torch ops only: equal within each scheme's
  tolerance; greedy tokens identical for weight-only arithmetic (other schemes: greedy choices identical wherever
  the margin exceeds the paths' difference). Prefill (> 8 rows) is torch on every path."""

import pytest
import torch

from ligero.errors import LigeroError
from ligero.io.checkpoint import load_model
from ligero.kernels import MAX_KERNEL_ROWS
from ligero.models import transformer
from ligero.models.generate import SamplingConfig, generate_tokens
from ligero.models.transformer import rms_norm_llamacpp
from ligero.quant import modules
from ligero.quant.api import quantize
from ligero.quant.config import recipe_for
from tiny_models import forced_decode_logits

# Largest logit difference allowed, relative to the largest logit. Weight-only float arithmetic: summation order
# only (measured <= 6e-7). The exact int4/int3 kernels keep activations to ~16 bits (measured <= 2e-4 on these
# random models). Schemes that round activations (FP8, or int8 per token or per block) round a few values the other way
# when the inputs differ in the last bit, one quantization step each (measured <= 1.3e-2): for them the greedy
# choices are checked where the logits' margin exceeds that difference.
WEIGHT_ONLY, SIXTEEN_BIT, ROUNDED_ACTIVATIONS = 1e-5, 1e-3, 5e-2
SCHEMES = {"fp32": WEIGHT_ONLY, "int8": WEIGHT_ONLY, "q8_0": WEIGHT_ONLY, "nvfp4": WEIGHT_ONLY, "mxfp4": WEIGHT_ONLY,
           "fp8": ROUNDED_ACTIVATIONS, "int4": SIXTEEN_BIT, "int3": SIXTEEN_BIT, "int4+kv4": SIXTEEN_BIT,
           "int4-sym-a8": ROUNDED_ACTIVATIONS, "int8-a8": ROUNDED_ACTIVATIONS,
           "int4-a8": ROUNDED_ACTIVATIONS, "b158": ROUNDED_ACTIVATIONS, "w8a8-naive": ROUNDED_ACTIVATIONS,
           # tiny widths: Q5_0 / Q8_0 fallbacks, GGML layers called back from the native step
           "q4_k_m": WEIGHT_ONLY, "f16": WEIGHT_ONLY, "bf16": WEIGHT_ONLY}


def torch_only(monkeypatch):
    monkeypatch.setattr(modules, "cpu_kernels", lambda: None)
    monkeypatch.setattr(transformer, "cpu_kernels", lambda: None)


def layer_by_layer(monkeypatch):
    monkeypatch.setenv("LIGERO_DECODE_STEP", "layers")


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_native_decode_matches_the_torch_path(scheme, tiny_pair, monkeypatch, compiled_kernels):
    _, _, folder = tiny_pair
    model = load_model(str(folder), device="cpu").model
    if scheme != "fp32":
        quantize(model, recipe_for(scheme))
    g = torch.Generator().manual_seed(7)
    vocab = model.cfg.vocab_size
    batches = {1: [torch.randint(1, vocab, (13,), generator=g).tolist()],
               8: [torch.randint(1, vocab, (n,), generator=g).tolist() for n in (3, 17, 11, 9, 14, 12, 10, 16)]}
    with torch.inference_mode():
        plan = transformer.native_decode_plan(model, model.new_cache(8, 4))
    assert (plan is None) == scheme.endswith("+kv4"), "only the packed KV cache decodes layer by layer"
    for b, prompts in batches.items():
        forced = torch.randint(1, vocab, (b, 12), generator=g)
        fast = forced_decode_logits(model, prompts, forced)
        with monkeypatch.context() as m:
            layer_by_layer(m)
            assert torch.equal(forced_decode_logits(model, prompts, forced), fast), "native step != layer by layer"
        with monkeypatch.context() as m:
            torch_only(m)
            reference = forced_decode_logits(model, prompts, forced)
        tol = SCHEMES[scheme] * reference.abs().max()
        assert (fast - reference).abs().max() <= tol, (b, float((fast - reference).abs().max() / reference.abs().max()))
        # Greedy choices agree wherever the reference's top-2 margin exceeds what the two paths may differ by.
        top2 = reference.topk(2, dim=-1).values
        decided = (top2[..., 0] - top2[..., 1]) > 2 * (fast - reference).abs().amax(-1)
        assert torch.equal(fast.argmax(-1)[decided], reference.argmax(-1)[decided])
    with torch.inference_mode():
        greedy = generate_tokens(model, batches[8], 32, SamplingConfig(), eos_ids=[], pad_id=0)[0]
        with monkeypatch.context() as m:
            layer_by_layer(m)
            assert generate_tokens(model, batches[8], 32, SamplingConfig(), eos_ids=[], pad_id=0)[0] == greedy
        if SCHEMES[scheme] != WEIGHT_ONLY:
            # free-running greedy text forks at the first near-tie the paths' difference decides (random models;
            # seen for int4's 16-bit activations on AVX-512 VNNI, whose block sums add in another order): the
            # teacher-forced check above compares greedy choices wherever the margin decides them
            return
        with monkeypatch.context() as m:
            torch_only(m)
            assert generate_tokens(model, batches[8], 32, SamplingConfig(), eos_ids=[], pad_id=0)[0] == greedy


@pytest.mark.parametrize("head_dim", [32, 64, 80, 128])  # the register-summed values run 64 dimensions at a time
@pytest.mark.parametrize("scale", [0.17, 40.0])  # 40: most weights underflow exp's range (exactly 0, as SDPA's)
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])  # fp16: serving's cache (--kv-cache f16)
# query heads per KV head: 64-dim heads go through AVX-512 in passes of up to 3 heads (4 = a pass of 3, then 1)
@pytest.mark.parametrize("heads", [(8, 2), (9, 3), (4, 2)], ids=["group4", "group3", "group2"])
def test_decode_attention_kernel_equals_sdpa(compiled_kernels, head_dim, scale, cache_dtype, heads):
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, heads[0], 2, head_dim, generator=g)
    cache_k = torch.randn(3, heads[1], 50, head_dim, generator=g).to(cache_dtype)
    cache_v = torch.randn(3, heads[1], 50, head_dim, generator=g).to(cache_dtype)
    k, v = cache_k[:, :, :37], cache_v[:, :, :37]  # views of a static cache, as decode reads them
    mask = torch.rand(3, 1, 2, 37, generator=g) > 0.3
    mask[..., 0] = True
    mask[1, ..., :9] = False  # a span that starts later (a sliding window) ...
    mask[1, ..., 9] = True
    mask[2, ..., 21:] = False  # ... or ends early (a continuous batch's row in a longer cache)
    q[0, 3, 1, 0] = float("nan")  # a broken activation stays visible (NaN out), as in SDPA (other heads: not)
    got = compiled_kernels.attend_decode(q, k, v, mask, scale)
    # the reference attends over the same (rounded) keys widened to fp32: the kernel widens them as it reads
    ref = F.scaled_dot_product_attention(q, k.float(), v.float(), attn_mask=mask, scale=scale, enable_gqa=True)
    assert got[0, 3, 1].isnan().all() and ref[0, 3, 1].isnan().all()
    if scale < 1:
        torch.testing.assert_close(got, ref, equal_nan=True, rtol=1e-5, atol=1e-6)
        return
    # At scale 40 the scores are ~200, where one ulp (~1.5e-5) of a score moves its weight by as much: the order in
    # which a dot product is summed decides such ulps, so no fp32 order is "the" answer. Against the float64 result
    # the kernel may be off by what one ulp of the largest score does to an output: eps * |score| * |v|.
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, scale=scale,
                                           enable_gqa=True)
    finite = ~exact.isnan()
    assert torch.equal(finite, ~got.isnan())
    scores = scale * q.double() @ k.double().repeat_interleave(q.shape[1] // k.shape[1], 1).transpose(-1, -2)
    one_ulp = torch.finfo(torch.float32).eps * scores.nan_to_num().abs().max() * v.double().abs().max()
    assert (got.double() - exact)[finite].abs().max() <= one_ulp
    assert (ref.double() - exact)[finite].abs().max() <= one_ulp  # torch's fp32 SDPA meets the same bound


@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama", "gemma"])
def test_native_rms_norm_equals_torch(compiled_kernels, offset):
    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(2, 3, 7, 32, generator=g) * 5
    x = qkv[:, :, :4]  # a non-contiguous view, as qk-norm reads the heads
    w = torch.randn(32, generator=g)
    ref = torch.nn.functional.rms_norm(x, (32,), None, 1e-6) * (offset + w)
    torch.testing.assert_close(compiled_kernels.rms_norm(x, w, 1e-6, offset), ref, rtol=1e-5, atol=1e-6)
    # and bit for bit the torch path's llama.cpp arithmetic, which decode and prefill share
    assert torch.equal(compiled_kernels.rms_norm(x, w, 1e-6, offset), rms_norm_llamacpp(x, w, 1e-6, offset))


def test_rms_norm_is_ggml_arithmetic_bit_for_bit():
    """ggml's CPU rms_norm (then the weight): fp32 squares summed in double, the mean rounded to fp32, 1 / sqrtf
    with IEEE (correctly rounded) sqrt, x * scale * w; numpy's float32 sqrt is the IEEE one, torch's is not."""
    import numpy as np

    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 576, generator=g) * torch.rand(64, 1, generator=g) * 10
    w = torch.randn(576, generator=g)
    xn, wn = x.numpy(), w.numpy()
    sums = np.array([sum(float(v) for v in (row * row).astype(np.float32)) for row in xn])  # sequential, double
    mean = (sums / 576).astype(np.float32)[:, None]
    scale = np.float32(1.0) / np.sqrt(mean + np.float32(1e-5))
    expected = torch.from_numpy(((xn * scale).astype(np.float32) * wn).astype(np.float32))
    assert torch.equal(rms_norm_llamacpp(x, w, 1e-5), expected)


def test_native_step_steps_aside(tiny_pair, monkeypatch, compiled_kernels):
    """Forward hooks (they must see every module's call), autograd and LIGERO_DECODE_STEP=layers run the
    reference; an unknown LIGERO_DECODE_STEP is an error naming the choices."""
    _, _, folder = tiny_pair
    model = load_model(str(folder), device="cpu").model
    with torch.inference_mode():
        assert transformer.native_decode_plan(model, model.new_cache(1, 4)) is not None
        assert transformer.native_decode_plan(model, model.new_cache(MAX_KERNEL_ROWS + 1, 4)) is None  # too many rows
        handle = model.layers[0].mlp.register_forward_hook(lambda *a: None)
        assert transformer.native_decode_plan(model, model.new_cache(1, 4)) is None
        handle.remove()
        monkeypatch.setenv("LIGERO_DECODE_STEP", "layers")
        assert transformer.native_decode_plan(model, model.new_cache(1, 4)) is None
        monkeypatch.setenv("LIGERO_DECODE_STEP", "fused")
        with pytest.raises(LigeroError, match="LIGERO_DECODE_STEP='fused' is not a decode mode; use one of native"):
            transformer.native_decode_plan(model, model.new_cache(1, 4))
    assert transformer.native_decode_plan(model, model.new_cache(1, 4)) is None  # autograd on
