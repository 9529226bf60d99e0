"""Read Hugging Face model folders: config.json + safetensors (single file or sharded with an index)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from ligero.errors import LigeroError
from ligero.models.config import ModelConfig, config_from_hf
from ligero.progress import progress_bar

_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
# Mixture-of-experts names (Mixtral's block_sparse_moe.experts.E.w1/w3/w2; Qwen-MoE's mlp.gate as the router and
# mlp.shared_expert*) -> Ligero's mlp.router / mlp.experts.E.{gate,up,down}_proj / mlp.shared / mlp.shared_gate
_MOE_RES = [
    (re.compile(r"^block_sparse_moe\.experts\.(\d+)\.w1\."), r"mlp.experts.\1.gate_proj."),
    (re.compile(r"^block_sparse_moe\.experts\.(\d+)\.w3\."), r"mlp.experts.\1.up_proj."),
    (re.compile(r"^block_sparse_moe\.experts\.(\d+)\.w2\."), r"mlp.experts.\1.down_proj."),
    (re.compile(r"^(block_sparse_moe|mlp)\.gate\.weight$"), "mlp.router.weight"),
    (re.compile(r"^mlp\.shared_expert\."), "mlp.shared."),
    (re.compile(r"^mlp\.shared_expert_gate\."), "mlp.shared_gate."),
]


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object (config.json, tokenizer_config.json, a shard index)."""
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise LigeroError(f"{path} is not UTF-8 text; replace it with the model's original file") from None
    except json.JSONDecodeError as exc:
        raise LigeroError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); fix or replace it") from None
    if not isinstance(data, dict):
        raise LigeroError(f"{path} holds a JSON {type(data).__name__}, not an object; replace it with the "
                          "model's original file")
    return data


def read_hf_config(folder: Path) -> dict:
    return read_json_object(Path(folder) / "config.json")


def hf_config(folder: Path) -> ModelConfig:
    return config_from_hf(read_hf_config(folder))


def weight_files(folder: Path) -> list[Path]:
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(s, str) for s in weight_map.values()):
            raise LigeroError(f"{index} has no weight_map of tensor names to shard files; re-create the folder")
        shards = sorted(set(weight_map.values()))
        files = [folder / s for s in shards]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise LigeroError(f"{folder} has no .safetensors weights; save the model with safe_serialization=True")
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise LigeroError(f"{folder} is missing weight shards {missing}; copy the complete model folder")
    return files


def hf_to_ligero_name(name: str, cfg: ModelConfig) -> str | None:
    """Map one HF parameter name to Ligero's; None for tensors we do not keep (rotary caches)."""
    for prefix in ("model.language_model.", "language_model.model.", "model."):
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    if name.endswith("rotary_emb.inv_freq"):
        return None
    if name == "embed_tokens.weight":
        return "embed.weight"
    if name in ("norm.weight", "lm_head.weight"):
        return name
    m = _LAYER_RE.match(name)
    if not m:
        raise LigeroError(f"unexpected tensor '{name}' in the checkpoint; is this a llama, mistral, gemma3, mixtral "
                          "or qwen3_moe model?")
    i, rest = m.groups()
    rest = rest.replace("self_attn.", "attn.")
    for pattern, replacement in _MOE_RES:
        rest = pattern.sub(replacement, rest)
    norm_names = {
        "input_layernorm.weight": "attn_norm.weight",
        # Llama's "post_attention_layernorm" is the pre-FFN norm; Gemma 3's is a true post-attention norm.
        "post_attention_layernorm.weight": "attn_post_norm.weight" if cfg.post_norms else "mlp_norm.weight",
        "pre_feedforward_layernorm.weight": "mlp_norm.weight",
        "post_feedforward_layernorm.weight": "mlp_post_norm.weight",
    }
    return f"layers.{i}.{norm_names.get(rest, rest)}"


def _unreadable(file: Path, exc: Exception) -> LigeroError:
    return LigeroError(f"{file} is not a readable safetensors file ({str(exc)[:100]}); re-create it")


def _shard_keys(file: Path) -> list[str]:
    try:
        with safe_open(str(file), framework="pt") as f:
            return list(f.keys())
    except Exception as exc:  # safetensors has its own error types for a bad header
        raise _unreadable(file, exc) from None


def hf_state_dict(folder: Path, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (ligero name, tensor) for every kept tensor of the folder's shards, with a progress bar."""
    shards = [(file, _shard_keys(file)) for file in weight_files(folder)]
    with progress_bar(f"loading {Path(folder).name}", total=sum(len(keys) for _, keys in shards)) as advance:
        for file, keys in shards:
            try:
                with safe_open(str(file), framework="pt") as f:
                    for key in keys:
                        name = hf_to_ligero_name(key, cfg)
                        if name is not None:
                            yield name, f.get_tensor(key)
                        advance()
            except LigeroError:
                raise
            except Exception as exc:  # truncated data surfaces from safetensors as its own error types
                raise _unreadable(file, exc) from None
