"""Ligero's CPU kernels: the GEMV kernel against torch (ragged shapes included), when the decode path calls it,
what its build cache is keyed on, and which problems fall back to torch (said once) or are errors.

Tests of the compiled kernels skip with the reason the runtime gives (`ligero.kernels.warm()`) where they
cannot run here."""

import pytest
import torch
import torch.nn.functional as F

import ligero.kernels as kernels
from ligero.errors import LigeroError
from ligero.kernels import MAX_KERNEL_ROWS, build_key, cpu_kernels, warm
from ligero.models import transformer
from ligero.models.transformer import Linear


def kernels_or_skip():
    ext = cpu_kernels()
    if ext is None:
        pytest.skip(f"the kernels do not run here: decode uses {warm()}")
    return ext


@pytest.fixture
def fresh_kernels(monkeypatch, tmp_path):
    """cpu_kernels() decided anew (with this test's patches), and decided anew again afterwards."""
    monkeypatch.setenv("LIGERO_CACHE", str(tmp_path))
    monkeypatch.delenv("LIGERO_NO_KERNELS", raising=False)
    kernels.cache_clear()
    yield
    kernels.cache_clear()


@pytest.mark.parametrize("rows,inp,out", [(1, 576, 1536), (3, 577, 7), (8, 16, 5), (1, 5, 3), (2, 2048, 640)])
def test_linear_f32_matches_torch(rows, inp, out):
    ext = kernels_or_skip()
    g = torch.Generator().manual_seed(rows * inp + out)
    x, w = torch.randn(rows, inp, generator=g), torch.randn(out, inp, generator=g)
    torch.testing.assert_close(ext.linear_f32(x, w), F.linear(x, w), atol=1e-4, rtol=1e-5)


def test_linear_module_uses_kernel_only_without_grad():
    torch.manual_seed(0)
    layer = Linear(24, 10, bias=False)
    x = torch.randn(1, 1, 24, requires_grad=True)
    y = layer(x)  # autograd path: torch's linear, gradients flow
    y.sum().backward()
    assert x.grad is not None
    with torch.inference_mode():
        torch.testing.assert_close(layer(x.detach()), F.linear(x.detach(), layer.weight), atol=1e-5, rtol=1e-5)


class RecordingKernels:
    """Stands in for the compiled module: counts the calls and answers with torch (runs on any CPU)."""

    def __init__(self):
        self.calls = 0

    def linear_f32(self, x, w):
        self.calls += 1
        return F.linear(x, w)


def test_decode_rows_go_to_the_kernel_and_prefill_to_torch(monkeypatch):
    recorder = RecordingKernels()
    monkeypatch.setattr(transformer, "cpu_kernels", lambda: recorder)
    layer = Linear(32, 16, bias=False)
    with torch.inference_mode():
        layer(torch.randn(1, MAX_KERNEL_ROWS, 32))
        assert recorder.calls == 1
        layer(torch.randn(1, MAX_KERNEL_ROWS + 1, 32))  # a prefill-sized call: torch's GEMM
        assert recorder.calls == 1


def test_the_real_kernel_runs_in_decode(monkeypatch):
    ext = kernels_or_skip()
    calls = []
    real = ext.linear_f32

    class Spy:
        def linear_f32(self, x, w):
            calls.append(x.shape[0])
            return real(x, w)

    monkeypatch.setattr(transformer, "cpu_kernels", lambda: Spy())
    layer = Linear(64, 24, bias=False)
    x = torch.randn(1, 3, 64)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight), atol=1e-4, rtol=1e-5)
    assert calls == [3]


def test_build_key_names_the_cpu_flags_and_the_compiler():
    base = build_key(frozenset({"avx512f", "avx512bw"}), "g++ (Debian 12.2.0) 12.2.0")
    assert build_key(frozenset({"avx512f", "avx512bw", "avx512_vnni"}), "g++ (Debian 12.2.0) 12.2.0") != base
    assert build_key(frozenset({"avx512f", "avx512bw"}), "g++ (Debian 13.1.0) 13.1.0") != base
    assert build_key(frozenset({"avx512bw", "avx512f"}), "g++ (Debian 12.2.0) 12.2.0") == base


def test_an_unknown_tier_is_an_error_naming_the_tiers(monkeypatch, fresh_kernels):
    monkeypatch.setenv("LIGERO_KERNELS", "avx9000")
    with pytest.raises(LigeroError, match="LIGERO_KERNELS='avx9000' is not a kernel tier; use one of auto, avx2, "):
        cpu_kernels()


def test_the_build_key_names_the_tier():
    flags, compiler = frozenset({"avx2"}), "g++ (Debian 12.2.0) 12.2.0"
    assert len({build_key(flags, compiler, tier) for tier in kernels.TIERS}) == len(kernels.TIERS)


def test_a_missing_compiler_falls_back(monkeypatch, fresh_kernels):
    monkeypatch.setenv("CXX", "/no/such/compiler")
    assert cpu_kernels() is None
    assert warm() == "torch ops (no C++ compiler found)"


def test_kernels_switched_off_fall_back_silently(monkeypatch, capsys, fresh_kernels):
    monkeypatch.setenv("LIGERO_NO_KERNELS", "1")
    assert cpu_kernels() is None
    assert warm() == "torch ops (LIGERO_NO_KERNELS=1)"
    assert "unavailable" not in capsys.readouterr().err


def test_a_kernel_that_fails_to_build_is_an_error(monkeypatch, tmp_path, fresh_kernels):
    from torch.utils.cpp_extension import is_ninja_available

    if kernels._compiler() is None or not is_ninja_available():
        pytest.skip("no C++ compiler or no ninja here: nothing to build")
    broken = tmp_path / "broken.cpp"
    broken.write_text("#error this kernel source does not compile\n")
    monkeypatch.setattr(kernels, "_SOURCE", broken)
    with pytest.raises(LigeroError, match="failed to build.*LIGERO_NO_KERNELS=1"):
        cpu_kernels()


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 128), (3, 32), (2, 64)])
def test_prefill_weight_is_the_dequantized_weight_bit_for_bit(compiled_kernels, bits, group):
    """Prefill multiplies by a weight the kernels decode; it must be exactly the torch dequantization."""
    from ligero.quant.config import Int8WeightConfig, IntGroupConfig, TernaryConfig
    from ligero.quant.modules import Int8Linear, IntGroupLinear, TernaryLinear

    w = torch.randn(300, 576, generator=torch.Generator().manual_seed(bits * group))
    layer = IntGroupLinear.from_float(w, IntGroupConfig(bits=bits, group_size=group))
    assert torch.equal(layer.prefill_weight(), layer.dequantize())
    int8 = Int8Linear.from_float(w, Int8WeightConfig())
    assert torch.equal(int8.prefill_weight(), int8.dequantize())
    ternary = TernaryLinear.from_float(w, TernaryConfig(), segments=(100, 200))
    assert torch.equal(compiled_kernels.dequant_ternary(*ternary.compute_layout()), ternary.dequantize())


@pytest.mark.parametrize("fmt,code", [("e4m3", 1), ("e5m2", 2)])
def test_native_fp8_activation_rounding_is_torchs(compiled_kernels, fmt, code):
    from ligero.quant import formats

    x = torch.randn(8, 576, generator=torch.Generator().manual_seed(code)) * 3
    x[3] = 0.0  # an all-zero row keeps scale 1
    x[2, 5], x[4, 7] = 1e-30, -5e4  # a value that rounds to zero; one far beyond the rest of its row
    assert torch.equal(compiled_kernels.fake_quant_fp8_rows(x, code), formats.fake_quantize_fp8_rows(x, fmt))


@pytest.mark.parametrize("inp", [2048, 577])
def test_int8_weight_only_rows_do_not_depend_on_the_batch(compiled_kernels, inp):
    """The int8 GEMV sums a row in sub-tiles of activation rows (one pass up to 3, passes of 2 beyond): every
    batch size gives each row the bits it gets alone, and matches torch on the dequantized weight."""
    w = torch.randn(67, inp, generator=torch.Generator().manual_seed(inp)) * 0.05
    q = torch.clamp(torch.round(w / 0.002), -127, 127).to(torch.int8)
    scale = torch.rand(67, generator=torch.Generator().manual_seed(1)) + 0.5
    x = torch.randn(11, inp, generator=torch.Generator().manual_seed(2))
    alone = torch.cat([compiled_kernels.linear_int8(x[i : i + 1], q, scale, False) for i in range(11)])
    for rows in range(2, 12):
        assert torch.equal(compiled_kernels.linear_int8(x[:rows], q, scale, False), alone[:rows]), rows
    w_hat = q.double() * scale.double()[:, None]
    # fp32 sums of ~2048 products: bound the error by the size of the terms summed, not by the (cancelling) result
    assert ((alone.double() - F.linear(x.double(), w_hat)).abs() <= 1e-6 * (x.double().abs() @ w_hat.abs().T)).all()
