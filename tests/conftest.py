"""Shared fixtures: tiny random Hugging Face models (saved as real folders) and the real built-in models."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

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
    else:
        raise ValueError(arch)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random norms too, so (1 + w) vs w mistakes show
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


@pytest.fixture(scope="session", params=["llama", "mistral", "gemma3"])
def tiny_pair(request, tmp_path_factory):
    """(transformers reference, Ligero model loaded from the saved folder, folder)."""
    from ligero.io.checkpoint import load_model

    ref = tiny_hf_model(request.param)
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    ref.save_pretrained(folder)
    ours = load_model(str(folder), device="cpu").model
    return ref, ours, folder


@pytest.fixture(scope="session")
def smollm2():
    from ligero.io.checkpoint import load_model

    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def hf_smollm2():
    return _hf_gguf("smollm2-135m")


def _hf_gguf(model_id: str):
    from transformers import AutoModelForCausalLM

    from ligero.io.checkpoint import resolve_spec

    path = resolve_spec(model_id)
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                attn_implementation="eager").eval()


@pytest.fixture(scope="session")
def hf_gguf():
    return _hf_gguf
