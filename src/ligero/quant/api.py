"""One verb: `quantize(model, config_or_recipe, filter=...)`, dispatched through the scheme registry.

The same walk builds empty quantized layers on the meta device when a saved quantized model is loaded, so
loading needs no re-quantization: the structure comes from the recipe, the tensors from the file.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn

from ligero.errors import LigeroError
from ligero.models.transformer import FULL_PRECISION_KV, Linear, Transformer
from ligero.quant.calibrate import input_absmax
from ligero.quant.config import QuantConfig, Recipe, scheme_spec
from ligero.quant.kv import KIVIFormat
from ligero.quant.modules import IntGroupLinear, QuantizedEmbedding, QuantizedLinear

LayerFilter = Callable[[str, nn.Module], bool]
# build(name, full-precision Linear, config) -> the quantized layer that replaces it
LayerBuilder = Callable[[str, Linear, QuantConfig], QuantizedLinear]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _selected(model: Transformer, recipe: Recipe,
              layer_filter: LayerFilter | None) -> Iterator[tuple[str, Linear, QuantConfig]]:
    """(name, Linear, config) of every full-precision Linear the recipe quantizes."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, Linear) or (layer_filter is not None and not layer_filter(name, module)):
            continue
        config = recipe.config_for(name)
        if config is not None:
            yield name, module, config


def _check_shapes(model: Transformer, recipe: Recipe, layer_filter: LayerFilter | None) -> None:
    for name, module, config in _selected(model, recipe, layer_filter):
        multiple = scheme_spec(config).input_multiple(config)
        if module.in_features % multiple:
            raise LigeroError(f"{name}: {config.kind} needs in_features divisible by {multiple} (got "
                              f"{module.in_features}); exclude the layer with an override")


def _replace(model: Transformer, recipe: Recipe, layer_filter: LayerFilter | None,
             build: LayerBuilder) -> Transformer:
    """Swap every selected Linear for the quantized layer `build` returns."""
    cfg = model.cfg
    _check_shapes(model, recipe, layer_filter)
    for name, module, config in _selected(model, recipe, layer_filter):
        _set_module(model, name, build(name, module, config))
    head = model.lm_head
    if cfg.tie_embeddings:
        # One table serves both the head and the embedding lookups: the embedding follows the head's format
        # (and stays full precision when the head does).
        if isinstance(head, QuantizedLinear):
            model.embed = QuantizedEmbedding(head)
    elif recipe.embed is not None and (layer_filter is None or layer_filter("embed", model.embed)):
        table = Linear(cfg.dim, cfg.vocab_size, bias=False, device="meta")
        table.weight = model.embed.weight
        model.embed = QuantizedEmbedding(build("embed", table, recipe.embed))
    return model


@torch.no_grad()
def quantize(model: Transformer, config: QuantConfig | Recipe, filter: LayerFilter | None = None,
             calibration: list[list[int]] | None = None) -> Transformer:
    """Quantize `model` in place. A bare config applies to the block linears; head and embedding stay int8.

    Schemes that calibrate or learn (SmoothQuant, AdaRound, LSQ) need `calibration`: token windows from the
    calibration split.
    """
    recipe = config if isinstance(config, Recipe) else Recipe(config)
    if recipe.weights is not None and (resolve := scheme_spec(recipe.weights).resolve) is not None:
        recipe = resolve(recipe, model)  # per-layer formats that depend on the model (llama.cpp's mixes)
    if getattr(model, "quant_recipe", None) is not None:
        raise LigeroError("this model is already quantized; start from the full-precision model")
    _check_shapes(model, recipe, filter)  # before any long step
    if recipe.needs_calibration and not calibration:
        raise LigeroError(f"scheme '{recipe.name or recipe.weights.kind}' needs calibration data; pass token "
                          "windows (CLI: --calib-windows N with N > 0, or --calib-text FILE)")
    calibrates = any(scheme_spec(c).calibrates(c) for c in recipe.layer_configs())
    stats = input_absmax(model, calibration) if calibrates else {}  # statistics of the full-precision model
    if recipe.weights is not None and (prepass := scheme_spec(recipe.weights).prepass) is not None:
        prepass(model, recipe.weights, calibration, filter)  # swaps in the block linears it learned

    def build(name: str, lin: Linear, c: QuantConfig) -> QuantizedLinear:
        spec = scheme_spec(c)
        extra = {"act_max": stats.get(name)} if spec.calibrates(c) else {}
        return spec.layer.from_float(lin.weight.detach().float(), c, getattr(lin, "segments", None), **extra)

    _replace(model, recipe, filter, build)
    set_kv_quant(model, recipe)
    model.quant_recipe = recipe
    return model


def set_kv_quant(model: Transformer, recipe: Recipe) -> None:
    model.kv_format = KIVIFormat(recipe.kv) if recipe.kv is not None else FULL_PRECISION_KV


def build_quantized_structure(model: Transformer, recipe: Recipe) -> Transformer:
    """Empty quantized layers with the right shapes (for loading a saved quantized model on meta)."""
    _replace(model, recipe, None, lambda _name, lin, c: scheme_spec(c).layer(lin.in_features, lin.out_features, c,
                                                                             getattr(lin, "segments", None)))
    set_kv_quant(model, recipe)
    model.quant_recipe = recipe
    return model


def compact_layers(model: nn.Module) -> int:
    """Hold every layer that has a compact form in that form only (4-bit codes: the decode kernel's x8 layout,
    the row-major form rebuilt on demand; see IntGroupLinear.compact): the as-shipped GGUF load, where the model's
    size is the point. In-place edits of such a layer's `packed` / `scale` / `minimum` would edit a rebuilt copy:
    assign them instead. Returns the number of layers compacted."""
    return sum(1 for m in model.modules() if isinstance(m, IntGroupLinear) and m.compact())
