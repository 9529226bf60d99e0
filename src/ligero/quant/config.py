"""Quantization configs: validated, versioned dataclasses that serialize to JSON, and recipes built from them.

A config describes one format for one kind of tensor. A Recipe says which config applies where: the
transformer-block linears get the scheme's config; the output head and the embedding stay at 8-bit or better
by default; name patterns can override single layers.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ligero.errors import LigeroError

CONFIG_TYPES: dict[str, type["QuantConfig"]] = {}


def register_config(cls):
    CONFIG_TYPES[cls.kind] = cls
    return cls


@dataclass(frozen=True)
class QuantConfig:
    kind: ClassVar[str] = ""
    version: ClassVar[int] = 1

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        pass

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "version": self.version, **dataclasses.asdict(self)}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "QuantConfig":
        d = dict(d)
        kind, version = d.pop("kind", None), d.pop("version", 1)
        if kind not in CONFIG_TYPES:
            raise LigeroError(f"unknown quantization config kind '{kind}'; known: {', '.join(CONFIG_TYPES)}")
        cls = CONFIG_TYPES[kind]
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}  # JSON lists back to tuples
        if version > cls.version:
            raise LigeroError(f"config '{kind}' has version {version}, newer than this Ligero ({cls.version}); upgrade")
        return cls(**d)


@register_config
@dataclass(frozen=True)
class Int8WeightConfig(QuantConfig):
    """int8 weights, symmetric, one scale per output channel (block = the whole input row)."""

    kind: ClassVar[str] = "int8_weight"


INT4_GROUP_SIZES = (32, 64, 128, 256)


def check_group_size(group_size: int) -> None:
    if group_size not in INT4_GROUP_SIZES:
        raise LigeroError(f"invalid group size {group_size}; use one of {', '.join(map(str, INT4_GROUP_SIZES))}")


@register_config
@dataclass(frozen=True)
class Int4WeightConfig(QuantConfig):
    """int4 weights, asymmetric (scale and minimum in fp16 per group of `group_size` inputs), round-to-nearest."""

    kind: ClassVar[str] = "int4_weight"
    group_size: int = 32
    bits: int = 4  # 3: the int3 grid, stored 8 codes in 3 bytes

    def validate(self) -> None:
        if self.bits not in (2, 3, 4):
            raise LigeroError(f"group-wise integer weights support 2, 3 or 4 bits, got {self.bits}")
        check_group_size(self.group_size)


@register_config
@dataclass(frozen=True)
class FP8Config(QuantConfig):
    """FP8 weights with one fp32 scale per output channel; optionally FP8 activations with a per-token scale."""

    kind: ClassVar[str] = "fp8"
    fmt: str = "e4m3"
    activations: bool = True

    def validate(self) -> None:
        if self.fmt not in ("e4m3", "e5m2"):
            raise LigeroError(f"unknown FP8 format '{self.fmt}'; use e4m3 or e5m2")


@register_config
@dataclass(frozen=True)
class FP4Config(QuantConfig):
    """E2M1 weights in MX (block 32, power-of-two E8M0 scale) or NVFP4 (block 16, E4M3 scale, fp32 tensor scale)
    form; with activations=True the inputs are quantized per token in the same format (W4A4)."""

    kind: ClassVar[str] = "fp4"
    fmt: str = "nvfp4"
    activations: bool = False

    def validate(self) -> None:
        if self.fmt not in ("mxfp4", "nvfp4"):
            raise LigeroError(f"unknown FP4 format '{self.fmt}'; use mxfp4 or nvfp4")


@register_config
@dataclass(frozen=True)
class TernaryConfig(QuantConfig):
    """BitNet b1.58: weights in {-1, 0, 1} x one absmean scale per tensor (q, k, v, gate, up kept separate
    inside fused projections), int8 per-token absmax activations. Stored 5 trits per byte (1.6 bits/weight)."""

    kind: ClassVar[str] = "ternary"


@register_config
@dataclass(frozen=True)
class W8A8Config(QuantConfig):
    """int8 weights per output channel x int8 activations per token (dynamic). With `smooth_alpha`, SmoothQuant
    moves activation outliers into the weights: s_j = max|X_j|^a / max|W_j|^(1-a) per input channel, calibrated."""

    kind: ClassVar[str] = "w8a8"
    smooth_alpha: float | None = 0.5

    def validate(self) -> None:
        if self.smooth_alpha is not None and not 0.0 <= self.smooth_alpha <= 1.0:
            raise LigeroError(f"SmoothQuant alpha must be in [0, 1], got {self.smooth_alpha}")

    @property
    def needs_calibration(self) -> bool:
        return self.smooth_alpha is not None


@register_config
@dataclass(frozen=True)
class AdaRoundConfig(QuantConfig):
    """Learned rounding (AdaRound) for group-wise int4/int3 weights, layer by layer on calibration data.
    The result is stored like round-to-nearest int (same scales and minimums, other rounding choices)."""

    kind: ClassVar[str] = "adaround"
    bits: int = 4
    group_size: int = 128
    iters: int = 150
    batch_tokens: int = 256
    lr: float = 1e-2
    reg_weight: float = 0.01  # lambda of the rounding regularizer
    warmup: float = 0.2  # fraction of iterations without the regularizer
    beta: tuple[float, float] = (20.0, 2.0)
    seed: int = 0

    def validate(self) -> None:
        if self.bits not in (3, 4):
            raise LigeroError(f"AdaRound supports 3 or 4 bits, got {self.bits}")
        check_group_size(self.group_size)
        if self.iters < 1 or self.batch_tokens < 1:
            raise LigeroError("AdaRound needs iters >= 1 and batch_tokens >= 1")

    @property
    def needs_calibration(self) -> bool:
        return True


@register_config
@dataclass(frozen=True)
class LSQConfig(QuantConfig):
    """Learned Step size Quantization: symmetric int weights with a learned step per group, trained together
    with the weights by distillation from the full-precision model on the calibration split."""

    kind: ClassVar[str] = "lsq"
    bits: int = 4
    group_size: int = 128
    steps: int = 60
    lr_step: float = 1e-2  # Adam, on log(step / initial step) and on offsets in initial steps
    lr_weight: float = 1e-5
    seed: int = 0
    act_int8: bool = False  # also quantize activations per token to int8 (trained with the STE)
    learn_offset: bool = True  # LSQ+: asymmetric grid with a learned offset, initialised at round-to-nearest

    def validate(self) -> None:
        if self.bits not in (2, 3, 4):
            raise LigeroError(f"LSQ supports 2, 3 or 4 bits, got {self.bits}")
        check_group_size(self.group_size)
        if self.steps < 1:
            raise LigeroError("LSQ needs at least one training step")

    @property
    def needs_calibration(self) -> bool:
        return True


@register_config
@dataclass(frozen=True)
class KVQuantConfig(QuantConfig):
    """KV cache at `bits` bits (KIVI): keys per channel, values per token, groups of `group_size`, the newest
    `residual` tokens in full precision."""

    kind: ClassVar[str] = "kv"
    bits: int = 4
    group_size: int = 32
    residual: int = 128

    def validate(self) -> None:
        if not 2 <= self.bits <= 16:
            raise LigeroError(f"KV-cache bits must be between 2 and 16, got {self.bits}")
        if self.group_size < 1 or self.residual < 0:
            raise LigeroError("KV-cache group size must be >= 1 and the residual >= 0")


@dataclass
class Recipe:
    """Which config applies to which tensors of a model. None = keep that tensor in full precision."""

    weights: QuantConfig | None
    head: QuantConfig | None = field(default_factory=Int8WeightConfig)
    embed: QuantConfig | None = field(default_factory=Int8WeightConfig)
    overrides: list[tuple[str, QuantConfig | None]] = field(default_factory=list)  # (fnmatch pattern, config)
    name: str = ""
    kv: QuantConfig | None = None  # KVQuantConfig
    version: ClassVar[int] = 1

    @property
    def needs_calibration(self) -> bool:
        configs = [self.weights, self.head, self.embed] + [c for _, c in self.overrides]
        return any(getattr(c, "needs_calibration", False) for c in configs if c is not None)

    def config_for(self, module_name: str) -> QuantConfig | None:
        for pattern, cfg in self.overrides:
            if fnmatch.fnmatchcase(module_name, pattern):
                return cfg
        if module_name == "lm_head":
            return self.head
        return self.weights

    def to_dict(self) -> dict[str, Any]:
        as_d = lambda c: c.to_dict() if c is not None else None  # noqa: E731
        return {"version": self.version, "name": self.name, "weights": as_d(self.weights), "head": as_d(self.head),
                "embed": as_d(self.embed), "overrides": [[p, as_d(c)] for p, c in self.overrides],
                "kv": as_d(self.kv)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Recipe":
        if d.get("version", 1) > cls.version:
            raise LigeroError("the recipe was written by a newer Ligero; upgrade to load it")
        as_c = lambda x: QuantConfig.from_dict(x) if x is not None else None  # noqa: E731
        return cls(weights=as_c(d["weights"]), head=as_c(d.get("head")), embed=as_c(d.get("embed")),
                   overrides=[(p, as_c(c)) for p, c in d.get("overrides", [])], name=d.get("name", ""),
                   kv=as_c(d.get("kv")))


def _int4(group_size: int) -> Recipe:
    return Recipe(Int4WeightConfig(group_size))


# CLI scheme names -> recipe builders. Each takes the options the scheme understands.
SCHEMES: dict[str, Any] = {
    "int8": lambda group_size=None: Recipe(Int8WeightConfig()),
    "int4": lambda group_size=None: _int4(group_size or 32),
    "fp8": lambda group_size=None: Recipe(FP8Config("e4m3")),
    "fp8-e5m2": lambda group_size=None: Recipe(FP8Config("e5m2")),
    "mxfp4": lambda group_size=None: Recipe(FP4Config("mxfp4")),
    "nvfp4": lambda group_size=None: Recipe(FP4Config("nvfp4")),
    "mxfp4-w4a4": lambda group_size=None: Recipe(FP4Config("mxfp4", activations=True)),
    "nvfp4-w4a4": lambda group_size=None: Recipe(FP4Config("nvfp4", activations=True)),
    "b158": lambda group_size=None: Recipe(TernaryConfig()),
    "w8a8": lambda group_size=None: Recipe(W8A8Config(0.5)),
    "w8a8-naive": lambda group_size=None: Recipe(W8A8Config(None)),
    "adaround": lambda group_size=None: Recipe(AdaRoundConfig(4, group_size or 128)),
    "adaround-int3": lambda group_size=None: Recipe(AdaRoundConfig(3, group_size or 128)),
    "int3": lambda group_size=None: Recipe(Int4WeightConfig(group_size or 128, bits=3)),
    "lsq": lambda group_size=None: Recipe(LSQConfig(4, group_size or 128)),
    "lsq-int3": lambda group_size=None: Recipe(LSQConfig(3, group_size or 128)),
    "lsq-int2": lambda group_size=None: Recipe(LSQConfig(2, group_size or 128)),
    "lsq-w4a8": lambda group_size=None: Recipe(LSQConfig(4, group_size or 128, act_int8=True)),
}
GROUPED_SCHEMES = {"int4", "int3", "adaround", "adaround-int3", "lsq", "lsq-int3", "lsq-int2", "lsq-w4a8"}


KV_SCHEMES = {"kv2": 2, "kv3": 3, "kv4": 4}


def recipe_for(scheme: str, group_size: int | None = None) -> Recipe:
    """A CLI scheme name -> Recipe. Weight and KV schemes combine with '+', e.g. int4+kv3."""
    parts = scheme.split("+")
    weight_parts, kv_parts = [p for p in parts if p not in KV_SCHEMES], [p for p in parts if p in KV_SCHEMES]
    valid = ", ".join(list(SCHEMES) + list(KV_SCHEMES))
    if len(weight_parts) > 1 or len(kv_parts) > 1 or not parts or "" in parts:
        raise LigeroError(f"cannot combine '{scheme}': use one weight scheme and/or one KV scheme, e.g. int4+kv3; "
                          f"valid schemes: {valid}")
    for p in weight_parts:
        if p not in SCHEMES:
            raise LigeroError(f"unknown scheme '{p}'; valid schemes: {valid}")
        if group_size is not None and p not in GROUPED_SCHEMES:
            raise LigeroError(f"scheme '{p}' has a fixed block size; --group-size applies to: {', '.join(GROUPED_SCHEMES)}")
    recipe = SCHEMES[weight_parts[0]](group_size=group_size) if weight_parts else Recipe(None, head=None, embed=None)
    if kv_parts:
        recipe.kv = KVQuantConfig(bits=KV_SCHEMES[kv_parts[0]])
    recipe.name = scheme if group_size is None else f"{scheme}-g{group_size}"
    return recipe
