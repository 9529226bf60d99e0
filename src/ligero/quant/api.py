"""One verb: `quantize(model, config_or_recipe, filter=...)`, dispatched on the config's type.

The same walk builds empty quantized layers on the meta device when a saved quantized model is loaded, so
loading needs no re-quantization: the structure comes from the recipe, the tensors from the file.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ligero.errors import LigeroError
from ligero.models.transformer import Linear, Transformer, stored_bytes
from ligero.quant.config import QuantConfig, Recipe
from ligero.quant.modules import LINEAR_TYPES, QuantizedEmbedding, QuantizedLinear, check_shape

LayerFilter = Callable[[str, nn.Module], bool]


def _linear_type(config: QuantConfig) -> type[QuantizedLinear]:
    try:
        return LINEAR_TYPES[type(config)]
    except KeyError:
        raise LigeroError(f"no quantized layer is registered for {type(config).__name__}") from None


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _replace(model: Transformer, recipe: Recipe, layer_filter: LayerFilter | None, build) -> Transformer:
    """Swap every selected Linear for the quantized layer `build(weight_or_shape, config, name)` returns."""
    cfg = model.cfg
    for name, module in list(model.named_modules()):
        if not isinstance(module, Linear) or (layer_filter is not None and not layer_filter(name, module)):
            continue
        config = recipe.config_for(name)
        if config is None:
            continue
        check_shape(config, module.in_features, name)
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

    Schemes that calibrate (SmoothQuant) need `calibration`: token windows from the calibration split.
    """
    recipe = config if isinstance(config, Recipe) else Recipe(config)
    if getattr(model, "quant_recipe", None) is not None:
        raise LigeroError("this model is already quantized; start from the full-precision model")
    stats = {}
    if recipe.needs_calibration:
        if not calibration:
            raise LigeroError(f"scheme '{recipe.name or recipe.weights.kind}' needs calibration data; pass token "
                              "windows (CLI: --calib-windows N with N > 0, or --calib-text FILE)")
        from ligero.quant.calibrate import input_absmax

        stats = input_absmax(model, calibration)

    from ligero.quant.config import AdaRoundConfig, LSQConfig

    if isinstance(recipe.weights, AdaRoundConfig):  # learned rounding runs layer by layer, in model order
        from ligero.quant.adaround import adaround_model

        adaround_model(model, recipe.weights, calibration, filter)
    elif isinstance(recipe.weights, LSQConfig):  # learned steps: a short distillation of the whole model
        from ligero.quant.lsq import lsq_model

        lsq_model(model, recipe.weights, calibration, filter)

    def build(name, lin, c):
        extra = {"act_max": stats.get(name)} if getattr(c, "needs_calibration", False) else {}
        return _linear_type(c).from_float(lin.weight.detach().float(), c, getattr(lin, "segments", None), **extra)

    _replace(model, recipe, filter, build)
    set_kv_quant(model, recipe)
    model.quant_recipe = recipe
    return model


def set_kv_quant(model: Transformer, recipe: Recipe) -> None:
    for layer in model.layers:
        layer.attn.kv_quant = recipe.kv


def build_quantized_structure(model: Transformer, recipe: Recipe) -> Transformer:
    """Empty quantized layers with the right shapes (for loading a saved quantized model on meta)."""
    _replace(model, recipe, None,
             lambda _name, lin, c: _linear_type(c)(lin.in_features, lin.out_features, c, getattr(lin, "segments", None)))
    set_kv_quant(model, recipe)
    model.quant_recipe = recipe
    return model


def weight_count(model: Transformer) -> int:
    """Number of weights of the logical model (tied head counted once)."""
    return model.cfg.n_params()


def bits_per_weight(model: Transformer) -> float:
    return stored_bytes(model) * 8 / weight_count(model)
