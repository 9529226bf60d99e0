"""Model configuration: every per-architecture difference is a field here, not a fork of the model code.

Families covered: Llama (SmolLM2, TinyLlama), Mistral (Llama + sliding window on every layer) and Gemma 3
(5 local : 1 global layers, two RoPE bases, QK-norm, sandwich norms, (1 + w) RMSNorm, scaled embeddings, GeGLU).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from ligero.errors import LigeroError

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "gemma3")
GLOBAL, LOCAL = "global", "local"


@dataclass
class ModelConfig:
    arch: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    max_seq_len: int = 2048
    norm_eps: float = 1e-5
    norm_offset: float = 0.0  # Gemma scales by (1 + w): offset 1.0
    activation: str = "silu"  # "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    qk_norm: bool = False
    post_norms: bool = False  # Gemma 3: norms after attention and after the FFN, before the residual add
    embed_scale: bool = False  # Gemma: embeddings multiplied by sqrt(dim)
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_theta_local: float | None = None  # RoPE base of sliding-window layers (Gemma 3: 1e4); None = rope_theta
    rope_scaling_factor: float = 1.0  # linear position interpolation on global layers
    sliding_window: int | None = None  # W keys including the current token
    layer_types: list[str] = field(default_factory=list)  # "global" or "local" per layer
    attn_scale: float | None = None  # None = 1/sqrt(head_dim)
    final_logit_softcap: float | None = None

    def __post_init__(self) -> None:
        if not self.layer_types:
            self.layer_types = [GLOBAL] * self.n_layers
        self.validate()

    def validate(self) -> None:
        if self.arch not in SUPPORTED_ARCHITECTURES:
            raise LigeroError(
                f"architecture '{self.arch}' is not supported; use one of: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.n_heads % self.n_kv_heads:
            raise LigeroError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if len(self.layer_types) != self.n_layers or set(self.layer_types) - {GLOBAL, LOCAL}:
            raise LigeroError(f"layer_types must list '{GLOBAL}' or '{LOCAL}' for each of {self.n_layers} layers")
        if LOCAL in self.layer_types and not self.sliding_window:
            raise LigeroError("local (sliding-window) layers need sliding_window > 0")
        if self.activation not in ("silu", "gelu_tanh"):
            raise LigeroError(f"activation '{self.activation}' is not supported; use silu or gelu_tanh")

    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else 1.0 / math.sqrt(self.head_dim)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def n_params(self, count_tied_head: bool = False) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.dim * self.ffn_dim
        norms = self.dim * (4 if self.post_norms else 2) + (2 * self.head_dim if self.qk_norm else 0)
        embed = self.vocab_size * self.dim
        head = embed if (count_tied_head or not self.tie_embeddings) else 0
        return self.n_layers * (attn + mlp + norms) + embed + head + self.dim


def _rope_from_hf(hf: dict[str, Any], kind: str | None = None) -> tuple[float | None, float]:
    """(theta, linear factor) from either the old (rope_theta + rope_scaling) or new (rope_parameters) layout."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and kind is not None and kind in params:
        params = params[kind]
    scaling = hf.get("rope_scaling") if params is None else params
    theta = (params or {}).get("rope_theta", hf.get("rope_theta"))
    factor = 1.0
    if scaling:
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type == "linear":
            factor = float(scaling["factor"])
        elif rope_type != "default":
            raise LigeroError(f"RoPE scaling type '{rope_type}' is not supported; supported: default, linear")
    return (float(theta) if theta is not None else None), factor


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Translate a Hugging Face config.json (Llama, Mistral, Gemma 3 text) into a ModelConfig."""
    model_type = hf.get("model_type", "")
    if model_type == "gemma3":  # multimodal wrapper: the decoder lives in text_config
        hf = {**hf["text_config"], "model_type": "gemma3_text"}
        model_type = "gemma3_text"
    dim, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    common = dict(
        vocab_size=hf["vocab_size"],
        dim=dim,
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or dim // n_heads,
        ffn_dim=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise LigeroError("attention or MLP biases are not supported by Ligero's runtime")
    if model_type in ("llama", "mistral"):
        if hf.get("hidden_act", "silu") != "silu":
            raise LigeroError(f"activation '{hf.get('hidden_act')}' is not supported for {model_type}")
        theta, factor = _rope_from_hf(hf)
        window = hf.get("sliding_window") if model_type == "mistral" else None
        n = common["n_layers"]
        return ModelConfig(
            arch=model_type,
            rope_theta=theta or 10000.0,
            rope_scaling_factor=factor,
            sliding_window=window,
            layer_types=[LOCAL if window else GLOBAL] * n,
            **common,
        )
    if model_type == "gemma3_text":
        n = common["n_layers"]
        layer_types = hf.get("layer_types") or [
            "full_attention" if (i + 1) % hf.get("sliding_window_pattern", 6) == 0 else "sliding_attention"
            for i in range(n)
        ]
        theta, factor = _rope_from_hf(hf, "full_attention")
        theta_local, _ = _rope_from_hf(hf, "sliding_attention")
        if "rope_parameters" not in hf:
            theta_local = hf.get("rope_local_base_freq", 10000.0)
        if hf.get("attn_logit_softcapping"):
            raise LigeroError("attention logit soft-capping is not supported")
        return ModelConfig(
            arch="gemma3",
            norm_offset=1.0,
            activation="gelu_tanh",
            qk_norm=True,
            post_norms=True,
            embed_scale=True,
            rope_theta=theta or 1_000_000.0,
            rope_theta_local=theta_local or 10000.0,
            rope_scaling_factor=factor,
            sliding_window=hf.get("sliding_window", 4096),
            layer_types=[GLOBAL if t == "full_attention" else LOCAL for t in layer_types],
            attn_scale=hf.get("query_pre_attn_scalar", common["head_dim"]) ** -0.5,
            final_logit_softcap=hf.get("final_logit_softcapping"),
            **common,
        )
    raise LigeroError(
        f"Hugging Face model_type '{model_type}' is not supported; supported: llama, mistral, gemma3_text"
    )


def config_from_gguf(meta: dict[str, Any], vocab_size: int) -> ModelConfig:
    """Translate GGUF metadata (llama.cpp key names) into a ModelConfig."""
    arch = meta.get("general.architecture")
    if arch not in ("llama", "gemma3"):
        raise LigeroError(
            f"GGUF architecture '{arch}' is not supported; Ligero reads llama and gemma3 GGUF files"
        )

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    dim, n_heads = int(get("embedding_length")), int(get("attention.head_count"))
    n_kv = get("attention.head_count_kv", n_heads)
    head_dim = int(get("attention.key_length", get("rope.dimension_count", dim // n_heads)))
    n_layers = int(get("block_count"))
    common = dict(
        vocab_size=int(get("vocab_size", vocab_size)),
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=int(n_kv),
        head_dim=head_dim,
        ffn_dim=int(get("feed_forward_length")),
        max_seq_len=int(get("context_length", 2048)),
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
    )
    factor = 1.0
    if get("rope.scaling.type") not in (None, "none"):
        if get("rope.scaling.type") != "linear":
            raise LigeroError(f"GGUF RoPE scaling '{get('rope.scaling.type')}' is not supported")
        factor = float(get("rope.scaling.factor", 1.0))
    if arch == "llama":
        window = get("attention.sliding_window")
        return ModelConfig(
            arch="mistral" if window else "llama",
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling_factor=factor,
            sliding_window=int(window) if window else None,
            layer_types=[LOCAL if window else GLOBAL] * n_layers,
            **common,
        )
    pattern = 6  # llama.cpp's Gemma 3: every 6th layer is global
    return ModelConfig(
        arch="gemma3",
        norm_offset=1.0,
        activation="gelu_tanh",
        qk_norm=True,
        post_norms=True,
        embed_scale=True,
        rope_theta=float(get("rope.freq_base", 1_000_000.0)),
        rope_theta_local=float(get("rope.freq_base_swa", 10000.0)),
        rope_scaling_factor=factor,
        sliding_window=int(get("attention.sliding_window", 512)),
        layer_types=[GLOBAL if (i + 1) % pattern == 0 else LOCAL for i in range(n_layers)],
        attn_scale=head_dim**-0.5,
        **common,
    )


def _llama(**kw) -> ModelConfig:
    return ModelConfig(arch="llama", **kw)


# Reference configurations of the families Ligero targets (shapes only; weights come from files).
PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "smollm2-135m": lambda: _llama(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
                                   ffn_dim=1536, max_seq_len=8192, rope_theta=100000.0, tie_embeddings=True),
    "tinyllama-1.1b": lambda: _llama(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4,
                                     head_dim=64, ffn_dim=5632, max_seq_len=2048),
    "mistral-7b": lambda: ModelConfig(arch="mistral", vocab_size=32000, dim=4096, n_layers=32, n_heads=32,
                                      n_kv_heads=8, head_dim=128, ffn_dim=14336, max_seq_len=32768,
                                      sliding_window=4096, layer_types=[LOCAL] * 32),
    "gemma3-270m": lambda: ModelConfig(arch="gemma3", vocab_size=262144, dim=640, n_layers=18, n_heads=4,
                                       n_kv_heads=1, head_dim=256, ffn_dim=2048, max_seq_len=32768, norm_eps=1e-6,
                                       norm_offset=1.0, activation="gelu_tanh", qk_norm=True, post_norms=True,
                                       embed_scale=True, tie_embeddings=True, rope_theta=1e6, rope_theta_local=1e4,
                                       sliding_window=512, attn_scale=256**-0.5,
                                       layer_types=[GLOBAL if (i + 1) % 6 == 0 else LOCAL for i in range(18)]),
}
