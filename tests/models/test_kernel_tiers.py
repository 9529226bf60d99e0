"""Every instruction-set tier of the kernels computes what torch computes from the dequantized weights.

The tier the CPU picks runs in every other kernel test; here the lower tiers are built too (LIGERO_KERNELS):
portable C++ everywhere (the path for ARM and other CPUs), and AVX2 where the CPU has AVX-512. Each tier is
checked on every quantized layer kind, ragged shapes, batch 1 and 8 (a row's result must not depend on its batch),
and the integer ternary kernel must agree bit for bit across tiers."""

import pytest
import torch
import torch.nn.functional as F

import ligero.kernels as kernels
from kernel_builds import lower_tiers, wait_for_tier_build
from ligero.quant import formats, modules
from ligero.quant.config import FP4Config, FP8Config, Int8WeightConfig, IntGroupConfig, TernaryConfig
from ligero.quant.modules import FP4Linear, FP8Linear, Int8Linear, IntGroupLinear, TernaryLinear


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=lower_tiers() or [pytest.param("none", marks=pytest.mark.skip(
    reason="no C++ compiler or ninja here: no kernels to build"))])
def tier(request):
    wait_for_tier_build()  # conftest starts building the lower tiers when the session starts
    ext = kernels.load_tier(request.param)
    assert ext.isa() == request.param
    return ext


@pytest.fixture
def use(monkeypatch):
    """use(ext): the quantized layers call this compiled module."""
    return lambda ext: monkeypatch.setattr(modules, "cpu_kernels", lambda: ext)


CASES = [  # (layer, config, out, in): in covers odd block counts (int4 pairs blocks) and non-multiple-of-16 tails
    (Int8Linear, Int8WeightConfig(), 37, 577), (IntGroupLinear, IntGroupConfig(32), 29, 576),
    (IntGroupLinear, IntGroupConfig(32), 29, 608), (IntGroupLinear, IntGroupConfig(128), 21, 640),
    (IntGroupLinear, IntGroupConfig(32, bits=3), 13, 160), (FP8Linear, FP8Config("e4m3", activations=False), 19, 581),
    (FP8Linear, FP8Config("e5m2", activations=False), 19, 96), (FP4Linear, FP4Config("nvfp4"), 23, 576),
    (FP4Linear, FP4Config("mxfp4"), 23, 640),
]


@pytest.mark.parametrize("layer_type,config,out,inp", CASES, ids=lambda v: getattr(v, "kind", None))
@pytest.mark.parametrize("rows", [1, 8])
def test_tier_matches_torch_on_the_dequantized_weights(tier, use, layer_type, config, out, inp, rows):
    layer = layer_type.from_float(randn(out, inp, seed=out) * 0.05, config)
    x = randn(rows, inp, seed=rows)
    use(tier)
    with torch.inference_mode():
        got = layer(x)
        alone = torch.cat([layer(x[i : i + 1]) for i in range(rows)])
    w_hat = layer.dequantize()
    # The int4 kernels round activations to ~16 bits: bound the error by the size of the terms summed.
    assert ((got - F.linear(x, w_hat)).abs() <= 1e-4 * (x.abs() @ w_hat.abs().T) + 1e-6).all()
    assert torch.equal(got, alone)


@pytest.mark.parametrize("rows", [1, 5, 16])
def test_compact_q8_0_on_the_tier(tier, use, rows):
    """GGUF's Q8_0 with int8 activations in the x8 layout (as GGUF files load): exact integer products on every
    tier (no VNNI on AVX2: the bytes go in as two nibbles; portable: fp32 products of the rounded activations)."""
    use(tier)
    layer = Int8Linear.from_float(randn(45, 608, seed=4) * 0.05, Int8WeightConfig(group_size=32, act_int8_blocks=True))
    assert layer.compact()
    x = randn(rows, 608, seed=rows) * 3
    with torch.inference_mode():
        got = layer(x)
        alone = torch.cat([layer(x[i : i + 1]) for i in range(rows)])
    x_hat, w_hat = formats.fake_quantize_int8_blocks(x), layer.dequantize()
    assert ((got - F.linear(x_hat, w_hat)).abs() <= 1e-5 * (x_hat.abs() @ w_hat.abs().T) + 1e-6).all()
    assert torch.equal(got, alone)


def test_fp8_codes_of_every_magnitude_decode_exactly(tier, use):
    """Each finite FP8 code, subnormals included, with denormals flushed as the runtime sets it."""
    for fmt in ("e4m3", "e5m2"):
        lut = formats.fp8_lut(fmt)
        finite = torch.nonzero(torch.isfinite(lut)).flatten().to(torch.uint8)
        layer = FP8Linear(finite.numel(), 3, FP8Config(fmt, activations=False))
        layer.q = finite.repeat(3, 1).view(formats.FP8_DTYPES[fmt])
        layer.scale = torch.tensor([1.0, 2.0, 0.5])
        x = randn(1, finite.numel(), seed=3)
        use(tier)
        old = torch.is_flush_denormal_enabled() if hasattr(torch, "is_flush_denormal_enabled") else False
        torch.set_flush_denormal(True)
        try:
            with torch.inference_mode():
                got = layer(x)
        finally:
            torch.set_flush_denormal(old)
        ref = F.linear(x.double(), layer.dequantize().double()).float()
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_ternary_is_bit_identical_across_tiers(tier, use):
    layer = TernaryLinear.from_float(randn(70, 640, seed=9), TernaryConfig())
    x = randn(8, 640, seed=10)
    with torch.inference_mode():
        native = layer(x)
        layer._compute = None
        use(tier)
        assert torch.equal(layer(x), native)


def test_a_tier_can_be_chosen_for_a_whole_run(monkeypatch, tier):
    monkeypatch.setenv("LIGERO_KERNELS", tier.isa())
    kernels.cpu_kernels.cache_clear()
    try:
        assert kernels.cpu_kernels() is tier  # the same loaded module: no second build
        assert kernels.warm() == {"generic": "portable C++ kernels", "avx2": "AVX2 kernels"}[tier.isa()]
    finally:
        kernels.cpu_kernels.cache_clear()


@pytest.mark.parametrize("scheme", ["int4", "fp8", "int4-sym-a8", "int8-a8", "q8_0", "b158"])
def test_the_native_step_and_prefill_weights_on_the_tier(tier, monkeypatch, tmp_path, scheme):
    """On each tier the native decode step is bit-identical to the layer-by-layer path with that tier's kernels
    (Gemma 3: sliding-window and global layers, qk-norm, sandwich norms), and prefill's weights are the
    dequantized ones bit for bit."""
    from ligero.io.checkpoint import load_model
    from ligero.models import transformer
    from ligero.quant.api import quantize
    from ligero.quant.config import recipe_for
    from tiny_models import forced_decode_logits, tiny_hf_model

    tiny_hf_model("gemma3").save_pretrained(tmp_path)
    model = quantize(load_model(str(tmp_path), device="cpu").model, recipe_for(scheme))
    monkeypatch.setattr(modules, "cpu_kernels", lambda: tier)
    monkeypatch.setattr(transformer, "cpu_kernels", lambda: tier)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 160, (n,), generator=g).tolist() for n in (5, 12, 3)]
    forced = torch.randint(1, 160, (3, 10), generator=g)
    native = forced_decode_logits(model, prompts, forced)
    monkeypatch.setenv("LIGERO_DECODE_STEP", "layers")
    assert torch.equal(forced_decode_logits(model, prompts, forced), native)
    for layer in model.modules():
        if isinstance(layer, IntGroupLinear):
            assert torch.equal(layer.prefill_weight(), layer.dequantize())


def test_a_build_killed_mid_way_neither_blocks_nor_is_entered_by_the_next(tmp_path, capsys):
    """A process building the kernels is SIGKILLed holding the build lock, with torch's own `lock` file left
    behind: the next process waits while the builder lives, then takes over at once and removes the stale file."""
    import signal
    import subprocess
    import sys
    import threading

    from ligero.kernels import build_lock

    build = tmp_path / "cpu-generic-0123"
    build.mkdir()
    builder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from ligero.kernels import build_lock\n"
        f"with build_lock(Path({str(build)!r})):\n"
        f"    Path({str(build / 'lock')!r}).write_text('')\n"
        "    print('building', flush=True); time.sleep(600)")], stdout=subprocess.PIPE, text=True)
    try:
        assert builder.stdout.readline() == "building\n"
        entered = threading.Event()

        def next_process():
            with build_lock(build):
                entered.set()

        waiter = threading.Thread(target=next_process, daemon=True)
        waiter.start()
        assert not entered.wait(1.0)  # the builder lives: wait for it
    finally:
        builder.send_signal(signal.SIGKILL)
        builder.wait()
    assert entered.wait(30)  # the kernel dropped the dead builder's lock
    assert not (build / "lock").exists()
    err = capsys.readouterr().err
    assert "waiting for another process" in err and "did not finish" in err
