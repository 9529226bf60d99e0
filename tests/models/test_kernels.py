"""Ligero's CPU GEMV kernel against torch, including ragged shapes (tails that are not multiples of 16 or 4)."""

import pytest
import torch
import torch.nn.functional as F

from ligero.kernels import cpu_kernels


@pytest.mark.parametrize("rows,inp,out", [(1, 576, 1536), (3, 577, 7), (8, 16, 5), (1, 5, 3), (2, 2048, 640)])
def test_linear_f32_matches_torch(rows, inp, out):
    ext = cpu_kernels()
    if ext is None:
        pytest.skip("no AVX-512 or no compiler: the runtime falls back to torch")
    g = torch.Generator().manual_seed(rows * inp + out)
    x, w = torch.randn(rows, inp, generator=g), torch.randn(out, inp, generator=g)
    torch.testing.assert_close(ext.linear_f32(x, w), F.linear(x, w), atol=1e-4, rtol=1e-5)


def test_linear_module_uses_kernel_only_without_grad():
    from ligero.models.transformer import Linear

    torch.manual_seed(0)
    layer = Linear(24, 10, bias=False)
    x = torch.randn(1, 1, 24, requires_grad=True)
    y = layer(x)  # autograd path: torch's linear, gradients flow
    y.sum().backward()
    assert x.grad is not None
    with torch.inference_mode():
        torch.testing.assert_close(layer(x.detach()), F.linear(x.detach(), layer.weight), atol=1e-5, rtol=1e-5)
