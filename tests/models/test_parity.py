"""Parity with transformers: tiny random models of each family, loaded through Ligero's folder loader."""

import torch

from tiny_models import SEQ


def test_tiny_logits_match_transformers(any_tiny_pair):
    ref, ours, _ = any_tiny_pair
    tokens = torch.randint(0, ref.config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(tokens).logits
        got = ours(tokens)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_tiny_config_translation(any_tiny_pair):
    ref, ours, _ = any_tiny_pair
    cfg = ours.cfg
    assert cfg.n_kv_heads == ref.config.num_key_value_heads
    if cfg.arch == "gemma3":
        assert cfg.layer_types == ["local"] * 5 + ["global"]
        assert cfg.head_dim * cfg.n_heads != cfg.dim  # projections wider than the hidden size
    if cfg.arch in ("mistral", "mixtral"):
        assert cfg.sliding_window == 8 < SEQ
    if cfg.arch == "mixtral":
        assert (cfg.n_experts, cfg.n_experts_per_token, cfg.moe_renormalize) == (4, 2, True)
    if cfg.arch == "qwen3_moe":
        assert (cfg.n_experts, cfg.n_experts_per_token, cfg.moe_renormalize) == (8, 3, False)
        assert cfg.qk_norm and cfg.moe_ffn_dim == 32 and cfg.dense_layers == [1]
        assert type(ours.layers[1].mlp).__name__ == "GatedMLP" and type(ours.layers[0].mlp).__name__ == "MoEMLP"
    assert cfg.n_params() == sum(p.numel() for p in ref.parameters())


def test_sharded_folder_loads_the_same(any_tiny_pair, tmp_path):
    from ligero.io.checkpoint import load_model

    ref, ours, _ = any_tiny_pair
    ref.save_pretrained(tmp_path, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    sharded = load_model(str(tmp_path), device="cpu").model
    tokens = torch.arange(12)[None] % ref.config.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(sharded(tokens), ours(tokens), atol=0, rtol=0)
