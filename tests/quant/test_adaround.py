"""AdaRound: learned rounding lowers a layer's reconstruction error below round-to-nearest."""

import torch

from ligero.quant.adaround import adaround_layer, rectified_sigmoid
from ligero.quant.config import AdaRoundConfig, IntGroupConfig
from ligero.quant.modules import IntGroupLinear


def test_rectified_sigmoid_init_matches_fraction():
    frac = torch.rand(100)
    p = ((frac + 0.1) / 1.2).clamp(1e-4, 1 - 1e-4)
    torch.testing.assert_close(rectified_sigmoid(torch.log(p / (1 - p))), frac, atol=2e-4, rtol=0)


def test_adaround_beats_round_to_nearest_on_a_layer():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g) * 0.1
    x = torch.randn(512, 128, generator=g)
    x[:, :8] *= 5  # uneven input channels make rounding choices matter
    for bits in (4, 3):
        cfg = AdaRoundConfig(bits=bits, group_size=128, iters=300, batch_tokens=256)
        rtn = IntGroupLinear.from_float(w, IntGroupConfig(128, bits=bits))
        ada = adaround_layer(w, x, x, cfg)
        err = lambda layer: float((x @ layer.dequantize().T - x @ w.T).pow(2).mean())  # noqa: E731
        assert err(ada) < 0.95 * err(rtn), (bits, err(ada), err(rtn))  # ~10 % lower on isotropic data
        # same grid: identical scales and minimums, values on the grid
        assert torch.equal(ada.scale, rtn.scale) and torch.equal(ada.minimum, rtn.minimum)
