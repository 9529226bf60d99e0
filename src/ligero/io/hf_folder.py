"""Read Hugging Face model folders: config.json + safetensors (single file or sharded with an index)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

import torch

from ligero.errors import LigeroError
from ligero.models.config import ModelConfig, config_from_hf

_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")


def read_hf_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise LigeroError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); fix or replace it") from None


def hf_config(folder: Path) -> ModelConfig:
    return config_from_hf(read_hf_config(folder))


def weight_files(folder: Path) -> list[Path]:
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
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
        raise LigeroError(f"unexpected tensor '{name}' in the checkpoint; is this a llama/mistral/gemma3 model?")
    i, rest = m.groups()
    rest = rest.replace("self_attn.", "attn.")
    norm_names = {
        "input_layernorm.weight": "attn_norm.weight",
        # Llama's "post_attention_layernorm" is the pre-FFN norm; Gemma 3's is a true post-attention norm.
        "post_attention_layernorm.weight": "attn_post_norm.weight" if cfg.post_norms else "mlp_norm.weight",
        "pre_feedforward_layernorm.weight": "mlp_norm.weight",
        "post_feedforward_layernorm.weight": "mlp_post_norm.weight",
    }
    return f"layers.{i}.{norm_names.get(rest, rest)}"


def hf_state_dict(folder: Path, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for file in weight_files(folder):
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    name = hf_to_ligero_name(key, cfg)
                    if name is not None:
                        yield name, f.get_tensor(key)
        except LigeroError:
            raise
        except Exception as exc:
            raise LigeroError(f"{file} is not a readable safetensors file ({str(exc)[:100]}); re-create it") from None
