"""Read GGUF files (memory-mapped) into Ligero's parameter names, dequantized to fp32.

GGUF stores dims innermost-first; the `gguf` reader already gives numpy arrays as [rows, row bytes], so
dequantized tensors come out as [out_features, in_features] like torch.nn.Linear.
llama.cpp permutes llama q/k rows for its interleaved RoPE; we undo that to get the HF half-split layout.
llama.cpp stores Gemma norm weights as (1 + w); we store w and the model adds the 1 back (norm_offset).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

import gguf
import numpy as np
import torch
from gguf.quants import dequantize

from ligero.errors import LigeroError
from ligero.io.gguf_header import check_magic, gguf_config
from ligero.models.config import ModelConfig
from ligero.progress import progress_bar

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")

_GLOBAL_NAMES = {"token_embd": "embed", "output_norm": "norm", "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_norm": "attn_norm",
    "attn_q": "attn.q_proj",
    "attn_k": "attn.k_proj",
    "attn_v": "attn.v_proj",
    "attn_output": "attn.o_proj",
    "attn_q_norm": "attn.q_norm",
    "attn_k_norm": "attn.k_norm",
    "post_attention_norm": "attn_post_norm",
    "ffn_norm": "mlp_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_ffw_norm": "mlp_post_norm",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")


class GGUFFile:
    """An open GGUF file: metadata as plain Python values, tensors on demand."""

    def __init__(self, path: Path):
        self.path = Path(path)
        check_magic(self.path)
        try:
            self.reader = gguf.GGUFReader(str(self.path))
        except Exception as exc:  # truncated files surface as ValueError/IndexError/OSError from numpy
            raise LigeroError(
                f"{self.path} is truncated or corrupt ({type(exc).__name__}: {str(exc)[:100]}); "
                "re-download or re-create the file"
            ) from None
        self.meta: dict[str, Any] = {}
        for key, fld in self.reader.fields.items():
            if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.scores",
                       "tokenizer.ggml.token_type"):
                continue
            try:
                self.meta[key] = fld.contents()
            except Exception:
                continue
        tokens = self.reader.fields.get("tokenizer.ggml.tokens")
        self.n_vocab = len(tokens.data) if tokens is not None else 0
        self.tensors = {t.name: t for t in self.reader.tensors}

    def config(self) -> ModelConfig:
        return gguf_config(self.meta, self.n_vocab, set(self.tensors))

    def state_dict(self, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (ligero name, fp32 tensor) for every tensor in the file, with a progress bar."""
        with progress_bar(f"dequantizing {self.path.name}", total=len(self.tensors)) as advance:
            for name, t in self.tensors.items():
                target = ligero_name(name)
                yield target, self._dequantized(name, target, t, cfg)
                advance()

    @staticmethod
    def _dequantized(name: str, target: str, t: gguf.ReaderTensor, cfg: ModelConfig) -> torch.Tensor:
        if t.tensor_type.name not in SUPPORTED_TYPES:
            raise LigeroError(
                f"tensor {name} has type {t.tensor_type.name}, which Ligero cannot read; supported types: "
                f"{', '.join(SUPPORTED_TYPES)} (requantize the file, e.g. with llama-quantize)"
            )
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF dims are innermost-first
        values = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        w = torch.from_numpy(values.copy())
        if cfg.arch in ("llama", "mistral") and target.endswith(("attn.q_proj.weight", "attn.k_proj.weight")):
            heads = cfg.n_heads if "q_proj" in target else cfg.n_kv_heads
            w = unpermute_rope_rows(w, heads)
        if cfg.norm_offset and target.endswith("norm.weight"):
            w = w - cfg.norm_offset
        return w


def ligero_name(gguf_name: str) -> str:
    base = gguf_name.removesuffix(".weight")
    if base in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[base] + ".weight"
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.weight"
    raise LigeroError(f"GGUF tensor '{gguf_name}' is not part of a supported architecture; "
                      "Ligero reads llama (incl. Mistral) and gemma3 GGUF files")


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's permute: per head, interleaved (x0, y0, x1, y1...) rows -> halves (x..., y...)."""
    out, rest = w.shape[0], w.shape[1:]
    return w.reshape(n_heads, out // n_heads // 2, 2, *rest).transpose(1, 2).reshape(out, *rest)
