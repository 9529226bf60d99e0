"""Architectures as data: presets build the published parameter counts; configs round-trip."""

import pytest
import torch

from ligero.errors import LigeroError
from ligero.models.config import PRESETS, ModelConfig, config_from_hf
from ligero.models.transformer import Transformer


@pytest.mark.parametrize("name,params", [("smollm2-135m", 134.5e6), ("tinyllama-1.1b", 1.10e9),
                                         ("mistral-7b", 7.24e9), ("gemma3-270m", 268.1e6)])
def test_presets_have_published_sizes(name, params):
    cfg = PRESETS[name]()
    with torch.device("meta"):
        model = Transformer(cfg)
    model.tie_weights()
    counted = sum(p.numel() for p in model.parameters())  # tied head counted once
    assert counted == cfg.n_params()
    assert counted == pytest.approx(params, rel=0.01)


def test_config_round_trips_and_rejects_nonsense():
    cfg = PRESETS["gemma3-270m"]()
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(LigeroError, match="not supported"):
        config_from_hf({"model_type": "gpt2", "hidden_size": 8, "num_attention_heads": 2, "vocab_size": 10,
                        "num_hidden_layers": 1, "intermediate_size": 8})
    with pytest.raises(LigeroError, match="multiple"):
        ModelConfig(arch="llama", vocab_size=8, dim=8, n_layers=1, n_heads=3, n_kv_heads=2, head_dim=4, ffn_dim=8)
