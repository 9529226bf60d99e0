"""LoRA: starts as the base model, trains only the adapters, merges into the same function, reloads exactly."""

import pytest
import torch

from ligero.errors import LigeroError
from ligero.models.config import ModelConfig
from ligero.models.lora import LoRALinear, add_lora, load_lora, lora_state, merge_lora
from ligero.models.transformer import Transformer


def _model(seed=0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(arch="llama", vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                      ffn_dim=48, max_seq_len=64)
    return Transformer(cfg).eval()


def test_adapters_start_as_the_identity_and_only_they_train():
    model = _model()
    tokens = torch.randint(0, 64, (2, 10))
    before = model(tokens)
    params = add_lora(model, rank=4, alpha=8)
    assert len(params) == 2 * 2 * 2  # (A, B) x (qkv, o) x 2 layers
    torch.testing.assert_close(model(tokens), before)  # B starts at zero
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=0.5)
    base_weight = model.layers[0].attn.qkv_proj.base.weight.clone()
    for _ in range(3):
        loss = model(tokens).logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(model(tokens), before)
    assert torch.equal(model.layers[0].attn.qkv_proj.base.weight, base_weight)  # the base never changes


def test_merge_and_reload_give_the_same_function():
    model = _model()
    add_lora(model, rank=4, alpha=8)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_(0, 0.1)
    tokens = torch.randint(0, 64, (2, 12))
    adapted = model(tokens)
    state = lora_state(model)
    fresh = _model()
    load_lora(fresh, state, rank=4, alpha=8)
    torch.testing.assert_close(fresh(tokens), adapted)
    assert merge_lora(model) == 4
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(model(tokens), adapted, rtol=1e-5, atol=1e-5)


def test_a_state_for_another_model_is_refused():
    model = _model()
    add_lora(model, rank=2, alpha=2)
    state = lora_state(model)
    state.pop(next(iter(state)))
    with pytest.raises(LigeroError, match="does not match"):
        load_lora(_model(), state, rank=2, alpha=2)
    with pytest.raises(LigeroError, match="no module named"):
        add_lora(_model(), targets=("nothing_here",))
