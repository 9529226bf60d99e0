"""LSQ: step init and gradient scale as in the paper, training lowers the loss, the stored layer equals it."""

import math

import pytest
import torch

from ligero.quant.api import quantize
from ligero.quant.config import LSQConfig, Recipe
from ligero.quant.lsq import LSQLinear
from ligero.quant.modules import IntGroupLinear


def test_step_init_and_gradient_scale():
    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(0))
    layer = LSQLinear(w, LSQConfig(bits=4, group_size=128, learn_offset=False))
    torch.testing.assert_close(layer.step[:, 0], 2 * w.abs().mean(1) / math.sqrt(7))
    x = torch.randn(4, 128)
    layer(x).sum().backward()
    assert layer.log_step.grad is not None and layer.log_step.grad.abs().sum() > 0
    assert layer.weight.grad is not None  # straight-through to the weights


def test_lsq_plus_starts_at_round_to_nearest():
    from ligero.quant.config import IntGroupConfig

    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(2))
    layer = LSQLinear(w, LSQConfig(bits=4, group_size=64))
    rtn = IntGroupLinear.from_float(w, IntGroupConfig(group_size=64))
    with torch.no_grad():
        torch.testing.assert_close(layer.quantized_weight(), rtn.dequantize(), rtol=0, atol=1e-6)
        assert torch.equal(layer.to_inference().packed, rtn.packed)
    layer(torch.randn(4, 256)).sum().backward()
    assert layer.offset_delta.grad is not None and layer.offset_delta.grad.abs().sum() > 0


@pytest.mark.parametrize("learn_offset", [True, False])
def test_inference_layer_equals_trained_fake_quant(learn_offset):
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(1))
    for bits in (4, 3, 2):
        layer = LSQLinear(w, LSQConfig(bits=bits, group_size=128, learn_offset=learn_offset))
        with torch.no_grad():
            layer.log_step.add_(torch.log1p(0.01 * torch.arange(layer.step.numel()).view_as(layer.step)))
            inf = layer.to_inference()
            assert isinstance(inf, IntGroupLinear)
            # equal up to the fp16 storage of the step
            torch.testing.assert_close(inf.dequantize(), layer.quantized_weight(), atol=2e-3, rtol=2e-3)
            groups = inf.dequantize().view(16, 2, 128)
            assert max(g.unique().numel() for row in groups for g in row) <= 2 ** bits  # a bits-wide grid


def test_lsq_training_reduces_distillation_loss(tiny_pair):
    from ligero.io.checkpoint import load_model
    from ligero.quant.lsq import lsq_model

    model = load_model(str(tiny_pair[2]), device="cpu").model
    g = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, model.cfg.vocab_size, (24,), generator=g).tolist() for _ in range(2)]
    losses = lsq_model(model, LSQConfig(bits=2, group_size=32, steps=40, lr_step=1e-2, lr_weight=1e-3), windows)
    assert sum(losses[-5:]) < sum(losses[:5])
    assert isinstance(model.layers[0].attn.qkv_proj, IntGroupLinear)
    again = quantize(load_model(str(tiny_pair[2]), device="cpu").model,
                     Recipe(LSQConfig(bits=4, group_size=32, steps=2)), calibration=windows)
    assert isinstance(again.layers[-1].mlp.down_proj, IntGroupLinear)
