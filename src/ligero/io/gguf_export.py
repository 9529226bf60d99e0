"""Write a Ligero model as a GGUF file that llama.cpp reads.

Packed layers whose format is a GGUF type are written as they are (Int8 with fp16 scales per 32 -> Q8_0; int4
group 32 -> Q4_0 where the grid is symmetric, Q4_1 otherwise: the inverse of gguf_file.split_blocks; GGML layers'
bytes as they are, so a GGUF loaded with keep_quantized=True exports byte-identical tensors); full-precision
tensors are written as F32 (or F16 with `float16=True` for the matrices). Metadata (architecture,
hyperparameters, tokenizer, chat template) is copied from the GGUF the model was loaded from; tensors keep its
names, order and llama.cpp's conventions (q/k rows permuted for its RoPE, Gemma norms stored as 1 + w).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gguf
import numpy as np
import torch

from ligero.errors import LigeroError
from ligero.io.gguf_file import FUSED_PARTS, GGUFFile, expert_slice, join_blocks, ligero_name
from ligero.models.transformer import Transformer
from ligero.quant.config import (
    Float16Config,
    GGMLConfig,
    GGMLMixConfig,
    Int8WeightConfig,
    IntGroupConfig,
    PartsConfig,
    QuantConfig,
    Recipe,
)
from ligero.quant.modules import (
    Float16Linear,
    GGMLLinear,
    Int8Linear,
    PartsLinear,
    QuantizedEmbedding,
    QuantizedLinear,
)

_SKIP_KEYS = ("GGUF.", "general.alignment", "general.file_type")  # written by the writer itself, or stale


def check_exportable(config: QuantConfig) -> None:
    """Raise a LigeroError naming what can be exported unless layers of `config` have a GGUF type (checked
    before anything is quantized or written)."""
    if isinstance(config, Int8WeightConfig) and config.group_size == 32:
        return
    if type(config) is IntGroupConfig and config.bits == 4 and config.group_size == 32:
        return
    if isinstance(config, (GGMLConfig, GGMLMixConfig, Float16Config)):
        return
    if isinstance(config, PartsConfig):
        for part in config.configs():
            if part is not None:
                check_exportable(part)
        return
    raise LigeroError(f"{config.kind} {config.to_dict()} has no GGUF type; export fp32, f16, bf16, q8_0, int4 or "
                      "int4-sym (group 32, with or without -a8) or llama.cpp-type (q4_k, q6_k ...) variants")


def gguf_file_type(recipe: Recipe) -> tuple[str | None, str]:
    """(the llama.cpp file type a recipe's weights are, or None, and a line on what that means for a deployer).
    Names follow llama-quantize (Q8_0, Q4_0, Q4_1, Q4_K_M ...); head and embedding tables are left out, as
    llama-quantize chooses those itself."""
    w = recipe.weights
    kv = " The quantized KV cache is a runtime setting of Ligero's; a GGUF file does not hold it." if recipe.kv else ""
    if isinstance(w, GGMLMixConfig):
        return w.ftype, f"llama-quantize's {w.ftype} mix, its algorithms byte for byte; `ligero export` writes it.{kv}"
    if isinstance(w, GGMLConfig):
        return w.ggml_type, f"llama.cpp's {w.ggml_type} blocks, byte for byte; `ligero export` writes it.{kv}"
    if isinstance(w, Float16Config):
        name = "F16" if w.dtype == "f16" else "BF16"
        return name, f"{name} tensors; `ligero export` writes it.{kv}"
    if isinstance(w, Int8WeightConfig) and w.group_size == 32:
        return "Q8_0", f"GGUF's Q8_0 (an fp16 scale per 32 weights); `ligero export` writes it.{kv}"
    if type(w) is IntGroupConfig and w.bits == 4 and w.group_size == 32:
        if w.symmetric:
            return "Q4_0", f"GGUF's Q4_0, llama-quantize's rounding byte for byte; `ligero export` writes it.{kv}"
        return "Q4_1", ("GGUF's Q4_1 grid (a scale and a minimum per 32 weights), rounded against the fp16 scale and "
                        f"minimum (llama-quantize rounds against fp32 ones: rare codes differ by one); `ligero "
                        f"export` writes it.{kv}")
    if isinstance(w, Int8WeightConfig):
        return None, ("no GGUF type: int8 with one scale per row (GGUF's Q8_0 keeps one per 32 weights: the q8_0 "
                      "scheme); it runs in Ligero's runtime only." + kv)
    return None, ("no GGUF type holds this scheme: llama.cpp cannot load it; it runs in Ligero's runtime only "
                  "(audit llama.cpp's own types, e.g. q8_0, q4_0, q4_k_m, as variants beside it)." + kv)


def gguf_recipe(recipe: Recipe) -> Recipe:
    """`recipe` as it is exported: int8 head and embedding tables in GGUF's own int8 type (Q8_0, a scale per 32
    inputs, as llama.cpp stores them), every config checked (a clear error before anything is quantized)."""
    recipe = dataclasses.replace(recipe, overrides=list(recipe.overrides))
    for part in ("head", "embed"):
        config = getattr(recipe, part)
        if isinstance(config, Int8WeightConfig) and config.group_size is None:
            setattr(recipe, part, dataclasses.replace(config, group_size=32))
    for config in recipe.layer_configs():
        check_exportable(config)
    return recipe


def gguf_type_of(layer: QuantizedLinear) -> str:
    """The GGUF type that holds `layer` exactly."""
    check_exportable(layer.config)
    if isinstance(layer, GGMLLinear):
        return layer.config.ggml_type
    if isinstance(layer, Float16Linear):
        return "F16" if layer.config.dtype == "f16" else "BF16"
    if isinstance(layer, Int8Linear):
        return "Q8_0"
    if getattr(layer, "_compact", False):  # the x8 layout leaves Q4_0's implied minimum out: no rebuild needed
        return "Q4_0" if layer.kernel_layout(None)[2].numel() == 0 else "Q4_1"
    return "Q4_0" if torch.equal(layer.minimum, layer.scale * -8) else "Q4_1"


def permute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's permute (the inverse of gguf_file.unpermute_rope_rows): per head, halves -> interleaved rows."""
    out, rest = w.shape[0], w.shape[1:]
    return w.reshape(n_heads, 2, out // n_heads // 2, *rest).transpose(1, 2).reshape(out, *rest)


def _source_tensor(model: Transformer, target: str, float16: bool) -> tuple[np.ndarray, str]:
    """(data, GGUF type name) of one GGUF tensor, from the Ligero module that holds it."""
    cfg = model.cfg
    layer_name, _, _ = target.rpartition(".")  # "layers.0.attn.q_proj"
    parent, _, leaf = layer_name.rpartition(".")
    if leaf in FUSED_PARTS:
        fused_leaf, part = FUSED_PARTS[leaf]
        module = model.get_submodule(f"{parent}.{fused_leaf}")
        start = sum(module.segments[:part])
        rows = slice(start, start + module.segments[part])
        if isinstance(module, PartsLinear):  # one layer per part
            module, rows = module.parts[part], slice(None)
    elif layer_name == "embed":
        module = model.embed.table if isinstance(model.embed, QuantizedEmbedding) else model.embed
        rows = slice(None)
    else:
        module, rows = model.get_submodule(layer_name), slice(None)
    rope_heads = None
    if cfg.arch in ("llama", "mistral") and leaf in ("q_proj", "k_proj"):
        rope_heads = cfg.n_heads if leaf == "q_proj" else cfg.n_kv_heads
    if isinstance(module, QuantizedLinear):
        type_name = gguf_type_of(module)
        buffers = {k: v[rows] for k, v in module.state_dict().items()}
        if rope_heads:
            order = permute_rope_rows(torch.arange(next(iter(buffers.values())).shape[0])[:, None], rope_heads)[:, 0]
            buffers = {k: v[order] for k, v in buffers.items()}
        if isinstance(module, GGMLLinear):
            return buffers["blocks"].contiguous().numpy(), type_name
        if isinstance(module, Float16Linear):  # F16: values (written by shape); BF16: the rows' bytes
            w16 = buffers["weight16"].contiguous()
            if type_name == "F16":
                return w16.numpy(), type_name
            return w16.view(torch.int16).numpy().view(np.uint8), type_name
        return join_blocks(buffers, type_name), type_name
    w = module.weight.detach().float()[rows]
    if rope_heads:
        w = permute_rope_rows(w, rope_heads)
    if cfg.norm_offset and target.endswith("norm.weight"):
        w = w + cfg.norm_offset
    if float16 and w.dim() == 2:
        return w.half().numpy(), "F16"
    return w.numpy(), "F32"


def _expert_tensor(model: Transformer, base: str, float16: bool) -> tuple[str, np.ndarray, str]:
    """(GGUF name, data [experts, ...], type) of one MoE projection: every expert's slice, stacked."""
    parts = [_source_tensor(model, ligero_name(f"{base}.{e}.weight"), float16) for e in range(model.cfg.n_experts)]
    types = sorted({type_name for _, type_name in parts})
    if len(types) > 1:
        raise LigeroError(f"the experts of {base} have different formats ({', '.join(types)}); GGUF stores a "
                          "layer's experts as one tensor of one type: quantize every expert alike to export")
    return f"{base}.weight", np.stack([data for data, _ in parts]), types[0]


def export_gguf(model: Transformer, source: Path, out: Path, float16: bool = False) -> dict:
    """Write `model` to `out` as GGUF with the metadata and tensor names of `source` (the GGUF it came from).
    Returns {"path", "tensor_types": {type: count}}. Written to a temporary name, then renamed."""
    src = GGUFFile(Path(source))
    cfg = src.config()
    if (cfg.n_layers, cfg.dim, cfg.vocab_size) != (model.cfg.n_layers, model.cfg.dim, model.cfg.vocab_size):
        raise LigeroError(f"{source} does not describe this model (layers, width or vocabulary differ); export "
                          "from the GGUF the model was loaded from")
    for module in model.modules():  # every format checked before anything is written
        if isinstance(module, QuantizedLinear) and not isinstance(module, PartsLinear):
            gguf_type_of(module)
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    try:
        counts = _write(model, src, tmp, float16)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out)
    return {"path": str(out), "tensor_types": counts}


def _write(model: Transformer, src: GGUFFile, tmp: Path, float16: bool) -> dict[str, int]:
    writer = gguf.GGUFWriter(str(tmp), arch=str(src.meta.get("general.architecture")))
    for key, field in src.reader.fields.items():
        if key.startswith(_SKIP_KEYS) or key == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
    counts: dict[str, int] = {}
    with torch.no_grad():
        for name, t in src.tensors.items():
            shape = [int(d) for d in reversed(t.shape)]  # back to GGUF's innermost-first order, as torch rows
            expert = expert_slice(name)
            if expert is None:
                data, type_name = _source_tensor(model, ligero_name(name), float16)
            elif expert[1]:
                continue  # written with expert 0: llama.cpp reads a layer's experts as one 3-D tensor
            else:
                name, data, type_name = _expert_tensor(model, expert[0], float16)
                shape = [len(data), *shape]
            raw = gguf.GGMLQuantizationType[type_name]
            if type_name in ("F32", "F16"):
                writer.add_tensor(name, np.ascontiguousarray(data).reshape(shape))
            else:
                writer.add_tensor(name, np.ascontiguousarray(data), raw_dtype=raw)  # bytes: [rows, row bytes]
            counts[type_name] = counts.get(type_name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts
