"""One verb: `quantize(model, config_or_recipe, filter=...)`, dispatched through the scheme registry.

The same walk builds empty quantized layers on the meta device when a saved quantized model is loaded, so
loading needs no re-quantization: the structure comes from the recipe, the tensors from the file.

The model quantized is either full precision or a *packed source*: a GGUF file loaded as stored with full-precision
arithmetic (`model.packed_source`), whose packed layers are the file's weights exactly. Layers are replaced one at
a time, each source layer dequantized just before its replacement is built and dropped after, so the peak is the
source plus the output, never an fp32 copy of the model (learned rounding excepted: it needs the fp32 model).
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn

from ligero.errors import LigeroError
from ligero.models.transformer import FULL_PRECISION_KV, Linear, Transformer
from ligero.quant.calibrate import input_absmax
from ligero.quant.config import PartsConfig, QuantConfig, Recipe, scheme_spec
from ligero.quant.kv import KIVIFormat
from ligero.quant.modules import Int8Linear, IntGroupLinear, PartsLinear, QuantizedEmbedding, QuantizedLinear

LayerFilter = Callable[[str, nn.Module], bool]
# build(name, full-precision Linear, config) -> the quantized layer that replaces it
LayerBuilder = Callable[[str, Linear, QuantConfig], QuantizedLinear]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _source_layers(model: nn.Module) -> tuple[type, ...]:
    """The layer types quantize() starts from: full-precision Linears, and the packed layers of a packed source."""
    return (Linear, QuantizedLinear) if getattr(model, "packed_source", False) else (Linear,)


def source_weight(module: nn.Module) -> torch.Tensor:
    """The fp32 weight [out, in] of a source layer (a packed one's dequantized, made for the call)."""
    if isinstance(module, QuantizedLinear):
        return module.dequantize().float()
    return module.weight.detach().float()


def _layer_names(model: nn.Module, kinds: tuple[type, ...]) -> list[str]:
    """Names of the layers of `kinds` outside the embedding (handled on its own; a tied table shared with the head
    is listed as lm_head) and outside fused packed layers (a PartsLinear's parts go with their layer)."""
    names = []
    for n, m in model.named_modules(remove_duplicate=False):
        parent = n.rpartition(".parts.")[0]
        if isinstance(m, kinds) and not n.startswith("embed.") and n not in names and not (
                parent and isinstance(model.get_submodule(parent), QuantizedLinear)):
            names.append(n)
    return names


# A layer larger than this (8 MB in fp32; a 32k-vocabulary table at width 2048 is 262 MB) is built a block of rows
# of about BUILD_BLOCK_WEIGHTS (4 MB in fp32) at a time when its format allows (row_separable): the fp32 rows and
# the dequantizer's and quantizer's temporaries are a block's. A fused projection whose parts have formats of their
# own (PartsLinear) is built part by part, each part the same way.
BUILD_BY_ROWS_ABOVE = 1 << 21
BUILD_BLOCK_WEIGHTS = 1 << 18


def _source_rows(module: nn.Module, start: int, stop: int) -> torch.Tensor:
    """Rows start:stop of source_weight(module), made for the call."""
    if isinstance(module, PartsLinear):  # a packed source's fused projection: the parts the rows fall in
        rows, offset = [], 0
        for part, n in zip(module.parts, module.segments):
            lo, hi = max(start, offset), min(stop, offset + n)
            if lo < hi:
                rows.append(_source_rows(part, lo - offset, hi - offset))
            offset += n
        return torch.cat(rows)
    if isinstance(module, QuantizedLinear):
        return module.dequantize(torch.arange(start, stop)).float()
    return module.weight.detach()[start:stop].float()


def _build_rows(layer_type: type[QuantizedLinear], source: nn.Module, config: QuantConfig, start: int, stop: int,
                segments=None) -> QuantizedLinear:
    """layer_type.from_float of source rows start:stop, built a block of rows at a time (the same buffers) when
    the format allows it and the rows are many."""
    in_features, out = source.in_features, stop - start
    if not layer_type.row_separable or out * in_features <= BUILD_BY_ROWS_ABOVE:
        return layer_type.from_float(_source_rows(source, start, stop), config, segments)
    step = max(1, BUILD_BLOCK_WEIGHTS // in_features)
    with torch.device("meta"):  # the buffers are filled block by block below
        layer = layer_type(in_features, out, config, segments)
    for r in range(0, out, step):
        block = layer_type.from_float(_source_rows(source, start + r, start + min(r + step, out)), config)
        for name, part in block.named_buffers():
            if r == 0:
                setattr(layer, name, torch.empty((out, *part.shape[1:]), dtype=part.dtype, device=part.device))
            layer.get_buffer(name)[r:r + step] = part
    return layer


def _build_parts(source: nn.Module, config: PartsConfig, segments) -> PartsLinear:
    """PartsLinear.from_float of the source weight, one part (and within it a block of rows) at a time."""
    with torch.device("meta"):
        layer = PartsLinear(source.in_features, source.out_features, config, segments)
    start = 0
    for i, (c, n) in enumerate(zip(config.configs(), layer.segments)):
        if c is None:
            part = nn.Linear(source.in_features, n, bias=False, device="meta")
            part.weight = nn.Parameter(_source_rows(source, start, start + n), requires_grad=False)
        else:
            part = _build_rows(scheme_spec(c).layer, source, c, start, start + n)
        layer.parts[i] = part
        start += n
    return layer


def _selected(model: Transformer, recipe: Recipe,
              layer_filter: LayerFilter | None) -> Iterator[tuple[str, nn.Module, QuantConfig]]:
    """(name, source layer, config) of every source layer the recipe quantizes. Modules are looked up by name as
    the walk goes (not listed up front), so a layer replaced earlier is no longer held."""
    for name in _layer_names(model, _source_layers(model)):
        module = model.get_submodule(name)
        if layer_filter is not None and not layer_filter(name, module):
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
    """Swap every selected source layer for the quantized layer `build` returns."""
    cfg = model.cfg
    _check_shapes(model, recipe, layer_filter)
    built = set()
    for name, module, config in _selected(model, recipe, layer_filter):
        _set_module(model, name, build(name, module, config))
        built.add(name)
        del module  # the source layer: freed now, not at the end of the walk
    if getattr(model, "packed_source", False) and layer_filter is None:
        _unpack_layers(model, skip=built)  # what the recipe keeps in full precision
    head = model.lm_head
    if cfg.tie_embeddings:
        # One table serves both the head and the embedding lookups: the embedding follows the head's format
        # (and stays full precision when the head does).
        if isinstance(head, QuantizedLinear):
            model.embed = QuantizedEmbedding(head)
        elif isinstance(model.embed, QuantizedEmbedding):  # a packed source's table; the head is fp32 now
            model.embed = _embedding(head.weight)
    elif recipe.embed is not None and (layer_filter is None or layer_filter("embed", model.embed)):
        if isinstance(model.embed, QuantizedEmbedding):  # a packed source's table: the source itself
            table = model.embed.table
        else:
            table = Linear(cfg.dim, cfg.vocab_size, bias=False, device="meta")
            table.weight = model.embed.weight
        model.embed = QuantizedEmbedding(build("embed", table, recipe.embed))
    elif isinstance(model.embed, QuantizedEmbedding) and getattr(model, "packed_source", False):
        model.embed = _embedding(_embedding_table(model.embed))  # the recipe keeps the table in full precision
    return model


def _embedding(table: torch.Tensor | nn.Parameter) -> nn.Embedding:
    """An nn.Embedding holding `table` itself (a Parameter is shared, as a tied head's is)."""
    embed = nn.Embedding(table.shape[0], table.shape[1], device="meta")
    embed.weight = table if isinstance(table, nn.Parameter) else nn.Parameter(table, requires_grad=False)
    return embed


def _embedding_table(embed: nn.Module) -> torch.Tensor:
    return embed.table.dequantize().float() if isinstance(embed, QuantizedEmbedding) else embed.weight


def _unpack_layers(model: Transformer, skip: set[str] = frozenset()) -> None:
    """Every packed layer of a packed source (but `skip`) as an fp32 Linear, one layer at a time."""
    for name in _layer_names(model, (QuantizedLinear,)):
        if name in skip:
            continue
        module = model.get_submodule(name)
        weight = source_weight(module)
        lin = Linear(module.in_features, module.out_features, bias=False, device="meta")
        lin.weight = nn.Parameter(weight, requires_grad=False)
        if len(module.segments) > 1:
            lin.segments = module.segments
        _set_module(model, name, lin)
        del module


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
    if getattr(model, "quant_recipe", None) is not None and not getattr(model, "packed_source", False):
        raise LigeroError("this model is already quantized; start from the full-precision model")
    _check_shapes(model, recipe, filter)  # before any long step
    if recipe.needs_calibration and not calibration:
        raise LigeroError(f"scheme '{recipe.name or recipe.weights.kind}' needs calibration data; pass token "
                          "windows (CLI: --calib-windows N with N > 0, or --calib-text FILE)")
    calibrates = any(scheme_spec(c).calibrates(c) for c in recipe.layer_configs())
    stats = input_absmax(model, calibration) if calibrates else {}  # statistics of the full-precision model
    if recipe.weights is not None and (prepass := scheme_spec(recipe.weights).prepass) is not None:
        if getattr(model, "packed_source", False):
            unpack(model)  # learned rounding trains against the fp32 model: this one needs the fp32 copy
        prepass(model, recipe.weights, calibration, filter)  # swaps in the block linears it learned

    def build(name: str, lin: nn.Module, c: QuantConfig) -> QuantizedLinear:
        spec = scheme_spec(c)
        segments = getattr(lin, "segments", None)
        if spec.calibrates(c):  # a calibrated format sees the whole weight
            extra = {"act_max": stats.get(name)} if spec.calibrates(c) else {}
            return spec.layer.from_float(source_weight(lin), c, segments, **extra)
        if isinstance(c, PartsConfig):
            return _build_parts(lin, c, segments)
        return _build_rows(spec.layer, lin, c, 0, lin.out_features, segments)

    _replace(model, recipe, filter, build)
    set_kv_quant(model, recipe)
    model.quant_recipe = recipe
    model.packed_source = False
    return model


class BiasedLinear(nn.Module):
    """A quantized layer plus the full-precision bias its source had (the block linears have none; a projector does)."""

    def __init__(self, layer: QuantizedLinear, bias: torch.Tensor):
        super().__init__()
        self.layer = layer
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.register_buffer("bias", bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x) + self.bias.to(x.dtype)


def quantize_linear(linear: nn.Linear, config: QuantConfig) -> nn.Module:
    """One full-precision linear layer outside a Transformer (a vision projector, say) in `config`'s packed format.
    Formats that calibrate on activations or learn their rounding need the model around the layer: refused."""
    spec = scheme_spec(config)
    if spec.calibrates(config) or spec.prepass is not None:
        raise LigeroError(f"{config.kind} calibrates on a model's activations; quantize a lone layer with a "
                          "weight-only scheme (int8, int4, ...)")
    if linear.in_features % spec.input_multiple(config):
        raise LigeroError(f"{config.kind} needs in_features divisible by {spec.input_multiple(config)} (got "
                          f"{linear.in_features})")
    layer = spec.layer.from_float(linear.weight.detach().float(), config, None)
    return layer if linear.bias is None else BiasedLinear(layer, linear.bias)


def unpack(model: Transformer) -> Transformer:
    """A packed source in full precision, in place (every packed layer dequantized to an fp32 Linear)."""
    if not getattr(model, "packed_source", False):
        return model
    _unpack_layers(model)
    if model.cfg.tie_embeddings:
        model.embed = _embedding(model.lm_head.weight)
    elif isinstance(model.embed, QuantizedEmbedding):
        model.embed = _embedding(_embedding_table(model.embed))
    model.quant_recipe, model.packed_source = None, False
    model.kv_format = FULL_PRECISION_KV
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
    """Hold every layer that has a compact form in that form only (4-bit codes, and Q8_0 with int8 activations:
    the decode kernel's x8 layout, the row-major form rebuilt on demand; see modules.CompactForm): the as-shipped
    GGUF load, where the model's size is the point. In-place edits of such a layer's row-major tensors (`packed`,
    `q`, `scale` ...) would edit a rebuilt copy: assign them instead. Returns the number of layers compacted."""
    return sum(1 for m in model.modules() if isinstance(m, (IntGroupLinear, Int8Linear)) and m.compact())
