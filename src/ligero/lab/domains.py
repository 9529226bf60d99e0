"""The fine-tuning domains and adaptable layers, by name (a light module: the command line lists them without
importing torch)."""

from ligero.eval.domain import DOMAINS  # noqa: F401 - the built-in domains, listed by the command line

ALL_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")  # attention (q, k, v fused) and MLP projections
