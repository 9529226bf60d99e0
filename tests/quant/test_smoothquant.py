"""W8A8 and SmoothQuant: smoothing is exact before rounding and helps when activations have outlier channels."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from ligero.errors import LigeroError
from ligero.quant.api import quantize
from ligero.quant.calibrate import input_absmax
from ligero.quant.config import Recipe, W8A8Config
from ligero.quant.modules import W8A8Linear


def outlier_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 128, generator=g)
    x[:, :4] *= 60.0  # a few channels with large activations, as in LLMs
    w = torch.randn(96, 128, generator=g) * 0.05
    return x, w


def test_smoothing_preserves_the_product_before_rounding():
    x, w = outlier_batch()
    layer = W8A8Linear.from_float(w, W8A8Config(0.5), act_max=x.abs().amax(0))
    smooth = layer.smooth
    assert not torch.allclose(smooth, torch.ones_like(smooth))
    torch.testing.assert_close((x / smooth) @ (w * smooth).T, x @ w.T, rtol=1e-4, atol=1e-4)


def test_smoothquant_beats_naive_w8a8_on_outlier_activations():
    x, w = outlier_batch()
    ref = F.linear(x, w)
    naive = W8A8Linear.from_float(w, W8A8Config(None))
    smooth = W8A8Linear.from_float(w, W8A8Config(0.5), act_max=x.abs().amax(0))
    err = lambda layer: float((layer(x) - ref).pow(2).mean())  # noqa: E731
    assert err(smooth) < 0.5 * err(naive)


def test_calibration_is_required_and_collected(tiny_pair):
    from ligero.io.checkpoint import load_model

    _, _, folder = tiny_pair
    model = load_model(str(folder), device="cpu").model
    with pytest.raises(LigeroError, match="needs calibration data"):
        quantize(model, Recipe(W8A8Config(0.5), name="w8a8"))
    windows = [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]]
    stats = input_absmax(model, windows)
    assert set(stats) >= {"layers.0.attn.qkv_proj", "layers.0.mlp.down_proj", "lm_head"}
    assert stats["layers.0.attn.qkv_proj"].shape == (model.cfg.dim,)
    quantize(model, Recipe(W8A8Config(0.5)), calibration=windows)
    assert isinstance(model.layers[0].attn.qkv_proj, W8A8Linear)


def test_cli_without_calibration_data_is_a_clear_error():
    proc = subprocess.run([sys.executable, "-m", "ligero", "eval", "quality", "--scheme", "w8a8",
                           "--calib-windows", "0"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "needs calibration data" in proc.stderr and "Traceback" not in proc.stderr
