"""Mixture of experts in the runtime: routing as the config says, tokens grouped by expert (decode reads only the
chosen experts), shared experts and dense layers, GGUF expert tensors, and bad MoE input as one line and exit 2."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from gguf_files import write_model
from ligero.cli import main
from ligero.errors import LigeroError
from ligero.io.checkpoint import build_model
from ligero.io.gguf_export import export_gguf, permute_rope_rows
from ligero.io.gguf_file import GGUFFile
from ligero.models import transformer
from ligero.models.config import ModelConfig
from ligero.models.transformer import KVCache, MoEMLP, Transformer
from ligero.quant.modules import GGMLLinear, Int8Linear, IntGroupLinear
from tiny_models import SEQ, tiny_hf_model


def random_moe(seed: int = 0, **overrides) -> Transformer:
    """A small random MoE model built from a ModelConfig alone (weights scaled so routing is not uniform)."""
    cfg = ModelConfig(**{**dict(arch="llama", vocab_size=96, dim=64, n_layers=3, n_heads=4, n_kv_heads=2,
                                head_dim=16, ffn_dim=80, n_experts=6, n_experts_per_token=2, expert_ffn_dim=32),
                         **overrides})
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Transformer(cfg)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.3 if p.dim() > 1 else 0.1)
            if p.dim() == 1:
                p.data += 1
    return model.eval()


def test_routing_follows_the_config():
    x = torch.randn(50, 64, generator=torch.Generator().manual_seed(0))
    for renormalize in (True, False):
        mlp = random_moe(moe_renormalize=renormalize).layers[0].mlp
        with torch.no_grad():
            r = mlp.route(x)
        probs = r.logits.softmax(-1)
        assert r.experts.shape == (50, 2) and (r.experts[:, 0] != r.experts[:, 1]).all()
        assert torch.equal(r.experts, probs.topk(2).indices)  # the two most probable experts, best first
        chosen = probs.gather(1, r.experts)
        if renormalize:  # Mixtral: the softmax over the chosen experts' logits
            torch.testing.assert_close(r.weights, r.logits.gather(1, r.experts).softmax(-1))
        else:  # Qwen3-MoE's norm_topk_prob = false: the full softmax's probabilities
            torch.testing.assert_close(r.weights, chosen)
            assert (r.weights.sum(-1) < 1).all()


def expert_calls(model):
    """{(layer, expert): [rows of each call]} filled by forward pre-hooks."""
    calls = {}
    for i, layer in enumerate(model.layers):
        if isinstance(layer.mlp, MoEMLP):
            for e, expert in enumerate(layer.mlp.experts):
                expert.register_forward_pre_hook(
                    lambda _m, args, key=(i, e): calls.setdefault(key, []).append(args[0].shape[0]))
    return calls


def test_tokens_are_grouped_by_expert_and_decode_reads_only_the_chosen():
    model = random_moe()
    calls = expert_calls(model)
    tokens = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    cache = KVCache(model.cfg, 2, 16)
    with torch.no_grad():
        model(tokens, kv_cache=cache)
    for layer in range(3):  # prefill: every expert at most once per layer, on all its tokens (18 tokens x top-2)
        rows = [calls.get((layer, e), []) for e in range(6)]
        assert all(len(r) <= 1 for r in rows) and sum(sum(r) for r in rows) == 18 * 2
    calls.clear()
    with torch.no_grad():
        model(tokens[:1, :1], torch.tensor([[9]]), kv_cache=KVCache(model.cfg, 1, 16))
    for layer in range(3):  # one token: exactly its two experts run (the other four are never read)
        assert sorted(e for (i, e) in calls if i == layer).__len__() == 2
        assert all(calls[key] == [1] for key in calls)
    with torch.inference_mode():
        assert transformer.native_decode_plan(model, model.new_cache(1, 4)) is None  # routing runs in Python


@pytest.mark.parametrize("gate", [False, True])
def test_shared_expert_and_dense_layers_decode_incrementally(gate):
    model = random_moe(shared_expert_ffn_dim=24, shared_expert_gate=gate, dense_layers=[1])
    assert type(model.layers[1].mlp).__name__ == "GatedMLP" and model.layers[0].mlp.shared is not None
    assert model.cfg.n_params() == sum(p.numel() for p in model.parameters())
    assert model.cfg.n_active_params() < model.cfg.n_params()
    tokens = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(tokens)
        cache, steps = KVCache(model.cfg, 2, 12), []
        for start, size in ((0, 5), (5, 1), (6, 6)):
            pos = torch.arange(start, start + size).expand(2, size)
            steps.append(model(tokens[:, start:start + size], pos, kv_cache=cache))
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5 * float(full.abs().max()), rtol=0)
        for layer in model.layers:  # the shared expert is part of the output
            if isinstance(layer.mlp, MoEMLP):
                layer.mlp.shared.down_proj.weight.zero_()
        assert not torch.allclose(model(tokens), full, atol=1e-3)


def mixtral_gguf(ref, path):
    """The tiny transformers Mixtral written as a llama-architecture GGUF with 3-D expert tensors (F32), as
    llama.cpp's converter lays it out (q/k rows permuted for its interleaved RoPE) from the checkpoint's names."""
    import gguf

    folder = path.parent / "hf"
    ref.save_pretrained(folder)  # transformers holds experts fused in memory; the checkpoint has one per expert

    c = ref.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_sliding_window(c.sliding_window)
    w.add_expert_count(c.num_local_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    w.add_token_list([f"t{i}" for i in range(c.vocab_size)])
    sd = {k: v.float().numpy() for k, v in load_file(folder / "model.safetensors").items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        heads = {"q": c.num_attention_heads, "k": c.num_key_value_heads}
        for leaf, hf in (("attn_q", "q"), ("attn_k", "k"), ("attn_v", "v"), ("attn_output", "o")):
            t = torch.from_numpy(sd[f"{p}self_attn.{hf}_proj.weight"])
            w.add_tensor(f"blk.{i}.{leaf}.weight", (permute_rope_rows(t, heads[hf]) if hf in heads else t).numpy())
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[f"{p}input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[f"{p}post_attention_layernorm.weight"])
        moe = f"{p}block_sparse_moe."
        w.add_tensor(f"blk.{i}.ffn_gate_inp.weight", sd[f"{moe}gate.weight"])
        for leaf, hf in (("ffn_gate_exps", "w1"), ("ffn_up_exps", "w3"), ("ffn_down_exps", "w2")):
            w.add_tensor(f"blk.{i}.{leaf}.weight",
                         np.stack([sd[f"{moe}experts.{e}.{hf}.weight"] for e in range(c.num_local_experts)]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_a_mixtral_gguf_with_expert_tensors_matches_transformers(tmp_path):
    ref = tiny_hf_model("mixtral")
    path = tmp_path / "mixtral.gguf"
    mixtral_gguf(ref, path)
    gf = GGUFFile(path)
    cfg = gf.config()
    assert (cfg.n_experts, cfg.n_experts_per_token, cfg.sliding_window) == (4, 2, 8)
    model = build_model(cfg, gf.state_dict(cfg), "cpu", torch.float32)
    tokens = torch.randint(0, cfg.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), ref(tokens).logits, atol=1e-4, rtol=0)
    out = tmp_path / "again.gguf"  # exported back: the same 3-D expert tensors, byte for byte
    export_gguf(model, path, out)
    back = GGUFFile(out)
    assert back.tensors.keys() == gf.tensors.keys()
    for name, t in gf.tensors.items():
        assert np.array_equal(np.asarray(back.tensors[name].data), np.asarray(t.data)), name


EXPERT_LAYER = {"Q8_0": Int8Linear, "Q4_0": IntGroupLinear, "Q4_K": GGMLLinear, "Q6_K": GGMLLinear}


@pytest.mark.parametrize("type_name", list(EXPERT_LAYER))
def test_quantized_expert_tensors_load_packed(tmp_path, type_name):
    path = tmp_path / f"moe-{type_name}.gguf"
    write_model(path, {"default": "Q8_0", **{f"ffn_{p}_exps": type_name for p in ("gate", "up", "down")}},
                experts=4, experts_used=2)
    gf = GGUFFile(path)
    cfg = gf.config()
    assert (cfg.n_experts, cfg.n_experts_per_token) == (4, 2)
    state, recipe = gf.packed_state_dict(cfg)
    packed = build_model(cfg, state.items(), "cpu", torch.float32, recipe.to_dict())
    full = build_model(cfg, gf.state_dict(cfg), "cpu", torch.float32)
    mlp = packed.layers[1].mlp
    assert isinstance(mlp.router, torch.nn.Linear) and mlp.router.weight.dtype == torch.float32  # kept F32
    for expert in mlp.experts:
        assert isinstance(expert.gate_up_proj, EXPERT_LAYER[type_name])
        assert isinstance(expert.down_proj, EXPERT_LAYER[type_name])
    tokens = torch.tensor([[1, 5, 9, 33, 2, 60, 17, 4]])
    with torch.inference_mode():
        torch.testing.assert_close(packed(tokens), full(tokens), rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(packed(tokens[:, :1]), full(tokens[:, :1]), rtol=1e-3, atol=1e-3)
    out = tmp_path / "export.gguf"
    export_gguf(packed, path, out)
    back = GGUFFile(out)
    for name, t in gf.tensors.items():
        assert back.tensors[name].tensor_type == t.tensor_type, name
        assert np.array_equal(np.asarray(back.tensors[name].data).view(np.uint8),
                              np.asarray(t.data).view(np.uint8)), name


def one_error_line(rc, err, fragment):
    lines = [line for line in err.splitlines() if line.startswith("ligero: error:")]
    assert rc == 2 and "Traceback" not in err and len(lines) == 1 and fragment in lines[0], err


@pytest.fixture
def mixtral_folder(tmp_path):
    folder = tmp_path / "mixtral"
    tiny_hf_model("mixtral").save_pretrained(folder)
    return folder


def test_more_experts_per_token_than_experts_is_one_line(mixtral_folder, capsys):
    config = json.loads((mixtral_folder / "config.json").read_text())
    (mixtral_folder / "config.json").write_text(json.dumps({**config, "num_experts_per_tok": 5}))
    rc = main(["generate", "--model", str(mixtral_folder), "--device", "cpu", "hi"])
    one_error_line(rc, capsys.readouterr().err, "experts per token (5) must be between 1 and the number of experts (4)")


@pytest.mark.parametrize("damage", ["missing expert", "router shape"])
def test_damaged_expert_weights_are_one_line(mixtral_folder, capsys, damage):
    file = mixtral_folder / "model.safetensors"
    state = load_file(file)
    if damage == "missing expert":
        del state["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
        fragment = "missing ['layers.1.mlp.experts.3.down_proj.weight']"
    else:
        state["model.layers.0.block_sparse_moe.gate.weight"] = torch.zeros(3, 64)
        fragment = "layers.0.mlp.router.weight has shape (3, 64) but the config implies (4, 64)"
    save_file(state, file, metadata={"format": "pt"})
    rc = main(["generate", "--model", str(mixtral_folder), "--device", "cpu", "hi"])
    one_error_line(rc, capsys.readouterr().err, fragment)


def test_a_gguf_using_more_experts_than_it_has_is_one_line(tmp_path, capsys):
    path = tmp_path / "bad.gguf"
    write_model(path, {"default": "Q8_0"}, experts=2, experts_used=3)
    rc = main(["generate", "--model", str(path), "--device", "cpu", "hi"])
    one_error_line(rc, capsys.readouterr().err, "experts per token (3) must be between 1 and the number of experts (2)")
    with pytest.raises(LigeroError, match="set n_experts"):
        ModelConfig(arch="llama", vocab_size=8, dim=8, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=8, ffn_dim=8,
                    n_experts_per_token=2)


def test_training_adds_the_balancing_and_z_losses_and_caps_experts():
    model = random_moe().train()
    mlp = model.layers[0].mlp
    mlp.balance_coef, mlp.z_coef = 0.01, 0.001
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(4))
    with torch.enable_grad():
        out = mlp(x)
        r = mlp.route(x)
    share = torch.bincount(r.experts.flatten(), minlength=6).float() / 80  # f_i over the 40 x 2 assignments
    expected = 0.01 * 6 * (share * r.logits.softmax(-1).mean(0)).sum() \
        + 0.001 * torch.logsumexp(r.logits, -1).pow(2).mean()
    torch.testing.assert_close(mlp.aux_loss, expected)
    assert transformer.moe_aux_loss(model) is not None and mlp.aux_loss is None  # summed once, then cleared
    load, dropped = mlp.take_stats()
    assert sum(load) == 80 and dropped == 0 and mlp.take_stats() == ([0] * 6, 0)
    mlp.capacity_factor = 0.5  # at most ceil(0.5 * 80 / 6) = 7 assignments per expert
    with torch.enable_grad():
        capped = mlp(x)
    load, dropped = mlp.take_stats()
    assert dropped == sum(max(0, n - 7) for n in load) > 0
    assert not torch.allclose(capped, out)
    with torch.no_grad():  # inference is dropless whatever the training settings
        mlp.eval()
        torch.testing.assert_close(mlp(x), out)
        assert mlp.take_stats()[1] == 0
