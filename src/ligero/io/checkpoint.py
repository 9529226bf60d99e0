"""Load any model spec (registry id, GGUF file, Hugging Face folder, Ligero folder) into the runtime.

GGUF files are converted once to a Ligero folder (ligero.json + model.safetensors + tokenizer files) under
LIGERO_CACHE/models/<sha256 of the source>, so the next load is a memory-map away.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import load_file, save_file

from ligero.errors import LigeroError
from ligero.io.gguf_file import GGUFFile
from ligero.io.gguf_header import check_magic
from ligero.io.hf_folder import hf_config, hf_state_dict, read_hf_config
from ligero.io.tokenizer import TOKENIZER_FILE, TOKENIZER_META, Tokenizer, tokenizer_from_gguf, tokenizer_from_hf_folder
from ligero.models.config import ModelConfig
from ligero.models.registry import REGISTRY
from ligero.models.transformer import Transformer, fuse_projections
from ligero.paths import cache_root
from ligero.quant.api import build_quantized_structure, compact_layers
from ligero.quant.config import Float16Config, Recipe
from ligero.quant.modules import ROW_MAJOR_NAMES, X8_NAMES, QuantizedEmbedding

CHECKPOINT_FILE, WEIGHTS_FILE, MANIFEST_FILE = "ligero.json", "model.safetensors", "manifest.json"
FORMAT_VERSION = 3  # 2: manifest.json with sha256 hashes, quantization recipe; 3: fused qkv / gate_up


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Tokenizer | None
    info: dict = field(default_factory=dict)  # id, source, source_sha256, format, load_seconds

    @property
    def cfg(self) -> ModelConfig:
        return self.model.cfg


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def folder_digest(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f"{f.name} {file_sha256(f)}\n".encode())
    return h.hexdigest()


def model_digest(path: Path) -> str:
    """What identifies a model's weights: a GGUF file's sha256, or a digest over a folder's weight files (a Ligero
    folder's model.safetensors, a Hugging Face folder's *.safetensors / *.bin, an adapter's files)."""
    from ligero.io.adapter import adapter_digest, is_adapter_folder

    if path.is_file():
        return file_sha256(path)
    if is_adapter_folder(path):
        return adapter_digest(path)
    if (path / CHECKPOINT_FILE).is_file():
        return folder_digest([path / WEIGHTS_FILE])
    return folder_digest(sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin")))


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise LigeroError(f"unknown device '{device}'; use auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LigeroError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return torch.device(device)


def tied_names(model: Transformer) -> set[str]:
    """State-dict keys that alias another tensor when embeddings are tied (saved once, re-tied on load)."""
    if not model.cfg.tie_embeddings:
        return set()
    if isinstance(model.embed, QuantizedEmbedding):  # the embedding's own keys (no state_dict: it would rebuild
        # every compact int4 layer's row-major buffers just to list names)
        return {k for k in model.embed.state_dict(prefix="embed.", keep_vars=True)}
    return {"lm_head.weight"}


def build_model(cfg: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]], device, dtype,
                recipe: dict | None = None) -> Transformer:
    """Build on the meta device (no allocation), then adopt the loaded tensors with assign=True.

    With a quantization recipe, the quantized layers are built empty first; their packed buffers keep their
    stored dtypes, while full-precision parameters are cast to `dtype`.
    """
    with torch.device("meta"):
        model = Transformer(cfg)
        if recipe is not None:
            build_quantized_structure(model, Recipe.from_dict(recipe))
    skip = tied_names(model)
    expected = {k: v for k, v in model.state_dict().items() if k not in skip}
    params = {k for k, _ in model.named_parameters()}
    state, compact = {}, {}
    for name, t in fuse_projections(dict(tensors)).items():
        layer, _, leaf = name.rpartition(".")
        if leaf in X8_NAMES:  # an int4 layer given in its compact form (the GGUF loader's x8 layout)
            compact.setdefault(layer, {})[leaf] = t.to(device)
            continue
        if name in skip:
            continue
        if name in expected and tuple(t.shape) != tuple(expected[name].shape):
            raise LigeroError(f"tensor {name} has shape {tuple(t.shape)} but the config implies "
                              f"{tuple(expected[name].shape)}; the weights and the config disagree")
        state[name] = t.to(device=device, dtype=dtype if name in params else expected.get(name, t).dtype)
    held = {f"{layer}.{n}" for layer in compact for n in ROW_MAJOR_NAMES}
    missing, unexpected = set(expected) - set(state) - held, set(state) - set(expected)
    if missing or unexpected:
        raise LigeroError(
            f"weights do not match the architecture: missing {sorted(missing)[:4]}, unexpected "
            f"{sorted(unexpected)[:4]}; the checkpoint and its config disagree"
        )
    model.load_state_dict(state, strict=False, assign=True)
    for layer, parts in compact.items():
        model.get_submodule(layer).set_compact([parts[n] for n in X8_NAMES])
    if not isinstance(model.embed, QuantizedEmbedding):  # a quantized table is shared by construction
        model.tie_weights()
    return model.eval().requires_grad_(False)


# --- 16-bit checkpoints --------------------------------------------------------------------------------
HALF_FORMATS = {torch.float16: "f16", torch.bfloat16: "bf16"}


def sixteen_bit_state(state: dict[str, torch.Tensor], cfg: ModelConfig,
                      act16: bool = False) -> tuple[dict[str, torch.Tensor], Recipe]:
    """A checkpoint's tensors with its fp16 / bf16 matrices (projections, head, table) kept in 16 bits: (state,
    recipe) for build_model, each such matrix a Float16Linear's `weight16`; fp32 tensors and norms as they are."""
    state = fuse_projections(state)
    recipe = Recipe(None, head=None, embed=None)
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        fmt = HALF_FORMATS.get(t.dtype)
        if fmt is None or t.dim() != 2 or not (name.endswith("_proj.weight") or name in ("lm_head.weight",
                                                                                          "embed.weight")):
            out[name] = t
            continue
        config = Float16Config(fmt, act16=act16)
        if name == "embed.weight" and cfg.tie_embeddings:  # one table serves as the head
            out["lm_head.weight16"], recipe.head, recipe.embed = t, config, config
        elif name == "embed.weight":
            out["embed.table.weight16"], recipe.embed = t, config
        elif name == "lm_head.weight":
            if not cfg.tie_embeddings:
                out["lm_head.weight16"], recipe.head = t, config
        else:
            layer = name.removesuffix(".weight")
            out[f"{layer}.weight16"] = t
            recipe.overrides.append((layer, config))
    return out, recipe


# --- Ligero folders -----------------------------------------------------------------------------------
def save_checkpoint(model: Transformer, tokenizer: Tokenizer | None, folder: Path, source: dict) -> None:
    """Write ligero.json (config, source, quantization recipe), model.safetensors, tokenizer files and a
    manifest of the sha256 of each of them, which loading verifies (other files in the folder are left alone)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    skip = tied_names(model)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in skip}
    save_file(state, str(folder / WEIGHTS_FILE))
    written = [WEIGHTS_FILE, CHECKPOINT_FILE]
    if tokenizer is not None:
        tokenizer.save(folder)
        written += [TOKENIZER_FILE, TOKENIZER_META]
    recipe = getattr(model, "quant_recipe", None)
    meta = {"format": "ligero-checkpoint", "version": FORMAT_VERSION, "config": model.cfg.to_dict(),
            "source": source, "quantization": recipe.to_dict() if recipe is not None else None}
    (folder / CHECKPOINT_FILE).write_text(json.dumps(meta, indent=1))
    # safetensors writes its file owner-only; give it the permissions every other file got (the umask's).
    os.chmod(folder / WEIGHTS_FILE, (folder / CHECKPOINT_FILE).stat().st_mode & 0o777)
    manifest = {"files": {name: file_sha256(folder / name) for name in sorted(written)}}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise LigeroError(f"{path} is not readable JSON ({str(exc)[:80]}); re-create the folder with "
                          "`ligero quantize`") from None
    if not isinstance(data, dict):
        raise LigeroError(f"{path} does not hold a JSON object; re-create the folder with `ligero quantize`")
    return data


def verify_manifest(folder: Path) -> set[str]:
    """Check every file the manifest lists against its sha256; returns their names."""
    path = Path(folder) / MANIFEST_FILE
    if not path.exists():
        raise LigeroError(f"{folder} has no {MANIFEST_FILE}; re-create the folder with `ligero quantize`")
    files = _read_json(path).get("files")
    if not isinstance(files, dict) or not all(isinstance(d, str) for d in files.values()):
        raise LigeroError(f"{path} has no list of files and their sha256; re-create the folder with `ligero quantize`")
    for name, digest in files.items():
        f = Path(folder) / name
        if not f.is_file():
            raise LigeroError(f"{f} is missing; the saved model is incomplete, re-create it")
        if file_sha256(f) != digest:
            raise LigeroError(f"{f} does not match the sha256 in {MANIFEST_FILE} (changed or corrupt); re-create it")
    return set(files)


def load_checkpoint(folder: Path, device, dtype) -> LoadedModel:
    folder = Path(folder)
    verified = verify_manifest(folder)
    if CHECKPOINT_FILE not in verified or WEIGHTS_FILE not in verified:
        raise LigeroError(f"{folder / MANIFEST_FILE} does not cover {CHECKPOINT_FILE} and {WEIGHTS_FILE}; "
                          "re-create the folder with `ligero quantize`")
    meta = _read_json(folder / CHECKPOINT_FILE)
    if meta.get("format") != "ligero-checkpoint" or meta.get("version", 0) > FORMAT_VERSION:
        raise LigeroError(f"{folder} holds an unknown checkpoint format/version; upgrade Ligero or re-create it")
    cfg = ModelConfig.from_dict(meta["config"])
    try:
        tensors = load_file(str(folder / WEIGHTS_FILE))
    except Exception as exc:
        raise LigeroError(f"{folder / WEIGHTS_FILE} is unreadable ({str(exc)[:80]}); "
                          "delete the folder and reload") from None
    model = build_model(cfg, tensors.items(), device, dtype, meta.get("quantization"))
    # Only tokenizer files the manifest vouches for: a leftover from an earlier save is not this model's.
    tok = Tokenizer.load(folder) if {TOKENIZER_FILE, TOKENIZER_META} <= verified else None
    return LoadedModel(model, tok, {"source": meta.get("source", {}), "format": "ligero"})


# --- GGUF ----------------------------------------------------------------------------------------------
def _gguf_source(path: Path, gf: GGUFFile, digest: str) -> dict:
    """Where a GGUF-loaded model came from (the card and `ligero export` read it)."""
    types = sorted({t.tensor_type.name for t in gf.tensors.values()})
    return {"path": str(path), "sha256": digest, "format": "gguf", "tensor_types": types,
            "name": gf.meta.get("general.name"), "license": gf.meta.get("general.license")}


def load_gguf_dequantized(path: Path, device, dtype) -> LoadedModel:
    """A GGUF file with every tensor dequantized to `dtype` (the full-precision baseline quantization starts from),
    tensor by tensor from the memory-mapped file; nothing is written to disk but the tokenizer's conversion."""
    gf = GGUFFile(path)
    model = build_model(gf.config(), gf.state_dict(gf.config()), device, dtype)
    digest = file_sha256(path)
    return LoadedModel(model, _gguf_tokenizer(path, gf, digest), {"source": _gguf_source(path, gf, digest),
                                                                  "format": "gguf"})


class FreedMemoryReturned:
    """glibc only (a no-op elsewhere): while a packed load, a quantization or an audit's (untimed) metric runs,
    allocations of 1 MB or more are memory-mapped, so each tensor's temporaries go back to the system when freed; by
    default glibc raises that threshold as large blocks are freed and keeps them in its heap (at the 1.1B shape:
    +0.06 GB of peak memory for a load, 2-4x the peak of a 64-token forward pass, measured). Afterwards the
    threshold is glibc's largest default (32 MB), so inference's activations reuse the heap (page faults on every
    prefill would slow it)."""

    _libc = None

    def __enter__(self):
        if FreedMemoryReturned._libc is None:
            name = ctypes.util.find_library("c")
            libc = ctypes.CDLL(name) if name else None
            FreedMemoryReturned._libc = libc if libc is not None and hasattr(libc, "mallopt") else False
        if self._libc:
            self._libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        return self

    def __exit__(self, *exc):
        if self._libc:
            self._libc.mallopt(-3, 32 << 20)
            self._libc.malloc_trim(0)


def trim_heap() -> None:
    """Return the heap's free pages to the system (glibc; a no-op elsewhere): after a model is released, so the
    next one does not stack on memory the process keeps but no longer uses."""
    with FreedMemoryReturned():
        pass


def load_gguf_packed(path: Path, device, dtype, int8_activations: bool = False) -> LoadedModel:
    with FreedMemoryReturned():
        return _load_gguf_packed(path, device, dtype, int8_activations)


def _load_gguf_packed(path: Path, device, dtype, int8_activations: bool = False) -> LoadedModel:
    """A GGUF file with its quantized linears kept as they are stored (packed layers, no fp32 copy of them; int4
    layers in their kernel layout only), the other tensors in full precision; no converted copy on disk except
    the tokenizer's."""
    gf = GGUFFile(path)
    cfg = gf.config()
    state, recipe = gf.packed_state_dict(cfg, compact_int4=torch.device(device).type == "cpu",
                                         int8_activations=int8_activations)
    types = sorted({t.tensor_type.name for t in gf.tensors.values()})
    recipe.name = "gguf:" + "+".join(types)
    model = build_model(cfg, state.items(), device, dtype, recipe.to_dict())
    del state
    compact_layers(model)  # any int4 layer not made compact while reading
    # On fp32 activations the packed layers compute with the file's weights exactly (prefill dequantizes each for
    # torch's GEMM): quantize() may start from them, one layer at a time, instead of from an fp32 copy.
    model.packed_source = not int8_activations
    model.ggml_rope = int8_activations  # llama.cpp's arithmetic includes its rounding of the RoPE angles
    digest = file_sha256(path)
    return LoadedModel(model, _gguf_tokenizer(path, gf, digest), {"source": _gguf_source(path, gf, digest),
                                                                  "format": "gguf-packed"})


def _gguf_tokenizer(path: Path, gf: GGUFFile, digest: str) -> Tokenizer:
    """The GGUF's tokenizer, converted once and cached by the file's sha256 (the conversion takes seconds)."""
    folder = cache_root() / "tokenizers" / digest
    if (folder / TOKENIZER_FILE).exists() and (folder / TOKENIZER_META).exists():
        return Tokenizer.load(folder)
    tokenizer = tokenizer_from_gguf(path, gf.meta)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer.save(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return tokenizer


def gguf_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer of a GGUF file (converted once, cached by the file's sha256)."""
    check_magic(path)
    return _gguf_tokenizer(path, GGUFFile(path), file_sha256(path))


# --- memory check -------------------------------------------------------------------------------------
MEMORY_CAP_ENV = "LIGERO_MAX_MEMORY_MB"  # caps what a load may plan to use (default: the machine's available memory)


def available_memory_bytes() -> int | None:
    """What a load may use: the kernel's MemAvailable, capped by $LIGERO_MAX_MEMORY_MB (None where unknown)."""
    limits = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    limits.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    cap = os.environ.get(MEMORY_CAP_ENV)
    if cap:
        try:
            limits.append(int(float(cap) * 1e6))
        except ValueError:
            raise LigeroError(f"{MEMORY_CAP_ENV}={cap!r} is not a number of megabytes; set e.g. 8000") from None
    return min(limits) if limits else None


def gguf_load_bytes(path: Path, keep_quantized: bool, compact: bool = True,
                    float_bytes: int = 4) -> tuple[int, int]:
    """(bytes a load of the GGUF needs, its parameter count), from the header alone: as shipped, the packed types'
    bytes and `float_bytes` per weight of the rest; dequantized, `float_bytes` per weight. `compact`: Q4_0 layers
    hold their kernel layout only (CPU), without the explicit minimum other devices keep."""
    import gguf

    from ligero.io.gguf_file import GGML_TYPES, HALF_TYPES, PACKED_TYPES
    from ligero.io.gguf_header import read_gguf_header

    need = params = 0
    for t in read_gguf_header(path).tensors:
        n = 1
        for d in t.dims:
            n *= d
        params += n
        try:
            qtype = gguf.GGMLQuantizationType(t.type_id)
        except ValueError:
            qtype = None  # an unknown type: the load itself names it
        if keep_quantized and qtype is not None and qtype.name in (*PACKED_TYPES, *GGML_TYPES, *HALF_TYPES) and \
                len(t.dims) > 1:
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            need += n // block * size + (n // 32 * 2 if qtype.name == "Q4_0" and not compact else 0)
        else:
            need += float_bytes * n
    return need, params


def check_fits(path: Path, keep_quantized: bool, compact: bool = True, float_bytes: int = 4) -> None:
    """Stop before loading a GGUF that will not fit in memory, with what it needs and what would fit."""
    available = available_memory_bytes()
    if available is None:
        return
    need, params = gguf_load_bytes(path, keep_quantized, compact, float_bytes)
    if need > available:
        how = "as shipped (packed)" if keep_quantized else f"in {8 * float_bytes}-bit floats"
        hint = "free memory, or use a smaller or more quantized file" + ("" if keep_quantized else
                                                                        ", or load it as shipped (keep_quantized)")
        raise LigeroError(f"{path.name} ({params / 1e9:.2f}B parameters) needs about {need / 1e9:.1f} GB {how}, but "
                          f"only {available / 1e9:.1f} GB is available; {hint}")


# --- entry point --------------------------------------------------------------------------------------
def resolve_spec(spec: str) -> Path:
    if spec in REGISTRY:
        return REGISTRY[spec].locate()
    path = Path(spec).expanduser()
    if not path.exists():
        raise LigeroError(
            f"model '{spec}' not found: it is neither a registry id ({', '.join(REGISTRY)}) nor an existing "
            "file or folder; check the path or run `ligero models`"
        )
    return path


def load_model(spec: str, device: str = "auto", dtype: torch.dtype = torch.float32,
               keep_quantized: bool = False, int8_activations: bool = False) -> LoadedModel:
    """`keep_quantized`: a GGUF file's quantized and 16-bit tensors load into packed layers as they are (the model
    as shipped), a Hugging Face folder's fp16 / bf16 matrices into 16-bit layers; otherwise every tensor is
    dequantized to full precision (the baseline quantization starts from).
    `int8_activations` (with keep_quantized): every quantized layer computes as llama.cpp's CPU backend does, on
    activations rounded to int8 (per 32 inputs for Q8_0 / Q4_* / Q5_*, per 256 for K-quants; integer kernels),
    instead of fp32 ones, and with RoPE angles rounded as llama.cpp rounds them (rope_table_ggml)."""
    if int8_activations and not keep_quantized:
        raise LigeroError("int8_activations applies to a GGUF loaded as shipped: pass keep_quantized=True too")
    from ligero.io.adapter import is_adapter_folder, load_adapter_model

    t0 = time.perf_counter()
    dev = resolve_device(device)
    path = resolve_spec(spec)
    if path.is_file():
        check_magic(path)
        check_fits(path, keep_quantized, compact=dev.type == "cpu",
                   float_bytes=torch.empty(0, dtype=dtype).element_size())
    if path.is_file() and keep_quantized:
        loaded = load_gguf_packed(path, dev, dtype, int8_activations)
    elif path.is_file():
        loaded = load_gguf_dequantized(path, dev, dtype)
    elif is_adapter_folder(path):  # a fine-tuned model: the base with the LoRA adapters merged
        loaded = load_adapter_model(path, device, dtype)
    elif (path / CHECKPOINT_FILE).exists():
        loaded = load_checkpoint(path, dev, dtype)
    elif (path / "config.json").exists():
        cfg = hf_config(path)
        tensors, recipe = hf_state_dict(path, cfg), None
        if keep_quantized:  # 16-bit matrices stay in 16 bits
            state, half = sixteen_bit_state(dict(tensors), cfg, act16=int8_activations)
            tensors, recipe = state.items(), half.to_dict() if half.layer_configs() else None
        model = build_model(cfg, tensors, dev, dtype, recipe)
        model.packed_source = keep_quantized and not int8_activations
        loaded = LoadedModel(model, tokenizer_from_hf_folder(path, read_hf_config(path)), {"format": "hf"})
        loaded.info["source"] = {"path": str(path), "format": "hf"}
    else:
        raise LigeroError(f"{path} is a folder without config.json, {CHECKPOINT_FILE} or adapter.json; "
                          "pass a Hugging Face model folder, a Ligero folder, a LoRA adapter folder or a .gguf file")
    loaded.info.update(id=spec, device=str(dev), load_seconds=round(time.perf_counter() - t0, 2))
    return loaded


def load_tokenizer(spec: str) -> Tokenizer:
    """The tokenizer of a model (registry id, .gguf file, Ligero or Hugging Face folder) without loading weights."""
    from ligero.io.adapter import is_adapter_folder, read_adapter

    path = resolve_spec(spec)
    if path.is_file():
        return gguf_tokenizer(path)
    if is_adapter_folder(path):  # an adapter keeps its base's tokenizer
        return load_tokenizer(read_adapter(path)[0]["base"]["model"])
    tokenizer = None
    if (path / CHECKPOINT_FILE).exists():
        tokenizer = Tokenizer.load(path) if (path / TOKENIZER_FILE).exists() else None
    elif (path / "config.json").exists():
        tokenizer = tokenizer_from_hf_folder(path, read_hf_config(path))
    if tokenizer is None:
        raise LigeroError(f"{spec} has no tokenizer (tokenizer.json); use a model that has one")
    return tokenizer
