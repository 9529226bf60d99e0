"""Model configuration: every per-architecture difference is a field here, not a fork of the model code.

Families covered: Llama (SmolLM2, TinyLlama), Mistral (Llama + sliding window on every layer), Gemma 3
(5 local : 1 global layers, two RoPE bases, QK-norm, sandwich norms, (1 + w) RMSNorm, scaled embeddings, GeGLU),
and two mixture-of-experts families: Mixtral (Mistral with a top-2 of 8 expert FFN) and Qwen3-MoE (QK-norm,
top-k of many small experts, optional renormalisation of the chosen experts' weights, optional dense layers).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from ligero.errors import LigeroError

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "gemma3", "mixtral", "qwen3_moe")
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
    # Mixture of experts (n_experts > 0): every layer's FFN (but `dense_layers`') is a router choosing
    # n_experts_per_token of n_experts gated MLPs of expert_ffn_dim per token, their outputs weighted by the softmax
    # probabilities of the chosen experts (renormalised to sum to 1 when moe_renormalize: Mixtral; Qwen3-MoE's
    # norm_topk_prob), plus an always-on shared expert of shared_expert_ffn_dim when > 0 (scaled by a sigmoid gate
    # when shared_expert_gate).
    n_experts: int = 0
    n_experts_per_token: int = 0
    expert_ffn_dim: int | None = None  # None = ffn_dim
    moe_renormalize: bool = True
    shared_expert_ffn_dim: int = 0
    shared_expert_gate: bool = False
    dense_layers: list[int] = field(default_factory=list)  # layers of an MoE model with a dense FFN of ffn_dim

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
        if self.n_experts < 0 or (self.n_experts and not 1 <= self.n_experts_per_token <= self.n_experts):
            raise LigeroError(f"experts per token ({self.n_experts_per_token}) must be between 1 and the number of "
                              f"experts ({self.n_experts}); fix num_experts_per_tok / expert_used_count")
        if not self.n_experts and (self.n_experts_per_token or self.dense_layers or self.shared_expert_ffn_dim):
            raise LigeroError("experts per token, dense layers or a shared expert were given without experts; "
                              "set n_experts (num_local_experts / expert_count) or remove them")
        if any(not 0 <= i < self.n_layers for i in self.dense_layers):
            raise LigeroError(f"dense_layers {self.dense_layers} name layers outside 0..{self.n_layers - 1}")

    @property
    def moe_ffn_dim(self) -> int:
        """Hidden width of one expert."""
        return self.expert_ffn_dim or self.ffn_dim

    def is_moe_layer(self, i: int) -> bool:
        return self.n_experts > 0 and i not in self.dense_layers

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
        return self._count_params(self.n_experts, count_tied_head)

    def n_active_params(self, count_tied_head: bool = False) -> int:
        """Parameters one token runs through (an MoE layer's chosen experts only, its router included)."""
        return self._count_params(self.n_experts_per_token, count_tied_head)

    def _count_params(self, experts: int, count_tied_head: bool) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        dense = 3 * self.dim * self.ffn_dim
        moe = experts * 3 * self.dim * self.moe_ffn_dim + self.n_experts * self.dim \
            + 3 * self.dim * self.shared_expert_ffn_dim + (self.dim if self.shared_expert_gate else 0)
        mlp = sum(moe if self.is_moe_layer(i) else dense for i in range(self.n_layers))
        norms = self.dim * (4 if self.post_norms else 2) + (2 * self.head_dim if self.qk_norm else 0)
        embed = self.vocab_size * self.dim
        head = embed if (count_tied_head or not self.tie_embeddings) else 0
        return self.n_layers * (attn + norms) + mlp + embed + head + self.dim


# What makes a Gemma 3 block a Gemma 3 block, whichever file it is read from (Hugging Face or GGUF).
GEMMA3_TRAITS = dict(arch="gemma3", norm_offset=1.0, activation="gelu_tanh", qk_norm=True, post_norms=True,
                     embed_scale=True)
# and "gemma3", whose text_config is a gemma3_text config
HF_MODEL_TYPES = ("llama", "mistral", "gemma3_text", "mixtral", "qwen3_moe")


def _hf_int(hf: dict[str, Any], key: str, default: int | None = None) -> int:
    """A positive whole number from a Hugging Face config (the default when absent or null), or a LigeroError."""
    value = hf.get(key)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LigeroError(f"config.json needs '{key}' as a positive whole number (found {value!r}); "
                          "use the model's complete, unedited config.json")
    return value


def _hf_number(hf: dict[str, Any], key: str, default: float | None) -> float | None:
    """A number (or the default when absent or null) from a Hugging Face config."""
    value = hf.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LigeroError(f"config.json needs '{key}' as a number (found {value!r}); "
                          "use the model's complete, unedited config.json")
    return value


def _rope_from_hf(hf: dict[str, Any], kind: str | None = None) -> tuple[float | None, float]:
    """(theta, linear factor) from either the old (rope_theta + rope_scaling) or new (rope_parameters) layout."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and kind is not None and kind in params:
        params = params[kind]
    scaling = hf.get("rope_scaling") if params is None else params
    if not isinstance(scaling, (dict, type(None))):
        raise LigeroError(f"config.json's RoPE settings must be an object (found {scaling!r}); "
                          "use the model's complete, unedited config.json")
    theta = _hf_number(params or {}, "rope_theta", _hf_number(hf, "rope_theta", None))
    factor = 1.0
    if scaling:
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type == "linear":
            if _hf_number(scaling, "factor", None) is None:
                raise LigeroError("linear RoPE scaling in config.json has no factor; add it or use the original file")
            factor = float(scaling["factor"])
        elif rope_type != "default":
            raise LigeroError(f"RoPE scaling type '{rope_type}' is not supported; supported: default, linear")
    return (float(theta) if theta is not None else None), factor


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Translate a Hugging Face config.json (Llama, Mistral, Gemma 3 text) into a ModelConfig.

    The model type is checked before any other key is read, so another architecture's config (GPT-2, BERT)
    gets a one-line answer rather than a missing-key error."""
    model_type = hf.get("model_type")
    if model_type == "gemma3":  # multimodal wrapper: the decoder lives in text_config
        if not isinstance(hf.get("text_config"), dict):
            raise LigeroError("this Gemma 3 config.json has no text_config section (the decoder's settings); "
                              "use the model's original config.json")
        hf = {**hf["text_config"], "model_type": "gemma3_text"}
        model_type = "gemma3_text"
    if model_type not in HF_MODEL_TYPES:
        found = f"model_type '{model_type}' is" if model_type is not None else "a config.json without model_type is"
        raise LigeroError(f"Hugging Face {found} not supported; Ligero reads llama, mistral, gemma3 "
                          "(gemma3_text), mixtral and qwen3_moe models")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise LigeroError("attention or MLP biases are not supported by Ligero's runtime")
    dim, n_heads = _hf_int(hf, "hidden_size"), _hf_int(hf, "num_attention_heads")
    common = dict(
        vocab_size=_hf_int(hf, "vocab_size"),
        dim=dim,
        n_layers=_hf_int(hf, "num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=_hf_int(hf, "num_key_value_heads", n_heads),
        head_dim=_hf_int(hf, "head_dim", dim // n_heads),
        ffn_dim=_hf_int(hf, "intermediate_size"),
        max_seq_len=_hf_int(hf, "max_position_embeddings", 2048),
        norm_eps=_hf_number(hf, "rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    if model_type in ("llama", "mistral"):
        return _llama_from_hf(hf, model_type, common)
    if model_type in ("mixtral", "qwen3_moe"):
        return _moe_from_hf(hf, model_type, common)
    return _gemma3_from_hf(hf, common)


def _moe_from_hf(hf: dict[str, Any], model_type: str, common: dict[str, Any]) -> ModelConfig:
    """Mixtral (a Mistral whose FFN is top-k of experts, weights renormalised) and Qwen3-MoE (QK-norm, experts of
    moe_intermediate_size, norm_topk_prob, dense layers listed in mlp_only_layers or off the decoder_sparse_step)."""
    if hf.get("hidden_act", "silu") != "silu":
        raise LigeroError(f"activation '{hf.get('hidden_act')}' is not supported for {model_type}")
    experts = _hf_int(hf, "num_local_experts", hf.get("num_experts"))
    theta, factor = _rope_from_hf(hf)
    n_layers = common["n_layers"]
    use_window = hf.get("sliding_window") and (model_type == "mixtral" or hf.get("use_sliding_window"))
    window = _hf_int(hf, "sliding_window") if use_window else None
    moe = dict(n_experts=experts, n_experts_per_token=_hf_int(hf, "num_experts_per_tok", 2))
    if model_type == "qwen3_moe":
        step = _hf_int(hf, "decoder_sparse_step", 1)
        only = hf.get("mlp_only_layers") or []
        if not isinstance(only, list) or not all(isinstance(i, int) for i in only):
            raise LigeroError(f"config.json's mlp_only_layers must be a list of layer numbers (found {only!r}); "
                              "use the model's complete, unedited config.json")
        moe.update(expert_ffn_dim=_hf_int(hf, "moe_intermediate_size"), moe_renormalize=bool(hf.get("norm_topk_prob")),
                   dense_layers=[i for i in range(n_layers) if i in only or (i + 1) % step], qk_norm=True)
    return ModelConfig(
        arch=model_type,
        rope_theta=theta or (1e6 if model_type == "mixtral" else 10000.0),
        rope_scaling_factor=factor,
        sliding_window=window,
        layer_types=[LOCAL if window else GLOBAL] * n_layers,
        **moe,
        **common,
    )


def _llama_from_hf(hf: dict[str, Any], model_type: str, common: dict[str, Any]) -> ModelConfig:
    if hf.get("hidden_act", "silu") != "silu":
        raise LigeroError(f"activation '{hf.get('hidden_act')}' is not supported for {model_type}")
    theta, factor = _rope_from_hf(hf)
    window = _hf_int(hf, "sliding_window") if model_type == "mistral" and hf.get("sliding_window") else None
    return ModelConfig(
        arch=model_type,
        rope_theta=theta or 10000.0,
        rope_scaling_factor=factor,
        sliding_window=window,
        layer_types=[LOCAL if window else GLOBAL] * common["n_layers"],
        **common,
    )


def _gemma3_from_hf(hf: dict[str, Any], common: dict[str, Any]) -> ModelConfig:
    pattern = _hf_int(hf, "sliding_window_pattern", 6)  # every pattern-th layer is global
    layer_types = hf.get("layer_types") or [
        "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(common["n_layers"])
    ]
    if not isinstance(layer_types, list):
        raise LigeroError(f"config.json's layer_types must be a list (found {layer_types!r}); "
                          "use the model's complete, unedited config.json")
    theta, factor = _rope_from_hf(hf, "full_attention")
    theta_local, _ = _rope_from_hf(hf, "sliding_attention")
    if "rope_parameters" not in hf:
        theta_local = _hf_number(hf, "rope_local_base_freq", 10000.0)
    if hf.get("attn_logit_softcapping"):
        raise LigeroError("attention logit soft-capping is not supported")
    return ModelConfig(
        **GEMMA3_TRAITS,
        rope_theta=theta or 1_000_000.0,
        rope_theta_local=theta_local or 10000.0,
        rope_scaling_factor=factor,
        sliding_window=_hf_int(hf, "sliding_window", 4096),
        layer_types=[GLOBAL if t == "full_attention" else LOCAL for t in layer_types],
        attn_scale=_hf_number(hf, "query_pre_attn_scalar", common["head_dim"]) ** -0.5,
        final_logit_softcap=_hf_number(hf, "final_logit_softcapping", None),
        **common,
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

    def whole(key: str, default: int | None = None, minimum: int = 1) -> int:
        value = get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise LigeroError(f"GGUF metadata '{arch}.{key}' must be a whole number >= {minimum} (found {value!r}); "
                              "re-create the file with llama.cpp's converter")
        return value

    def number(key: str, default: float) -> float:
        value = get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise LigeroError(f"GGUF metadata '{arch}.{key}' must be a number (found {value!r}); "
                              "re-create the file with llama.cpp's converter")
        return float(value)

    dim, n_heads = whole("embedding_length"), whole("attention.head_count")
    head_dim = whole("attention.key_length", get("rope.dimension_count", dim // n_heads))
    n_layers = whole("block_count")
    common = dict(
        vocab_size=whole("vocab_size", vocab_size, minimum=0),
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=whole("attention.head_count_kv", n_heads),
        head_dim=head_dim,
        ffn_dim=whole("feed_forward_length"),
        max_seq_len=whole("context_length", 2048),
        norm_eps=number("attention.layer_norm_rms_epsilon", 1e-5),
    )
    factor = 1.0
    if get("rope.scaling.type") not in (None, "none"):
        if get("rope.scaling.type") != "linear":
            raise LigeroError(f"GGUF RoPE scaling '{get('rope.scaling.type')}' is not supported")
        factor = number("rope.scaling.factor", 1.0)
    if arch == "llama":
        window = whole("attention.sliding_window") if get("attention.sliding_window") else None
        moe = {}
        if get("expert_count"):  # Mixtral-style: llama blocks whose FFN is top-k of experts, weights renormalised
            moe = dict(n_experts=whole("expert_count"), n_experts_per_token=whole("expert_used_count"),
                       expert_ffn_dim=whole("expert_feed_forward_length", common["ffn_dim"]))
        return ModelConfig(
            arch="mistral" if window else "llama",
            rope_theta=number("rope.freq_base", 10000.0),
            rope_scaling_factor=factor,
            sliding_window=window,
            layer_types=[LOCAL if window else GLOBAL] * n_layers,
            **moe,
            **common,
        )
    pattern = 6  # llama.cpp's Gemma 3: every 6th layer is global
    return ModelConfig(
        **GEMMA3_TRAITS,
        rope_theta=number("rope.freq_base", 1_000_000.0),
        rope_theta_local=number("rope.freq_base_swa", 10000.0),
        rope_scaling_factor=factor,
        sliding_window=whole("attention.sliding_window", 512),
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
    "gemma3-270m": lambda: ModelConfig(**GEMMA3_TRAITS, vocab_size=262144, dim=640, n_layers=18, n_heads=4,
                                       n_kv_heads=1, head_dim=256, ffn_dim=2048, max_seq_len=32768, norm_eps=1e-6,
                                       tie_embeddings=True, rope_theta=1e6, rope_theta_local=1e4,
                                       sliding_window=512, attn_scale=256**-0.5,
                                       layer_types=[GLOBAL if (i + 1) % 6 == 0 else LOCAL for i in range(18)]),
}
