"""NF4 (QLoRA's 4-bit NormalFloat): the level table, SQNR against int4 on Gaussian weights, the LUT kernel against
the dequantized weight, and a quantized model that saves and loads exactly."""

import pytest
import torch
from scipy.stats import norm

from ligero.errors import LigeroError
from ligero.io.checkpoint import load_model, save_checkpoint
from ligero.quant import formats
from ligero.quant.api import quantize
from ligero.quant.config import IntGroupConfig, NF4Config, recipe_for
from ligero.quant.modules import IntGroupLinear, NF4Linear


def sqnr_db(w: torch.Tensor, approx: torch.Tensor) -> float:
    return float(10 * torch.log10(w.pow(2).sum() / (w - approx).pow(2).sum()))


def test_the_levels_are_normal_quantiles_with_an_exact_zero():
    v = formats.NF4_VALUES
    assert len(v) == 16 and torch.all(v[1:] > v[:-1]) and v[0] == -1 and v[-1] == 1 and v[7] == 0
    # QLoRA's construction: 8 positive levels at quantiles of N(0, 1) over (0.5, 1 - delta], 7 negative over
    # [delta, 0.5), each half divided by its largest, delta = (1/2)(1/30 + 1/32)
    delta = 0.5 * (1 / 30 + 1 / 32)
    pos = norm.ppf(torch.linspace(0.5, 1 - delta, 9).numpy())[1:]
    neg = -norm.ppf(torch.linspace(0.5, 1 - delta, 8).numpy())[1:]
    want = sorted([*(-neg / neg.min()), 0.0, *(pos / pos.max())])
    assert torch.allclose(v, torch.tensor(want, dtype=torch.float32), atol=1e-6)


def test_nf4_beats_int4_on_gaussian_weights_at_the_same_group():
    torch.manual_seed(0)
    w = torch.randn(512, 2304) * 0.02
    nf4 = NF4Linear.from_float(w, NF4Config(64))
    int4 = IntGroupLinear.from_float(w, IntGroupConfig(64, symmetric=True))  # absmax scaling, as NF4's
    assert sqnr_db(w, nf4.dequantize()) > sqnr_db(w, int4.dequantize()) + 0.1
    assert sqnr_db(w, nf4.dequantize()) > 20.0
    bits = nf4.stored_bytes() * 8 / w.numel()
    assert bits == pytest.approx(4 + 8 / 64, abs=1e-3)  # codes + an E4M3 scale per 64; one fp32 per tensor


def test_the_kernel_and_the_rows_agree_with_the_dequantized_weight():
    torch.manual_seed(1)
    w = torch.randn(96, 128)
    layer = NF4Linear.from_float(w, NF4Config(64), segments=(64, 32))  # a fused projection: a scale per part
    assert layer.tensor_scale.shape == (2,)
    full = layer.dequantize()
    torch.testing.assert_close(layer.dequantize(torch.tensor([5, 70])), full[[5, 70]])
    x = torch.randn(3, 128)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), x @ full.t(), atol=1e-4, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(layer(torch.randn(40, 128)).shape, torch.Size([40, 96]))


def test_group_sizes_are_checked():
    assert recipe_for("nf4").weights == NF4Config(64) and recipe_for("nf4", 128).weights == NF4Config(128)
    with pytest.raises(LigeroError, match="multiple of 32"):
        NF4Config(48)


def test_an_nf4_model_saves_and_loads_to_the_same_logits(tiny_pair, tmp_path):
    _, _, folder = tiny_pair
    loaded = load_model(str(folder), device="cpu")
    quantize(loaded.model, recipe_for("nf4", 32))  # the tiny models' widths are multiples of 32, not 64
    assert isinstance(loaded.model.layers[0].mlp.down_proj, NF4Linear)
    save_checkpoint(loaded.model, None, tmp_path, {"base": "tiny"})
    again = load_model(str(tmp_path), device="cpu").model
    tokens = torch.arange(20)[None] % loaded.model.cfg.vocab_size
    with torch.inference_mode():
        torch.testing.assert_close(again(tokens), loaded.model(tokens), atol=0, rtol=0)
        torch.testing.assert_close(again(tokens[:, :1]), loaded.model(tokens[:, :1]), atol=0, rtol=0)
