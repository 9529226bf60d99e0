"""Quantization: configs and the scheme registry (config), packed layers (modules), quantize() (api)."""

from ligero.quant import schemes as _builtin_schemes  # noqa: F401  registers the built-in schemes on import
