"""Quantization configs and the scheme registry: validated, versioned dataclasses that serialize to JSON, recipes
built from them, and the scheme names users type.

A config describes one format for one kind of tensor. `register_scheme` declares, once per config class, the
quantized layer that stores it, its learning pre-pass if it has one, its shape rule, whether it calibrates and
whether it is grouped; `register_named_scheme` gives a config a scheme name ("int4"). The built-in schemes are
registered in ligero.quant.schemes (imported with the package). A Recipe says which config applies where: the
transformer-block linears get the scheme's config; the output head and the embedding stay at 8-bit or better by
default; name patterns can override single layers.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from ligero.errors import LigeroError

if TYPE_CHECKING:  # annotations only: the layers are built on top of these configs
    from ligero.quant.modules import QuantizedLinear

BASELINE = "fp32"  # the name of the unquantized model, wherever a scheme name is expected

CONFIG_TYPES: dict[str, type["QuantConfig"]] = {}  # kind -> config class, for reading configs back from JSON


def register_config(cls):
    """Make a config readable from JSON by its kind (register_scheme does this for weight configs)."""
    known = CONFIG_TYPES.get(cls.kind)
    if known is not None and known is not cls:
        raise ValueError(f"config kind '{cls.kind}' is already registered for {known.__name__}")
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
        try:
            return cls(**d)
        except TypeError:
            raise LigeroError(f"config '{kind}' has unknown fields {sorted(d)}; it was not written by this "
                              "Ligero, re-create it") from None


def _never(_config: QuantConfig) -> bool:
    return False


@dataclass(frozen=True)
class SchemeSpec:
    """What quantize() and loading know about one config class; see register_scheme."""

    config: type[QuantConfig]
    layer: type["QuantizedLinear"]
    prepass: Callable[..., Any] | None = None
    in_features_multiple: int | Callable[[QuantConfig], int] = 1
    calibrates: Callable[[QuantConfig], bool] = _never
    grouped: bool = False
    resolve: Callable[..., "Recipe"] | None = None

    def needs_calibration(self, config: QuantConfig) -> bool:
        return self.prepass is not None or self.calibrates(config)

    def input_multiple(self, config: QuantConfig) -> int:
        """What every input width must be a multiple of for this config."""
        m = self.in_features_multiple
        return m(config) if callable(m) else m


SCHEME_SPECS: dict[str, SchemeSpec] = {}  # config kind -> spec


def register_scheme(config: type[QuantConfig], *, layer: type["QuantizedLinear"],
                    prepass: Callable[..., Any] | None = None,
                    in_features_multiple: int | Callable[[QuantConfig], int] = 1,
                    calibrates: bool | Callable[[QuantConfig], bool] = False,
                    grouped: bool = False, resolve: Callable[..., "Recipe"] | None = None) -> type[QuantConfig]:
    """Register a weight format: `config` is stored by `layer` (a QuantizedLinear: `layer.from_float(weight, config,
    segments)` quantizes, `layer(in, out, config, segments)` builds it empty for loading).

    prepass(model, config, calibration, layer_filter): a learned scheme's step that replaces the block linears
    itself, on calibration windows, before the other layers are quantized (AdaRound, LSQ).
    in_features_multiple: layers whose input width is not a multiple of it (or of what it returns for the config)
    cannot take this format.
    calibrates: True (or a test of the config) when the layer is built from activation statistics of the
    calibration windows: then from_float also gets `act_max`, the per-input-channel max |x|.
    grouped: the config has a `group_size` field that --group-size sets.
    resolve(recipe, model): for configs whose layers' formats depend on the model (llama.cpp's mixes), the recipe
    with explicit per-layer configs, made before quantizing (and saved with the model instead of the original).
    """
    register_config(config)
    test = calibrates if callable(calibrates) else (lambda _c: True) if calibrates else _never
    SCHEME_SPECS[config.kind] = SchemeSpec(config, layer, prepass, in_features_multiple, test, grouped, resolve)
    return config


def scheme_spec(config: QuantConfig) -> SchemeSpec:
    spec = SCHEME_SPECS.get(config.kind)
    if spec is None or not isinstance(config, spec.config):
        raise LigeroError(f"no quantized layer is registered for {type(config).__name__}; register it with "
                          "ligero.quant.config.register_scheme")
    return spec


def needs_calibration(config: QuantConfig) -> bool:
    """Whether quantizing with `config` needs calibration windows (configs without a layer, like KV, do not)."""
    spec = SCHEME_SPECS.get(config.kind)
    return spec is not None and spec.needs_calibration(config)


@dataclass(frozen=True)
class Int8WeightConfig(QuantConfig):
    """int8 weights, symmetric: one fp32 scale per output channel (`group_size` None: the block is the whole input
    row), or one fp16 scale per 32 inputs (`group_size` 32: GGUF Q8_0's format, read from GGUF files as it is).
    `act_int8_blocks` rounds the activations to int8 per 32 inputs before the product (llama.cpp's Q8_0 x Q8_0
    arithmetic): byte products in integers instead of fp32, a small quality cost (docs/quantization.md). Both need
    inputs in multiples of 32."""

    kind: ClassVar[str] = "int8_weight"
    act_int8_blocks: bool = False
    group_size: int | None = None

    def validate(self) -> None:
        if self.group_size not in (None, 32):
            raise LigeroError(f"int8 takes a scale per row (no group size) or per 32 inputs, got {self.group_size}")

    @property
    def blocks_of_32(self) -> bool:
        """Whether input widths must be multiples of 32."""
        return self.act_int8_blocks or self.group_size is not None


GROUP_SIZES = (32, 64, 128, 256)


def check_group_size(group_size: int) -> None:
    if group_size not in GROUP_SIZES:
        raise LigeroError(f"invalid group size {group_size}; use one of {', '.join(map(str, GROUP_SIZES))}")


@dataclass(frozen=True)
class IntGroupConfig(QuantConfig):
    """Group-wise integer weights (2, 3 or 4 bits): scale and minimum in fp16 per group of `group_size` inputs,
    round-to-nearest, asymmetric (Q4_1's grid) or symmetric (Q4_0's). `act_int8_blocks` rounds the activations
    to int8 per 32 inputs before the product (as llama.cpp's Q4 x Q8_0 dot product does): about half the
    kernel's integer work, a small quality cost (docs/quantization.md). The kind keeps its first name, from
    when it held only int4."""

    kind: ClassVar[str] = "int4_weight"
    group_size: int = 32
    bits: int = 4  # 2 or 3: stored densely, 8 codes in `bits` bytes
    symmetric: bool = False
    act_int8_blocks: bool = False

    def validate(self) -> None:
        if self.bits not in (2, 3, 4):
            raise LigeroError(f"group-wise integer weights support 2, 3 or 4 bits, got {self.bits}")
        check_group_size(self.group_size)


# llama.cpp's block types held as stored (quant/ggml.py); Q8_0 / Q4_0 / Q4_1 have layers of their own (int8, int4)
GGML_TYPES = ("Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


@dataclass(frozen=True)
class GGMLConfig(QuantConfig):
    """Weights in one of llama.cpp's block formats (`ggml_type`: Q5_0, Q5_1, Q2_K ... Q6_K), stored byte for byte as
    a GGUF file holds them: 32-input blocks for Q5_0 / Q5_1, 256-input super-blocks for the K-quants."""

    kind: ClassVar[str] = "ggml"
    ggml_type: str = "Q4_K"
    # llama.cpp's activations for the type: Q8_K (int8 per 256 inputs) for K-quants, Q8_0 / Q8_1 for Q5_0 / Q5_1
    act_int8_blocks: bool = False

    def validate(self) -> None:
        if self.ggml_type not in GGML_TYPES:
            raise LigeroError(f"unknown GGML block type '{self.ggml_type}'; use one of {', '.join(GGML_TYPES)}")


# llama-quantize's mixes that Ligero reproduces: each sets a GGML type per tensor (quant/ggml_mix.py)
GGML_MIXES = ("Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K")


@dataclass(frozen=True)
class GGMLMixConfig(QuantConfig):
    """A llama.cpp quantization mix (`ftype`: Q4_K_M, Q5_K_M, Q6_K, Q3_K_M, Q2_K), as llama-quantize assigns it:
    a base K-type, more bits for some attn_v / ffn_down / attn_output layers, Q6_K for the output head, and the
    legacy fallback types for layers whose width is not a multiple of 256. Resolved per model into per-layer
    GGMLConfigs when quantizing; the saved recipe holds the resolved layers."""

    kind: ClassVar[str] = "ggml_mix"
    ftype: str = "Q4_K_M"

    def validate(self) -> None:
        if self.ftype not in GGML_MIXES:
            raise LigeroError(f"unknown llama.cpp mix '{self.ftype}'; use one of {', '.join(GGML_MIXES)}")


@dataclass(frozen=True)
class PartsConfig(QuantConfig):
    """A fused projection (q/k/v, gate/up) whose parts are stored in different formats, as a GGUF file may hold
    them (e.g. Q4_K q and k with a Q6_K v): one layer per part, each with its own config (a config dict, or None
    for full precision), outputs side by side."""

    kind: ClassVar[str] = "parts"
    parts: tuple = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "parts", tuple(self.parts))  # JSON gives a list: one form for equality
        super().__post_init__()

    def validate(self) -> None:
        if not self.parts:
            raise LigeroError("a parts config needs at least one part")
        self.configs()  # each part readable

    def configs(self) -> list["QuantConfig | None"]:
        return [None if p is None else QuantConfig.from_dict(p) for p in self.parts]


@dataclass(frozen=True)
class FP8Config(QuantConfig):
    """FP8 weights with one fp32 scale per output channel; optionally FP8 activations with a per-token scale."""

    kind: ClassVar[str] = "fp8"
    fmt: str = "e4m3"
    activations: bool = True

    def validate(self) -> None:
        if self.fmt not in ("e4m3", "e5m2"):
            raise LigeroError(f"unknown FP8 format '{self.fmt}'; use e4m3 or e5m2")


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


@dataclass(frozen=True)
class NF4Config(QuantConfig):
    """4-bit NormalFloat weights (QLoRA): NF4 codes, an absmax scale per group of inputs (64 in the paper),
    double-quantized to E4M3 against one fp32 scale per tensor: 4 + 8 / group bits per weight."""

    kind: ClassVar[str] = "nf4"
    group_size: int = 64

    def validate(self) -> None:
        if self.group_size < 32 or self.group_size % 32:
            raise LigeroError(f"NF4 group size must be a multiple of 32 (the kernels' block), got {self.group_size}")


@dataclass(frozen=True)
class Float16Config(QuantConfig):
    """Weights stored in 16 bits, fp16 or bf16 (a GGUF's F16 / BF16 tensors, a Hugging Face folder's weights), and
    computed in fp32: each weight is widened exactly, products and sums are fp32's. Half the bytes of fp32, the
    same results up to the order of the sums."""

    kind: ClassVar[str] = "float16"
    dtype: str = "f16"
    # Activations rounded to the same 16-bit format first: llama.cpp's CPU backend multiplies F16 / BF16 weights by
    # F16 / BF16 activations (the file as shipped); off, they stay fp32.
    act16: bool = False

    def validate(self) -> None:
        if self.dtype not in ("f16", "bf16"):
            raise LigeroError(f"unknown 16-bit format '{self.dtype}'; use f16 or bf16")


@dataclass(frozen=True)
class TernaryConfig(QuantConfig):
    """BitNet b1.58: weights in {-1, 0, 1} x one absmean scale per tensor (q, k, v, gate, up kept separate
    inside fused projections), int8 per-token absmax activations. Stored 5 trits per byte (1.6 bits/weight)."""

    kind: ClassVar[str] = "ternary"


@dataclass(frozen=True)
class W8A8Config(QuantConfig):
    """int8 weights per output channel x int8 activations per token (dynamic). With `smooth_alpha`, SmoothQuant
    moves activation outliers into the weights: s_j = max|X_j|^a / max|W_j|^(1-a) per input channel, calibrated."""

    kind: ClassVar[str] = "w8a8"
    smooth_alpha: float | None = 0.5

    def validate(self) -> None:
        if self.smooth_alpha is not None and not 0.0 <= self.smooth_alpha <= 1.0:
            raise LigeroError(f"SmoothQuant alpha must be in [0, 1], got {self.smooth_alpha}")



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

    def __post_init__(self) -> None:
        if any(isinstance(c, GGMLMixConfig) for c in [self.head, self.embed, *(c for _, c in self.overrides)]):
            raise LigeroError("a llama.cpp mix (q4_k_m, q6_k, ...) chooses every layer's type itself: give it as the "
                              "recipe's weights, not as its head, embedding or an override")

    def layer_configs(self) -> list[QuantConfig]:
        """Every config this recipe gives a layer (the KV cache's is not one)."""
        configs = [self.weights, self.head, self.embed] + [c for _, c in self.overrides]
        return [c for c in configs if c is not None]

    @property
    def needs_calibration(self) -> bool:
        return any(needs_calibration(c) for c in self.layer_configs())

    def config_for(self, module_name: str) -> QuantConfig | None:
        """The config of a layer: the first override whose pattern matches its name, else the head's, else the
        weights' — except an MoE router (mlp.router), kept in full precision unless an override names it: it is
        tiny, and its rounding would change which experts run."""
        for pattern, cfg in self.overrides:
            if fnmatch.fnmatchcase(module_name, pattern):
                return cfg
        if module_name == "lm_head":
            return self.head
        if module_name.endswith(".mlp.router"):
            return None
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


@dataclass(frozen=True)
class NamedScheme:
    """A scheme name's config: `config(**fields)`, with group_size set by --group-size when the config is grouped."""

    config: type[QuantConfig]
    fields: dict[str, Any]

    def build(self, group_size: int | None) -> QuantConfig:
        return self.config(**{**self.fields, **({"group_size": group_size} if group_size is not None else {})})


NAMED_SCHEMES: dict[str, NamedScheme] = {}  # in the order error messages list them
KV_SCHEMES = {"kv2": 2, "kv3": 3, "kv4": 4}
_GROUP_SUFFIX = re.compile(r"(.+)-g(\d+)")  # int4-g128: how recipe names carry a group size


def register_named_scheme(name: str, config: type[QuantConfig], **fields: Any) -> None:
    """Let users ask for `config(**fields)` by `name` (--scheme, --variant, --variants)."""
    if config.kind not in SCHEME_SPECS:
        raise ValueError(f"register {config.__name__} with register_scheme before naming it")
    if not name or "+" in name or name == BASELINE or name in KV_SCHEMES or _GROUP_SUFFIX.fullmatch(name):
        raise ValueError(f"'{name}' cannot name a scheme (empty, reserved, with '+' or a -g<N> suffix)")
    if name in NAMED_SCHEMES and NAMED_SCHEMES[name] != NamedScheme(config, fields):
        raise ValueError(f"scheme name '{name}' is already registered")
    NAMED_SCHEMES[name] = NamedScheme(config, fields)


def grouped_schemes() -> list[str]:
    return [n for n, s in NAMED_SCHEMES.items() if SCHEME_SPECS[s.config.kind].grouped]


def valid_schemes() -> str:
    return ", ".join(list(NAMED_SCHEMES) + list(KV_SCHEMES))


def _weight_config(part: str, group_size: int | None) -> QuantConfig:
    """The config of one weight scheme name, e.g. int4, or int4-g128 (the group size in the name)."""
    suffix = _GROUP_SUFFIX.fullmatch(part)
    if part not in NAMED_SCHEMES and suffix and suffix[1] in NAMED_SCHEMES:
        if group_size is not None:
            raise LigeroError(f"scheme '{part}' already names its group size; drop --group-size or the -g suffix")
        part, group_size = suffix[1], int(suffix[2])
    if part not in NAMED_SCHEMES:
        raise LigeroError(f"unknown scheme '{part}'; valid schemes: {valid_schemes()}")
    named = NAMED_SCHEMES[part]
    if group_size is not None and not SCHEME_SPECS[named.config.kind].grouped:
        raise LigeroError(f"scheme '{part}' has a fixed block size; a group size (--group-size or -g<N>) applies to: "
                          f"{', '.join(grouped_schemes())}")
    return named.build(group_size)


def recipe_for(scheme: str, group_size: int | None = None) -> Recipe:
    """A scheme name -> Recipe. Weight and KV schemes combine with '+', e.g. int4+kv3."""
    if not scheme.strip():
        raise LigeroError(f"the scheme is empty; valid schemes: {valid_schemes()}")
    parts = scheme.split("+")
    weight_parts, kv_parts = [p for p in parts if p not in KV_SCHEMES], [p for p in parts if p in KV_SCHEMES]
    if len(weight_parts) > 1 or len(kv_parts) > 1 or "" in parts:
        raise LigeroError(f"cannot combine '{scheme}': use one weight scheme and/or one KV scheme, e.g. int4+kv3; "
                          f"valid schemes: {valid_schemes()}")
    if weight_parts:
        weights = _weight_config(weight_parts[0], group_size)
        recipe = Recipe(weights)
        if isinstance(weights, Float16Config):  # 16-bit everywhere: the head and the table too
            recipe.head, recipe.embed = weights, weights
        elif getattr(weights, "act_int8_blocks", False):
            # -a8 schemes round activations to int8 per 32 inputs before every product, the output head's
            # included (its int8 table is a quarter of SmolLM2's int4 decode bytes), as llama.cpp does.
            recipe.head = Int8WeightConfig(act_int8_blocks=True)
    else:
        recipe = Recipe(None, head=None, embed=None)
    if kv_parts:
        recipe.kv = KVQuantConfig(bits=KV_SCHEMES[kv_parts[0]])
    recipe.name = scheme if group_size is None else f"{scheme}-g{group_size}"
    return recipe
