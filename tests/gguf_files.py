"""Small llama-shaped GGUF files with chosen tensor types, written for tests (a plain module, imported by name
like tiny_models)."""

import gguf
import numpy as np
import torch
from gguf.quants import quantize

from ligero.quant import ggml

DIM, FFN, HEADS, KV_HEADS, VOCAB, LAYERS = 256, 512, 4, 2, 64, 2
LINEARS = {"attn_q": (DIM, DIM), "attn_k": (DIM // 2, DIM), "attn_v": (DIM // 2, DIM), "attn_output": (DIM, DIM),
           "ffn_gate": (FFN, DIM), "ffn_up": (FFN, DIM), "ffn_down": (DIM, FFN)}


def _encode(w: np.ndarray, type_name: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType | None]:
    if type_name in ("F32", "F16"):
        return w.astype(np.float32 if type_name == "F32" else np.float16), None
    qtype = gguf.GGMLQuantizationType[type_name]
    if type_name in ggml.GGML_BLOCKS:
        return ggml.quantize_rows(torch.from_numpy(w), type_name).numpy(), qtype
    return quantize(w, qtype), qtype


def write_model(path, types: dict[str, str], experts: int = 0, experts_used: int = 2) -> None:
    """A 2-layer llama (dim 256, GQA 4/2) whose tensors have the given types (key: GGUF leaf name, or 'default').
    With `experts`, a Mixtral-style MoE: each layer's FFN is a router (ffn_gate_inp, F32 as llama.cpp keeps it)
    and 3-D expert tensors ffn_{gate,up,down}_exps [experts, rows, in] choosing `experts_used` per token."""
    w = gguf.GGUFWriter(str(path), "llama")
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(experts_used)
    w.add_block_count(LAYERS)
    w.add_context_length(64)
    w.add_embedding_length(DIM)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_token_list([f"t{i}" for i in range(VOCAB)])
    g = np.random.default_rng(0)
    tensors = {"token_embd.weight": (VOCAB, DIM), "output.weight": (VOCAB, DIM), "output_norm.weight": (DIM,)}
    for i in range(LAYERS):
        tensors |= {f"blk.{i}.attn_norm.weight": (DIM,), f"blk.{i}.ffn_norm.weight": (DIM,)}
        tensors |= {f"blk.{i}.{leaf}.weight": shape for leaf, shape in LINEARS.items()}
        if experts:
            for leaf in ("ffn_gate", "ffn_up", "ffn_down"):
                tensors[f"blk.{i}.{leaf}_exps.weight"] = (experts, *tensors.pop(f"blk.{i}.{leaf}.weight"))
            tensors[f"blk.{i}.ffn_gate_inp.weight"] = (experts, DIM)
    for name, shape in tensors.items():
        if len(shape) == 1:
            w.add_tensor(name, (1 + 0.1 * g.standard_normal(shape)).astype(np.float32))
            continue
        leaf = name.split(".")[-2]
        values = (g.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
        type_name = "F32" if leaf == "ffn_gate_inp" else types.get(leaf, types["default"])
        data, raw = _encode(values.reshape(-1, shape[-1]), type_name)
        w.add_tensor(name, data.reshape(*shape[:-1], -1), raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
