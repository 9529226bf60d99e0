"""One way to build a variant: load a model, pick the recipe, calibrate when it needs to, quantize.

The CLI, the server, card profiling, the audit and the benchmarks all build their models here, so "fp32" (the
baseline), scheme names and calibration mean the same thing everywhere.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from ligero.errors import LigeroError
from ligero.eval.data import wikipedia_split
from ligero.eval.perplexity import make_windows, window_bos
from ligero.io.adapter import is_adapter_folder, read_adapter
from ligero.io.checkpoint import (
    CHECKPOINT_FILE,
    FreedMemoryReturned,
    LoadedModel,
    file_sha256,
    load_model,
    model_digest,
    resolve_spec,
)
from ligero.models.registry import REGISTRY
from ligero.quant.api import quantize, quantize_linear
from ligero.quant.config import BASELINE, Recipe, recipe_for

__all__ = ["AS_SHIPPED", "BASELINE", "CALIBRATION_SPLIT", "ModelSource", "build_variant", "calibration_windows",
           "model_source", "scheme_recipe"]

CALIBRATION_SPLIT = "calib"
# The model as its file stores it: a GGUF's quantized tensors in packed layers, computed as llama.cpp's CPU backend
# does (activations rounded to int8 per 32 inputs for Q8_0 / Q4_* / Q5_*, per 256 for K-quants); a saved
# quantized Ligero folder as saved.
AS_SHIPPED = "as-shipped"
FULL_PRECISION_TYPES = ("F32", "F16", "BF16")
# A quantized GGUF whose fp32 form would pass this size keeps its baseline packed: the same weights computed in
# full precision (prefill dequantizes each layer for torch's fp32 GEMM; decode's matrix-vector products split the
# activations into two 8-bit halves, ~16-bit), so an audit of a 1.1B file needs about the file's memory, not 4.4 GB.
FP32_BASELINE_MAX_BYTES = 2e9


@dataclass
class ModelSource:
    """What an audit starts from: the file(s) it reads, how they store the weights, what the baseline is."""

    spec: str  # what build_variant loads: a registry id, or an absolute path
    label: str  # a file-name-safe name for run ids and card names
    path: Path  # the weights: a .gguf file, or a folder
    sha256: str  # of the file; of a folder's weight files (name and digest of each, in name order)
    format: str  # "gguf", "hf", "ligero" or "adapter"
    license: str
    precision: str  # how the published weights are stored, in words
    tensor_types: list[str] = field(default_factory=list)  # a GGUF's tensor types
    quantized: bool = False  # stored quantized: the audit adds the file as shipped as a row
    baseline_spec: str = ""  # what the full-precision baseline loads from (a quantized folder: its base)
    baseline_packed: bool = False  # the baseline holds the GGUF's tensors packed (FP32_BASELINE_MAX_BYTES)
    file_type: str | None = None  # a GGUF's llama.cpp file type (general.file_type), e.g. Q4_K_M

    def describe(self) -> dict:
        return {"path": str(self.path), "sha256": self.sha256, "format": self.format,
                "tensor_types": self.tensor_types, "file_type": self.file_type}


def _file_type_name(value) -> str | None:
    """llama.cpp's name of a GGUF's general.file_type (3 -> Q4_1, 15 -> Q4_K_M), None when absent or unknown."""
    import gguf

    try:
        return gguf.LlamaFileType(int(value)).name.removeprefix("MOSTLY_")
    except (TypeError, ValueError):
        return None


def model_source(spec: str) -> ModelSource:
    """Describe a model spec (a registry id, a .gguf file, a Hugging Face folder or a saved Ligero folder) from its
    files, without loading the weights."""
    from ligero.io.gguf_header import read_gguf_header

    path = resolve_spec(spec)  # names a missing model
    if spec in REGISTRY:
        label, license_, precision = spec, REGISTRY[spec].license, REGISTRY[spec].notes
    else:
        path = path.resolve()
        spec, label = str(path), re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem if path.is_file() else path.name)
        license_, precision = "", ""
    if path.is_file():
        header = read_gguf_header(path)  # a file that is not a GGUF is named here
        types = sorted({_type_name(t.type_id) for t in header.tensors})
        license_ = license_ or str(header.meta.get("general.license") or "not stated in the file")
        quantized = any(t not in FULL_PRECISION_TYPES for t in types)
        params = sum(math.prod(t.dims) for t in header.tensors)
        packed = quantized and 4 * params > FP32_BASELINE_MAX_BYTES
        if not precision:
            precision = f"GGUF tensors {', '.join(types)}"
            if packed:
                precision += ("; baseline = its weights computed in full precision, held packed (an fp32 copy "
                              f"would take {4 * params / 1e9:.1f} GB)")
            elif quantized:
                precision += "; fp32 baseline = its dequantized weights"
        return ModelSource(spec, label, path, file_sha256(path), "gguf", license_, precision, types, quantized, spec,
                           packed, _file_type_name(header.meta.get("general.file_type")))
    if (path / CHECKPOINT_FILE).is_file():
        meta = json.loads((path / CHECKPOINT_FILE).read_text())
        recipe = meta.get("quantization")
        base = (meta.get("source") or {}).get("base") or ""
        if recipe and not base:
            raise LigeroError(f"{path} is a quantized Ligero folder that does not record its base model, so there is "
                              "no baseline to audit it against; re-create it with `ligero quantize`")
        precision = f"Ligero folder, {recipe.get('name', 'quantized') if recipe else 'full precision'}"
        if recipe:
            precision += f" (quantized from {base}; baseline = {base} in full precision)"
        return ModelSource(spec, label, path, model_digest(path), "ligero",
                           "see the base model's license", precision, [], bool(recipe), base if recipe else spec)
    if is_adapter_folder(path):
        meta, _ = read_adapter(path)
        base, lora = meta["base"], meta["lora"]
        precision = (f"LoRA adapter (rank {lora['rank']}, {', '.join(lora['targets'])}) on {base['label']}, trained "
                     f"with the base held in {base['scheme']}; loaded as the base's full-precision weights with the "
                     "adapters merged")
        return ModelSource(spec, label, path, model_digest(path), "adapter", "see the base model's license",
                           precision, [], False, spec)
    weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    if not weights:
        raise LigeroError(f"{path} has no *.safetensors weights; pass a Hugging Face model folder, a Ligero folder "
                          "or a .gguf file")
    return ModelSource(spec, label, path, model_digest(path), "hf", "see the folder's model card",
                       "Hugging Face folder (weights in their stored precision, computed in fp32)", [], False, spec)


def _type_name(type_id: int) -> str:
    import gguf

    try:
        return gguf.GGMLQuantizationType(type_id).name
    except ValueError:
        return f"type {type_id}"


def calibration_windows(tokenizer, n_windows: int, tokens_per_window: int = 256,
                        text: str | None = None) -> list[list[int]]:
    """Token windows from the calibration split (disjoint from evaluation) or from a user's text."""
    if n_windows < 1:
        raise LigeroError("calibration needs at least one window; raise --calib-windows")
    if tokenizer is None:
        raise LigeroError("calibration needs the model's tokenizer (tokenizer.json); add one to the model folder")
    ids = tokenizer.encode(text if text is not None else wikipedia_split(CALIBRATION_SPLIT).text, add_bos=False)
    # The same windows as evaluation uses (BOS first for BOS models), so calibration sees the inputs it serves.
    windows = make_windows(ids, tokens_per_window, bos=window_bos(tokenizer))[:n_windows]
    if len(ids) < tokens_per_window or not windows:
        raise LigeroError(f"the calibration text has fewer than {tokens_per_window} tokens; give more text")
    return windows


def scheme_recipe(scheme: str | None, group_size: int | None = None) -> Recipe | None:
    """The recipe of a scheme name; None for the baseline and for AS_SHIPPED (no quantization: the file as it
    is). Raises with the valid schemes for a bad name."""
    if scheme is None or scheme in (BASELINE, AS_SHIPPED):
        if group_size is not None:
            raise LigeroError(f"--group-size needs a group-wise --scheme; {scheme or BASELINE} has no groups")
        return None
    return recipe_for(scheme, group_size)


def _saved_recipe(model_spec: str) -> dict | None:
    """The quantization recipe recorded in a saved Ligero folder, or None (not a folder, or not quantized)."""
    meta = Path(model_spec).expanduser() / CHECKPOINT_FILE
    if not meta.is_file():
        return None
    try:
        return json.loads(meta.read_text()).get("quantization")
    except (OSError, ValueError, AttributeError):
        return None  # unreadable: loading reports it properly


def build_variant(model_spec: str, scheme: str | None = None, *, group_size: int | None = None,
                  recipe: Recipe | None = None, calibration: list[list[int]] | None = None,
                  calib_windows: int = 8, calib_tokens_per_window: int = 256, calib_text: str | None = None,
                  device: str = "cpu", packed_baseline: bool = False) -> LoadedModel:
    """Load `model_spec` and quantize it with `recipe`, or with the recipe of `scheme` (None or BASELINE: the
    full-precision model); `recipe` wins over `scheme`. Calibration windows come from `calibration`, else
    `calib_text`, else the calibration split, and are only built when the recipe needs them. A saved quantized
    folder loads as it is (no scheme).

    The scheme is checked before the model loads. `info["quantize_seconds"]` holds the quantization time.
    Scheme AS_SHIPPED loads a GGUF file as it is stored (packed layers, llama.cpp's arithmetic).

    A GGUF file or a Hugging Face folder is quantized from its tensors as stored (a packed source: quantized and
    16-bit matrices held as they are, one layer widened at a time, the same fp32 weights bit for bit as a
    full-precision load), so the peak is about the file plus the output. `packed_baseline`: the baseline keeps
    them packed too (full-precision arithmetic).
    """
    if scheme == AS_SHIPPED and recipe is None:
        scheme_recipe(scheme, group_size)
        loaded = load_model(model_spec, device, keep_quantized=True, int8_activations=True)
        loaded.info["quantize_seconds"] = 0.0
        return loaded
    if recipe is None:
        recipe = scheme_recipe(scheme, group_size)
    if (recipe is not None or scheme is not None) and _saved_recipe(model_spec) is not None:
        raise LigeroError(f"{model_spec} is already quantized; drop --scheme to use it as saved, or pass the "
                          "full-precision model to quantize")
    loaded = load_model(model_spec, device, keep_quantized=recipe is not None or packed_baseline)
    seconds = 0.0
    if recipe is not None:
        # With no windows asked for, quantize() names what is missing.
        if recipe.needs_calibration and calibration is None and calib_windows > 0:
            calibration = calibration_windows(loaded.tokenizer, calib_windows, calib_tokens_per_window, calib_text)
        t0 = time.perf_counter()
        with FreedMemoryReturned():  # each layer's temporaries go back to the system, the heap stays unfragmented
            quantize(loaded.model, recipe, calibration=calibration if recipe.needs_calibration else None)
        seconds = time.perf_counter() - t0
    loaded.info["quantize_seconds"] = round(seconds, 2)
    return loaded


def build_vision_variant(adapter: str | None, scheme: str | None = None, *, group_size: int | None = None,
                         calib_windows: int = 8, device: str = "cpu"):
    """The vision-language model (`adapter`, None: the shipped one) with its language model quantized by `scheme`
    (None or BASELINE: full precision, the LoRA adapters merged into the weights). A quantized variant quantizes the
    base model's weights and keeps the adapters beside them in full precision (QLoRA's setting): merged first, the
    adapters' small updates were lost in int4's rounding (64 % of the int4 variant's held-out answers became
    sentences instead of the short answers the adapters taught). The projector's two matrices take the scheme's
    weight format when it needs no calibration (else they stay in full precision, as `vlm.projector_format`
    records); the frozen encoder stays in full precision."""
    from ligero.vision.pretrained import load_vision_model

    recipe = scheme_recipe(scheme, group_size) if scheme not in (None, AS_SHIPPED) else None
    if scheme == AS_SHIPPED:
        raise LigeroError(f"{AS_SHIPPED} is the GGUF file as stored; the vision model's language model carries merged "
                          "adapters, so quantize it with a scheme (int8, int4, ...) instead")
    vlm = load_vision_model(adapter, device=device, merge=recipe is None)
    vlm.projector_format = "fp32"
    if recipe is not None:
        calibration = None
        if recipe.needs_calibration and calib_windows > 0:
            calibration = calibration_windows(vlm.tokenizer, calib_windows, 256, None)
        with FreedMemoryReturned():
            quantize(vlm.lm, recipe, calibration=calibration)
        # The projector's two matrices take the scheme's weight format where it needs no calibration.
        try:
            fc1, fc2 = (quantize_linear(layer, recipe.weights) for layer in (vlm.projector.fc1, vlm.projector.fc2))
            vlm.projector.fc1, vlm.projector.fc2 = fc1, fc2
            vlm.projector_format = recipe.weights.kind
        except LigeroError:
            pass  # a calibrated scheme (W8A8, AdaRound...): the projector stays in full precision
    return vlm
