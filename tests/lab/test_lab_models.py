"""Tiny lab models: Ligero's own Transformer, and its ternary version trains through the straight-through
estimator."""

import torch
import torch.nn.functional as F

from ligero.lab.models import SIZES, build_model, tiny_config
from ligero.quant.ternary import BitLinear


def test_straight_through_gradients_train_a_ternary_model():
    torch.manual_seed(0)
    cfg = tiny_config(SIZES["test"], vocab_size=64, seq_len=16)
    model = build_model(cfg, seed=0, ternary=True)
    assert sum(isinstance(m, BitLinear) for m in model.modules()) == 4 * cfg.n_layers
    tokens = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(40):
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        block_grad = model.layers[0].attn.qkv_proj.weight.grad
        assert block_grad is not None and block_grad.abs().sum() > 0  # through both roundings
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
