"""Tiny random Hugging Face models for parity and loader tests. A plain module, not a conftest: test files import
it by name, and `conftest` names more than one module in this tree (tests/serve has its own)."""

from __future__ import annotations

import torch

from ligero.models.generate import left_pad

SEQ = 40  # longer than the tiny sliding windows below


def tiny_hf_model(arch: str):
    """A small random transformers model of the given family (eager attention: the reference). Its weights are
    the same on every run, whatever tests ran before (transformers initialises from the global RNG)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return _tiny_hf_model(arch)


def _tiny_hf_model(arch: str):
    import transformers as tf

    common = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                  max_position_embeddings=128, attn_implementation="eager")
    if arch == "llama":
        cfg = tf.LlamaConfig(num_hidden_layers=2, num_key_value_heads=2, rope_theta=10000.0,
                             tie_word_embeddings=False, **common)
        model = tf.LlamaForCausalLM(cfg)
    elif arch == "mistral":
        cfg = tf.MistralConfig(num_hidden_layers=2, num_key_value_heads=1, sliding_window=8, rope_theta=10000.0,
                               tie_word_embeddings=False, **common)
        model = tf.MistralForCausalLM(cfg)
    elif arch == "gemma3":
        cfg = tf.Gemma3TextConfig(num_hidden_layers=6, num_key_value_heads=1, head_dim=32, sliding_window=8,
                                  query_pre_attn_scalar=24, tie_word_embeddings=True,
                                  rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                                   "sliding_attention": {"rope_type": "default",
                                                                         "rope_theta": 1e4}},
                                  **common)
        model = tf.Gemma3ForCausalLM(cfg)
    elif arch == "mixtral":  # 4 experts, top-2, sliding window
        cfg = tf.MixtralConfig(num_hidden_layers=2, num_key_value_heads=2, sliding_window=8, num_local_experts=4,
                               num_experts_per_tok=2, tie_word_embeddings=False, **common)
        model = tf.MixtralForCausalLM(cfg)
    elif arch == "qwen3_moe":  # 8 small experts, top-3 not renormalised, QK-norm, a dense middle layer
        cfg = tf.Qwen3MoeConfig(num_hidden_layers=3, num_key_value_heads=2, head_dim=24, num_experts=8,
                                num_experts_per_tok=3, moe_intermediate_size=32, norm_topk_prob=False,
                                mlp_only_layers=[1], tie_word_embeddings=False, **common)
        model = tf.Qwen3MoeForCausalLM(cfg)
    else:
        raise ValueError(arch)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random norms too, so (1 + w) vs w mistakes show
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


@torch.inference_mode()
def forced_decode_logits(model, prompts, forced: torch.Tensor) -> torch.Tensor:
    """Logits of each decode step [B, steps, V] after a left-padded prompt, feeding `forced` [B, steps]."""
    tokens, positions = left_pad(prompts, pad_id=0)
    cache = model.new_cache(len(prompts), tokens.shape[1] + forced.shape[1] + 1)
    model(tokens, positions, kv_cache=cache, last_only=True)
    pos = positions[:, -1:] + 1
    out = []
    for t in range(forced.shape[1]):
        out.append(model(forced[:, t : t + 1], pos, kv_cache=cache))
        pos = pos + 1
    return torch.cat(out, 1)


def held_storage_bytes(*modules: torch.nn.Module) -> int:
    """Bytes of the distinct storages behind every buffer and parameter of `modules` (non-saved ones included):
    what the modules keep alive, which a tensor's numel() does not show (an empty slice holds its whole base)."""
    seen = {}
    for module in modules:
        for t in [*module.buffers(), *module.parameters()]:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())
