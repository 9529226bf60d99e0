"""Read GGUF files (memory-mapped) into Ligero's parameter names: dequantized to fp32 (`state_dict`), or with
quantized tensors kept as they are (`packed_state_dict`): Q8_0 / Q4_0 / Q4_1 split into the int8 / int4 layers'
buffers, Q5_0 / Q5_1 / K-quants held byte for byte by GGML layers (quant/ggml.py).

GGUF stores dims innermost-first; the `gguf` reader already gives numpy arrays as [rows, row bytes], so
dequantized tensors come out as [out_features, in_features] like torch.nn.Linear.
llama.cpp permutes llama q/k rows for its interleaved RoPE; we undo that to get the HF half-split layout.
llama.cpp stores Gemma norm weights as (1 + w); we store w and the model adds the 1 back (norm_offset).
"""

from __future__ import annotations

import mmap
import re
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import gguf
import numpy as np
import torch
from gguf.quants import dequantize, quant_shape_to_byte_shape

from ligero.errors import LigeroError
from ligero.io.gguf_header import gguf_config, read_gguf_header
from ligero.models.config import ModelConfig
from ligero.progress import progress_bar
from ligero.quant.config import (
    GGML_TYPES,
    Float16Config,
    GGMLConfig,
    Int8WeightConfig,
    IntGroupConfig,
    PartsConfig,
    QuantConfig,
    Recipe,
)
from ligero.quant.ggml import GGML_BLOCKS, LEGACY_BLOCKS, dequantize_rows

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                   "Q6_K")

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
# llama.cpp stores each MoE layer's experts as one 3-D tensor per projection ([experts, rows, in], innermost-first
# (in, rows, experts)) beside the router (ffn_gate_inp). GGUFFile lists each expert's slice as a tensor of its own,
# named blk.N.ffn_gate_exps.E.weight, so every per-tensor path (packed, dequantized, released) reads experts as it
# reads dense projections.
_EXPERT_LEAVES = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
_EXPERT_RE = re.compile(r"^blk\.(\d+)\.(ffn_(?:gate|up|down)_exps)\.(\d+)\.weight$")
_BLOCK_NAMES["ffn_gate_inp"] = "mlp.router"


class GGUFTensor(NamedTuple):
    """One tensor of a GGUF file (the fields of gguf.ReaderTensor that Ligero uses): `data` is a view of the
    memory-mapped file, typed for F32 / F16, raw bytes [rows, row bytes] for every other type."""

    name: str
    tensor_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # innermost first
    n_bytes: int
    data_offset: int  # in the file
    data: np.ndarray


class GGUFFile:
    """An open GGUF file: metadata as plain Python values, tensors as views of the memory-mapped file.

    The header is parsed by gguf_header (standard library, no object per vocabulary entry: gguf.GGUFReader takes
    ~8 s and ~0.7 GB for Gemma 3's 262k-token vocabulary); `reader` opens gguf's reader only where its arrays are
    needed (export copies every metadata field)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        header = read_gguf_header(self.path)
        self.meta: dict[str, Any] = header.meta
        self.n_vocab = header.n_vocab
        self._reader: gguf.GGUFReader | None = None
        self._map = np.memmap(self.path, mode="r")
        self.tensors: dict[str, GGUFTensor] = {}
        for info in header.tensors:
            try:
                qtype = gguf.GGMLQuantizationType(info.type_id)
            except ValueError:
                raise LigeroError(f"tensor {info.name} has ggml type number {info.type_id}, which this gguf library "
                                  "does not know; requantize the file (e.g. with llama-quantize) to a common "
                                  f"type: {', '.join(SUPPORTED_TYPES)}") from None
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            n_elements = int(np.prod(info.dims)) if info.dims else 1
            n_bytes = n_elements // block * size
            at = header.data_start + info.offset
            if at + n_bytes > len(self._map):
                raise LigeroError(f"{self.path} is truncated or corrupt (tensor {info.name} runs past the end of "
                                  "the file); re-download or re-create the file")
            base, _, _ = info.name.rpartition(".")
            if base.rpartition(".")[2] in _EXPERT_LEAVES:  # one tensor per expert, each a view of its slice
                if len(info.dims) != 3:
                    raise LigeroError(f"expert tensor {info.name} has shape {info.dims}, not (in, rows, experts); "
                                      "re-create the file with llama.cpp's converter")
                experts = int(info.dims[2])
                per = n_bytes // experts
                for e in range(experts):
                    name = f"{base}.{e}.weight"
                    self.tensors[name] = GGUFTensor(name, qtype, info.dims[:2], per, at + e * per,
                                                    self._view(at + e * per, per, qtype, info.dims[:2]))
                continue
            self.tensors[info.name] = GGUFTensor(info.name, qtype, info.dims, n_bytes, at,
                                                 self._view(at, n_bytes, qtype, info.dims))

    def _view(self, at: int, n_bytes: int, qtype: gguf.GGMLQuantizationType, dims: tuple[int, ...]) -> np.ndarray:
        np_dims = tuple(reversed(dims))
        raw = self._map[at:at + n_bytes]
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            return raw.view(np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16).reshape(np_dims)
        return raw.reshape(quant_shape_to_byte_shape(np_dims, qtype))

    @property
    def reader(self) -> gguf.GGUFReader:
        """gguf's own reader of the file (every metadata field, arrays included), opened on first use."""
        if self._reader is None:
            self._reader = gguf.GGUFReader(str(self.path))
        return self._reader

    def config(self) -> ModelConfig:
        return gguf_config(self.meta, self.n_vocab, set(self.tensors))

    def state_dict(self, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (ligero name, fp32 tensor) for every tensor in the file, with a progress bar."""
        with progress_bar(f"dequantizing {self.path.name}", total=len(self.tensors)) as advance:
            for name, t in self.tensors.items():
                target = ligero_name(name)
                yield target, self._dequantized(name, target, t, cfg)
                advance()

    def packed_state_dict(self, cfg: ModelConfig, compact_int4: bool = False,
                          int8_activations: bool = False) -> tuple[dict[str, torch.Tensor], Recipe]:
        """(state dict, recipe) with every linear whose GGUF type Ligero holds packed (PACKED_TYPES, GGML_TYPES)
        kept as it is stored, and everything else dequantized to fp32. A fused projection (q/k/v, gate/up) whose
        parts have one type is one packed layer; parts of several types become one layer per part (PartsConfig).
        Each tensor's pages of the memory-mapped file are released once it is copied, so the peak is about the
        packed model, not the model plus the file. `compact_int4`: Q4_0 / Q4_1 layers come as their decode kernel's
        x8 layout (keys `<layer>.codes_x8` ...; build_model makes those layers compact), one layer at a time, so the
        row-major form of the whole model never exists (where the kernels are built). `int8_activations`: see
        packed_config (llama.cpp's activation rounding for each type, instead of fp32 activations)."""
        groups: dict[str, list[str]] = {}  # Ligero layer name -> its GGUF tensors (several when fused)
        state: dict[str, torch.Tensor] = {}
        position: dict[str, int] = {}  # GGUF tensor -> its rows' position in the fused layer
        for name in self.tensors:
            parent, _, leaf = ligero_name(name).removesuffix(".weight").rpartition(".")
            fused_leaf, position[name] = FUSED_PARTS.get(leaf, (leaf, 0))
            groups.setdefault(f"{parent}.{fused_leaf}" if parent else fused_leaf, []).append(name)
        tied = cfg.tie_embeddings
        recipe = Recipe(None, head=None, embed=None)
        packable = set(PACKED_TYPES) | set(GGML_TYPES) | set(HALF_TYPES)
        with progress_bar(f"reading {self.path.name}", total=len(self.tensors)) as advance:
            for layer, names in groups.items():
                names.sort(key=position.__getitem__)
                types = [self.tensors[n].tensor_type.name for n in names]
                is_linear = layer.endswith("_proj") or layer in ("lm_head", "embed")
                if not is_linear or not set(types) & packable:
                    for n in names:
                        target = ligero_name(n)
                        state[target] = self._dequantized(n, target, self.tensors[n], cfg)
                        self._release(n)
                        advance()
                    continue
                if layer == "embed":  # the table: the head's when tied (one table serves both)
                    prefix = "lm_head" if tied else "embed.table"
                else:
                    prefix = "lm_head" if layer == "lm_head" else layer
                if len(set(types)) == 1:
                    config: QuantConfig = packed_config(types[0], int8_activations)
                    parts = [self._packed(n, cfg) for n in names]
                    buffers = {k: torch.cat([p[k] for p in parts]) if len(parts) > 1 else parts[0][k] for k in parts[0]}
                    del parts
                    state.update({f"{prefix}.{k}": v for k, v in _maybe_x8(buffers, types[0], compact_int4).items()})
                else:  # parts of several types: one layer each, full precision where the type is not packable
                    configs = []
                    for i, (n, type_name) in enumerate(zip(names, types)):
                        if type_name in packable:
                            configs.append(packed_config(type_name, int8_activations).to_dict())
                            buffers = _maybe_x8(self._packed(n, cfg), type_name, compact_int4)
                            state.update({f"{prefix}.parts.{i}.{k}": v for k, v in buffers.items()})
                        else:
                            configs.append(None)
                            state[f"{prefix}.parts.{i}.weight"] = self._dequantized(n, ligero_name(n),
                                                                                    self.tensors[n], cfg)
                    config = PartsConfig(tuple(configs))
                for n in names:
                    self._release(n)
                    advance()
                if layer == "embed":
                    recipe.embed = config
                    if tied:
                        recipe.head = config
                elif layer == "lm_head":
                    recipe.head = config
                else:
                    recipe.overrides.append((layer, config))
        return state, recipe

    def _release(self, name: str) -> None:
        """Drop a tensor's pages of the mapped file from this process's memory (they stay in the page cache):
        its values have been copied. A no-op where the mapping is not reachable."""
        t = self.tensors[name]
        mapped = getattr(self._map, "_mmap", None)
        if mapped is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = t.data_offset - t.data_offset % mmap.PAGESIZE
        try:
            mapped.madvise(mmap.MADV_DONTNEED, start, t.data_offset + t.n_bytes - start)
        except (OSError, ValueError):
            pass

    def _packed(self, name: str, cfg: ModelConfig) -> dict[str, torch.Tensor]:
        t = self.tensors[name]
        rows = int(t.shape[-1]) if len(t.shape) > 1 else 1  # GGUF dims are innermost-first
        type_name = t.tensor_type.name
        if type_name in GGML_TYPES:  # held as stored: the rows' bytes
            buffers = {"blocks": torch.from_numpy(np.array(t.data, dtype=np.uint8).reshape(rows, -1))}
        elif type_name in HALF_TYPES:  # the 16-bit values as stored
            bits = torch.from_numpy(np.asarray(t.data).view(np.int16).reshape(rows, -1).copy())
            buffers = {"weight16": bits.view(torch.float16 if type_name == "F16" else torch.bfloat16)}
        else:
            buffers = split_blocks(t.data, type_name, rows)
        target = ligero_name(name)
        if cfg.arch in ("llama", "mistral") and target.endswith(("attn.q_proj.weight", "attn.k_proj.weight")):
            heads = cfg.n_heads if "q_proj" in target else cfg.n_kv_heads
            order = unpermute_rope_rows(torch.arange(rows)[:, None], heads)[:, 0]  # a permutation of whole rows
            buffers = {k: v[order].contiguous() for k, v in buffers.items()}
        return buffers

    @staticmethod
    def _dequantized(name: str, target: str, t: GGUFTensor, cfg: ModelConfig) -> torch.Tensor:
        if t.tensor_type.name not in SUPPORTED_TYPES:
            raise LigeroError(
                f"tensor {name} has type {t.tensor_type.name}, which Ligero cannot read; supported types: "
                f"{', '.join(SUPPORTED_TYPES)} (requantize the file, e.g. with llama-quantize)"
            )
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF dims are innermost-first
        kind = t.tensor_type.name
        if kind in GGML_BLOCKS or kind in LEGACY_BLOCKS:  # torch: gguf's numpy code, bit for bit, ~10x faster
            raw = torch.from_numpy(np.array(t.data, dtype=np.uint8)).reshape(shape[0], -1)
            w = dequantize_rows(raw, kind).reshape(shape)
        elif kind == "F32":
            w = torch.from_numpy(np.array(t.data, dtype=np.float32)).reshape(shape)
        elif kind in ("F16", "BF16"):
            raw = torch.from_numpy(np.asarray(t.data).view(np.uint16).copy()).view(
                torch.float16 if kind == "F16" else torch.bfloat16)
            w = raw.float().reshape(shape)
        else:
            values = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
            w = torch.from_numpy(values.copy())
        if cfg.arch in ("llama", "mistral") and target.endswith(("attn.q_proj.weight", "attn.k_proj.weight")):
            heads = cfg.n_heads if "q_proj" in target else cfg.n_kv_heads
            w = unpermute_rope_rows(w, heads)
        if cfg.norm_offset and target.endswith("norm.weight"):
            w = w - cfg.norm_offset
        return w


# Projections Ligero fuses: checkpoint leaf -> (fused leaf, its position among the fused rows)
FUSED_PARTS = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
               "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

# GGUF types that load into a packed layer as they are: the byte layout is repacked (blocks split into codes and
# scales), not the values. Q4_0's minimum is stored explicitly as -8 x scale (exact in fp16).
PACKED_TYPES = ("Q8_0", "Q4_0", "Q4_1")
HALF_TYPES = ("F16", "BF16")  # 16-bit matrices: held in 16 bits (Float16Linear), computed in fp32
_BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}


def _maybe_x8(buffers: dict[str, torch.Tensor], type_name: str, compact: bool) -> dict[str, torch.Tensor]:
    """A Q4_0 / Q4_1 layer's row-major buffers as the int4 decode kernel's x8 layout (where asked and the kernels
    are built); Q4_0's minimum is implied by its scale (-8 x scale), so it is left out."""
    from ligero.kernels import cpu_kernels
    from ligero.quant.modules import X8_NAMES

    ext = cpu_kernels() if compact and type_name in ("Q4_0", "Q4_1") else None
    if ext is None:
        return buffers
    # A new empty tensor, not an empty slice: a slice would keep the whole minimum's storage alive.
    minimum = buffers["minimum"].new_empty((0, 0)) if type_name == "Q4_0" else buffers["minimum"]
    return dict(zip(X8_NAMES, ext.pack_int4_x8(buffers["packed"], buffers["scale"], minimum)))


def packed_config(type_name: str, int8_activations: bool = False) -> QuantConfig:
    """The Ligero config that holds a GGUF type exactly; `int8_activations`: the layer rounds its inputs as
    llama.cpp's CPU backend does for the type (int8 per 32 inputs for Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1, its Q8_0 /
    Q8_1; Q8_K, int8 per 256, for the K-quants)."""
    if type_name in GGML_TYPES:
        return GGMLConfig(type_name, act_int8_blocks=int8_activations)
    if type_name in HALF_TYPES:
        return Float16Config("f16" if type_name == "F16" else "bf16", act16=int8_activations)
    if type_name == "Q8_0":
        return Int8WeightConfig(group_size=32, act_int8_blocks=int8_activations)
    return IntGroupConfig(32, symmetric=type_name == "Q4_0", act_int8_blocks=int8_activations)


def split_blocks(data: np.ndarray, type_name: str, rows: int) -> dict[str, torch.Tensor]:
    """A GGUF tensor's raw blocks ([rows, row bytes] uint8) -> the packed layer's buffers, without rounding:
    Q8_0 -> q [rows, in] int8 + scale [rows, in/32] fp16; Q4_0 / Q4_1 -> packed [rows, in/2] (the same nibble
    order) + scale + minimum [rows, in/32] fp16."""
    blocks = np.ascontiguousarray(data).reshape(rows, -1, _BLOCK_BYTES[type_name])
    d = torch.from_numpy(blocks[..., :2].copy().view(np.float16)[..., 0])
    if type_name == "Q8_0":
        return {"q": torch.from_numpy(blocks[..., 2:].copy().view(np.int8).reshape(rows, -1)), "scale": d}
    if type_name == "Q4_0":
        minimum = d * -8  # a power of two: exact unless it overflows fp16
        if not torch.isfinite(minimum).all():
            raise LigeroError("a Q4_0 block scale is too large to hold its minimum in fp16; load the file with "
                              "keep_quantized=False (dequantized)")
        return {"packed": torch.from_numpy(blocks[..., 2:].copy().reshape(rows, -1)), "scale": d, "minimum": minimum}
    m = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0])
    return {"packed": torch.from_numpy(blocks[..., 4:].copy().reshape(rows, -1)), "scale": d, "minimum": m}


def join_blocks(buffers: dict[str, torch.Tensor], type_name: str) -> np.ndarray:
    """The inverse of split_blocks: a packed layer's buffers -> the GGUF tensor's raw blocks [rows, row bytes]."""
    rows = buffers["scale"].shape[0]
    d = buffers["scale"].contiguous().numpy().view(np.uint8).reshape(rows, -1, 2)
    if type_name == "Q8_0":
        parts = [d, buffers["q"].contiguous().numpy().view(np.uint8).reshape(rows, d.shape[1], 32)]
    else:
        parts = [d] + ([buffers["minimum"].contiguous().numpy().view(np.uint8).reshape(rows, -1, 2)]
                       if type_name == "Q4_1" else []) + [buffers["packed"].contiguous().numpy().reshape(rows, -1, 16)]
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


def expert_slice(gguf_name: str) -> tuple[str, int] | None:
    """(the file's 3-D tensor name without .weight, expert) of one expert's slice (GGUFFile's naming), else None."""
    m = _EXPERT_RE.match(gguf_name)
    return (f"blk.{m.group(1)}.{m.group(2)}", int(m.group(3))) if m else None


def ligero_name(gguf_name: str) -> str:
    base = gguf_name.removesuffix(".weight")
    if base in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[base] + ".weight"
    m = _EXPERT_RE.match(gguf_name)
    if m:
        return f"layers.{m.group(1)}.mlp.experts.{m.group(3)}.{_EXPERT_LEAVES[m.group(2)]}.weight"
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.weight"
    raise LigeroError(f"GGUF tensor '{gguf_name}' is not part of a supported architecture; "
                      "Ligero reads llama (incl. Mistral) and gemma3 GGUF files")


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's permute: per head, interleaved (x0, y0, x1, y1...) rows -> halves (x..., y...)."""
    out, rest = w.shape[0], w.shape[1:]
    return w.reshape(n_heads, out // n_heads // 2, 2, *rest).transpose(1, 2).reshape(out, *rest)
