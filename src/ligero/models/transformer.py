"""Ligero's decoder: one model for Llama, Mistral and Gemma 3, driven by ModelConfig.

Shapes: B batch, T new tokens, S keys visible, H query heads, K key/value heads, D head dim, C model dim.
Positions are absolute token positions per sequence ([B, T]); -1 marks padding.
KV caches implement KVCacheBase; the model's KVFormat builds them and runs attention over what they return
(full precision here; quant/kv.py's packed format is set by quantization, so this file never imports quant).
"""

from __future__ import annotations

import copy
import math
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ligero.errors import LigeroError
from ligero.kernels import MAX_KERNEL_ROWS, NATIVE_KINDS, NativeOp, cpu_kernels
from ligero.models import pages
from ligero.models.config import GLOBAL, LOCAL, ModelConfig

# Without this, denormal floats in SmolLM2's activations make CPU matmuls ~20x slower.
torch.set_flush_denormal(True)


class Linear(nn.Linear):
    """nn.Linear whose few-row fp32 CPU calls (batch decode) go to Ligero's GEMV kernel.

    Prefill and training use torch's matmul; the kernel only serves inference with <= MAX_KERNEL_ROWS rows.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        decode = rows <= MAX_KERNEL_ROWS and x.device.type == "cpu" and x.dtype == torch.float32
        if decode and not torch.is_grad_enabled():
            ext = cpu_kernels()
            if ext is not None and self.weight.dtype == torch.float32 and self.bias is None:
                return ext.linear_f32(x.reshape(rows, -1), self.weight).view(*x.shape[:-1], -1)
        return F.linear(x, self.weight, self.bias)

    def native_op(self) -> NativeOp | None:
        """What the native decode step runs for this projection (see quant/modules.py's QuantizedLinear)."""
        if self.weight.dtype == torch.float32 and self.bias is None:
            return NativeOp("f32", [self.weight])
        return None


def fuse_projections(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint names with separate q/k/v and gate/up projections -> Ligero's fused ones (in place)."""
    for key in [k for k in state if k.endswith(("attn.q_proj.weight", ".gate_proj.weight"))]:  # experts' too
        prefix = key.rsplit(".", 2)[0] + "."
        if key.endswith("q_proj.weight"):
            parts = [state.pop(prefix + f"{n}_proj.weight") for n in "qkv"]
            state[prefix + "qkv_proj.weight"] = torch.cat(parts)
        else:
            parts = [state.pop(prefix + f"{n}_proj.weight") for n in ("gate", "up")]
            state[prefix + "gate_up_proj.weight"] = torch.cat(parts)
    return state


def stored_bytes(module: nn.Module) -> int:
    """Bytes of every saved tensor (parameters and persistent buffers; a tied head counted once). A layer that
    holds its weights in another form than it saves them (a compact int4 layer) reports its saved bytes through
    `saved_bytes()`, so nothing is rebuilt to be counted."""
    seen, total = set(), 0
    for m in module.modules():
        saved = getattr(m, "saved_bytes", None)
        if saved is not None and getattr(m, "_compact", False):
            if id(m) not in seen:
                seen.add(id(m))
                total += saved()
            continue
        persistent = [b for n, b in m._buffers.items() if n not in m._non_persistent_buffers_set]
        for t in [*m._parameters.values(), *persistent]:
            if t is None:
                continue
            key = (t.untyped_storage().data_ptr(), t.numel(), t.dtype)
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
    return total




class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (Gemma and Llama both do), then scale by (offset + w).
        if x.dtype == self.weight.dtype == torch.float32 and x.device.type == "cpu" and not torch.is_grad_enabled():
            ext = cpu_kernels()  # one native call (decode: instead of ~8 small torch ops; prefill: ~10x faster)
            if ext is not None:
                return ext.rms_norm(x, self.weight, self.eps, self.offset)
        if torch.is_grad_enabled():  # training: torch's fused, differentiable norm
            normed = F.rms_norm(x.float(), x.shape[-1:], None, self.eps)
            return (normed * (self.offset + self.weight.float())).to(x.dtype)
        return rms_norm_llamacpp(x.float(), self.weight.float(), self.eps, self.offset).to(x.dtype)


def rms_norm_llamacpp(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm in llama.cpp's arithmetic (ggml's CPU rms_norm, then the weight): squares summed in double, the mean
    rounded to fp32, 1 / sqrtf(mean + eps) correctly rounded, x * scale * (offset + w). Last bits matter: layers
    that round their inputs to int8 (llama.cpp's Q8_0 / K-quant arithmetic) round exact ties (frequent after the
    first norm: the embedding rows are integers times a scale) by those bits. torch's fp32 sqrt is not correctly
    rounded, so the root is taken in double."""
    mean = ((x * x).double().sum(-1, keepdim=True) / x.shape[-1]).float()
    scale = 1.0 / torch.sqrt((mean + eps).double()).float()
    return x * scale * (offset + weight) if offset else x * scale * weight


def rope_table(head_dim: int, max_len: int, theta: float, scaling: float = 1.0) -> torch.Tensor:
    """[max_len, D] cos and sin halves packed as complex-free real table: returns cos ++ sin on dim 0."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    t = torch.arange(max_len, dtype=torch.float64) / scaling
    freqs = torch.outer(t, inv_freq)  # [L, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [L, D], HF "rotate_half" layout
    return torch.stack([emb.cos(), emb.sin()]).float()  # [2, L, D]


def rope_table_ggml(head_dim: int, max_len: int, theta: float, scaling: float = 1.0) -> torch.Tensor:
    """rope_table as llama.cpp's CPU backend computes it: the ratio between frequencies powf(base, -2/D) in fp32,
    each angle by repeated fp32 multiplication from the position (angle *= ratio, frequency by frequency), times
    the fp32 frequency scale, then fp32 cos / sin. The repeated rounding moves angles by up to ~1e-5 rad at 500
    positions (~5e-4 at 8k): small, but a model that rounds activations to int8 turns such differences into other
    roundings, so Ligero uses it where it computes a GGUF as llama.cpp does (load_model(int8_activations=True))."""
    exponent = torch.tensor(-2.0 / head_dim, dtype=torch.float32).double()
    ratio = torch.tensor(float(theta), dtype=torch.float64).pow(exponent).float()
    freq_scale = torch.tensor(1.0 / scaling, dtype=torch.float32)
    angle, columns = torch.arange(max_len, dtype=torch.float32), []
    for _ in range(head_dim // 2):
        columns.append(angle * freq_scale if scaling != 1.0 else angle)
        angle = angle * ratio
    freqs = torch.stack(columns, dim=1).double()  # [L, D/2], fp32 values; cos / sin correctly rounded to fp32
    emb = torch.cat([freqs, freqs], dim=-1)
    return torch.stack([emb.cos(), emb.sin()]).float()  # [2, L, D]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, T, n, D]; cos/sin: [B, T, 1, D]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_type: str):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.layer_type, self.scale = layer_type, cfg.scale
        # q, k and v read the same input: one fused projection is one GEMV per token instead of three.
        self.qkv_proj = Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=False)
        kv_width = cfg.n_kv_heads * cfg.head_dim
        self.qkv_proj.segments = (cfg.n_heads * cfg.head_dim, kv_width, kv_width)
        self.o_proj = Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.kv_format: KVFormat = FULL_PRECISION_KV  # quant's set_kv_quant swaps in a packed format
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.norm_offset)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.norm_offset)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, ctx: AttentionInputs, kv_cache: KVCacheBase | None = None, layer_idx: int = 0,
                step: CacheStep | None = None):
        B, T, _ = x.shape
        cos, sin = ctx.cos, ctx.sin
        H, K = self.n_heads, self.n_kv
        qkv = self.qkv_proj(x).view(B, T, H + 2 * K, self.head_dim)  # [B, T, H + 2K, D]
        if self.q_norm is None:
            q, k = apply_rope(qkv[:, :, : H + K], cos, sin).split([H, K], dim=2)  # one rotation for q and k
        else:
            q = apply_rope(self.q_norm(qkv[:, :, :H]), cos, sin)
            k = apply_rope(self.k_norm(qkv[:, :, H : H + K]), cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), qkv[:, :, H + K :].transpose(1, 2)  # [B, heads, T, D]
        n_stored = 0
        if kv_cache is not None:
            k, v = kv_cache.update(layer_idx, k, v, step)  # [B, K, S, D]
            n_stored = step.n_stored.get(self.layer_type, 0)
        out = self.kv_format.attend(q, k, v, ctx, self.scale, n_stored)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, H * self.head_dim))  # [B, T, C]


class GatedMLP(nn.Module):
    """SwiGLU (silu) or GeGLU (tanh GELU): down(act(gate(x)) * up(x)), gate and up fused in one projection."""

    def __init__(self, cfg: ModelConfig, ffn_dim: int | None = None):
        super().__init__()
        ffn_dim = ffn_dim or cfg.ffn_dim
        self.gate_up_proj = Linear(cfg.dim, 2 * ffn_dim, bias=False)
        self.gate_up_proj.segments = (ffn_dim, ffn_dim)
        self.down_proj = Linear(ffn_dim, cfg.dim, bias=False)
        self.gelu = cfg.activation == "gelu_tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        gate = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return self.down_proj(gate * up)


class Routing(NamedTuple):
    """Which experts each token goes to, and with what weight."""

    experts: torch.Tensor  # [N, k] expert ids, most probable first
    weights: torch.Tensor  # [N, k] fp32
    logits: torch.Tensor  # [N, E] the router's fp32 logits


class MoEMLP(nn.Module):
    """Mixture-of-experts FFN: a router scores n_experts gated MLPs per token; the k best run and their outputs are
    summed, weighted by their softmax probabilities (renormalised over the k when cfg.moe_renormalize, which equals
    Mixtral's softmax over the k chosen logits). Tokens are grouped by expert, so each chosen expert runs once per
    forward on all its tokens and an expert no token chose is never read (one-token decode reads k experts).
    `routing_log`, when a list, receives every forward's Routing (the audit compares variants' choices).

    Training (module in train mode, autograd on) adds what the labs set: `aux_loss`, the Switch Transformer's
    load-balancing loss balance_coef * E * sum_i f_i P_i (f_i: share of the assignments expert i receives, P_i:
    its mean router probability) plus the router z-loss z_coef * mean(logsumexp(logits)^2); with a
    `capacity_factor`, each expert takes at most ceil(factor * N * k / E) assignments per forward (those with the
    largest routing weights), the others are dropped (the token keeps its residual). `load` and `dropped` count
    assignments per expert and dropped ones since the last take_stats(). Inference is always dropless."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.k = cfg.n_experts_per_token
        self.renormalize = cfg.moe_renormalize
        self.router = Linear(cfg.dim, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(GatedMLP(cfg, cfg.moe_ffn_dim) for _ in range(cfg.n_experts))
        self.shared = GatedMLP(cfg, cfg.shared_expert_ffn_dim) if cfg.shared_expert_ffn_dim else None
        self.shared_gate = Linear(cfg.dim, 1, bias=False) if cfg.shared_expert_gate else None
        self.routing_log: list[Routing] | None = None
        self.balance_coef, self.z_coef, self.capacity_factor = 0.0, 0.0, None
        self.aux_loss: torch.Tensor | None = None
        self.load = torch.zeros(cfg.n_experts, dtype=torch.long)
        self.dropped = 0

    def take_stats(self) -> tuple[list[int], int]:
        """(assignments per expert, dropped assignments) counted in training since the last call; resets them."""
        load, dropped = self.load.tolist(), self.dropped
        self.load, self.dropped = torch.zeros_like(self.load), 0
        return load, dropped

    def route(self, x: torch.Tensor) -> Routing:
        """x [N, C] -> the k experts of each token and their weights."""
        logits = self.router(x).float()  # [N, E]
        probs = logits.softmax(-1)
        weights, experts = probs.topk(self.k, dim=-1)  # [N, k]
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        return Routing(experts, weights, logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # [N, C]
        routing = self.route(flat)
        if self.routing_log is not None:
            self.routing_log.append(routing)
        training = self.training and torch.is_grad_enabled()
        if flat.shape[0] == 1 and not training and self.shared is None:
            # one token (decode): its k experts in expert order, which is the order the grouped path adds them in,
            # so both paths give the same bits
            chosen = sorted(zip(routing.experts[0].tolist(), routing.weights[0].to(flat.dtype)))
            out = self.experts[chosen[0][0]](flat) * chosen[0][1]
            for e, w in chosen[1:]:
                out = out + self.experts[e](flat) * w
            return out.view_as(x)
        out = torch.zeros_like(flat)
        chosen = routing.experts.flatten()  # [N * k], token n's choices at n*k .. n*k + k - 1
        order = chosen.argsort(stable=True)  # assignments grouped by expert
        counts = torch.bincount(chosen, minlength=len(self.experts))
        weights = routing.weights.flatten()[order].to(flat.dtype)
        tokens = order // self.k
        capacity = None
        if training:
            self._training_terms(routing, counts)
            if self.capacity_factor is not None:
                capacity = math.ceil(self.capacity_factor * chosen.numel() / len(self.experts))
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                rows, w = tokens[start:start + n], weights[start:start + n]
                if capacity is not None and n > capacity:  # keep the assignments with the largest weights
                    keep = w.detach().topk(capacity).indices
                    rows, w = rows[keep], w[keep]
                    self.dropped += n - capacity
                out.index_add_(0, rows, self.experts[e](flat[rows]) * w[:, None])
                start += n
        if self.shared is not None:
            shared = self.shared(flat)
            if self.shared_gate is not None:
                shared = shared * torch.sigmoid(self.shared_gate(flat))
            out = out + shared
        return out.view_as(x)

    def _training_terms(self, routing: Routing, counts: torch.Tensor) -> None:
        self.load += counts.detach().cpu()
        aux = routing.logits.new_zeros(())
        if self.balance_coef:
            share = counts.float() / counts.sum()  # f_i (not differentiable: counts)
            aux = aux + self.balance_coef * len(self.experts) * (share * routing.logits.softmax(-1).mean(0)).sum()
        if self.z_coef:
            aux = aux + self.z_coef * torch.logsumexp(routing.logits, -1).pow(2).mean()
        self.aux_loss = aux


def moe_aux_loss(model: nn.Module) -> torch.Tensor | float:
    """The sum of the MoE layers' auxiliary losses of the last training forward (0.0 for a dense model)."""
    total = 0.0
    for m in model.modules():
        if isinstance(m, MoEMLP) and m.aux_loss is not None:
            total = total + m.aux_loss
            m.aux_loss = None
    return total


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_type: str, moe: bool = False):
        super().__init__()
        norm = lambda: RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_offset)  # noqa: E731
        self.attn_norm, self.attn = norm(), Attention(cfg, layer_type)
        self.mlp_norm, self.mlp = norm(), (MoEMLP(cfg) if moe else GatedMLP(cfg))
        self.attn_post_norm = norm() if cfg.post_norms else None
        self.mlp_post_norm = norm() if cfg.post_norms else None

    def forward(self, x, ctx: "AttentionInputs", kv_cache=None, layer_idx=0, step=None):
        h = self.attn(self.attn_norm(x), ctx, kv_cache, layer_idx, step)
        if self.attn_post_norm is not None:
            h = self.attn_post_norm(h)
        x = x + h
        h = self.mlp(self.mlp_norm(x))
        if self.mlp_post_norm is not None:
            h = self.mlp_post_norm(h)
        return x + h


class AttentionInputs(NamedTuple):
    """What every layer of one kind (global / local) shares in a forward step."""

    cos: torch.Tensor  # [B, T, 1, D]
    sin: torch.Tensor
    mask: torch.Tensor  # [B, 1, T, S] bool
    q_pos: torch.Tensor  # [B, T] query positions
    k_pos: torch.Tensor  # [B, S] key positions (-1: empty or padding)


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[B, 1, T, S] bool: key visible if not padding, not in the future, and (for SWA) within W keys."""
    q, k = q_pos[:, None, :, None], k_pos[:, None, None, :]
    ok = (k >= 0) & (k <= q)
    if window is not None:
        ok &= k > q - window
    # Padding queries see nothing; let them see everything so softmax stays finite (their outputs are unused).
    return ok | ~ok.any(-1, keepdim=True)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, t, cfg.is_moe_layer(i)) for i, t in enumerate(cfg.layer_types))
        self.gradient_checkpointing = False  # training: recompute each block's activations in the backward pass
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_offset)
        self.lm_head = Linear(cfg.dim, cfg.vocab_size, bias=False)
        self._rope: dict[str, torch.Tensor] = {}
        self.ggml_rope = False  # True: RoPE angles as llama.cpp rounds them (rope_table_ggml)

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of activations (quantized layers store other dtypes internally)."""
        return self.norm.weight.dtype

    def tie_weights(self) -> None:
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def rope(self, kind: str, device: torch.device) -> torch.Tensor:
        """[2, L, D] cos/sin for the layer kind, built lazily (fp32) on the model's device."""
        table = self._rope.get(kind)
        if table is None or table.device != device:
            cfg = self.cfg
            build = rope_table_ggml if self.ggml_rope else rope_table
            if kind == LOCAL and cfg.rope_theta_local is not None:
                table = build(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta_local)
            else:
                table = build(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling_factor)
            table = self._rope[kind] = table.to(device)
        return table

    @property
    def kv_format(self) -> KVFormat:
        """How every layer keeps keys and values (full precision unless quantization set a packed format)."""
        return self.layers[0].attn.kv_format if len(self.layers) else FULL_PRECISION_KV

    @kv_format.setter
    def kv_format(self, kv_format: KVFormat) -> None:
        for layer in self.layers:
            layer.attn.kv_format = kv_format

    def new_cache(self, batch: int, max_len: int) -> KVCacheBase:
        """The KV cache this model decodes with, as its KV format builds it (packed when quantized)."""
        return self.kv_format.new_cache(self.cfg, batch, max_len, device=self.device, dtype=self.dtype)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)  # [B, T, C]
        if self.cfg.embed_scale:
            x = x * torch.tensor(math.sqrt(self.cfg.dim), dtype=x.dtype)
        return x

    def attention_inputs(self, positions: torch.Tensor, dtype: torch.dtype, step=None) -> dict[str, AttentionInputs]:
        """RoPE tables and masks per layer kind, computed once per forward step (shared by all its layers)."""
        rope_pos = positions.clamp(min=0)
        per_kind = {}
        for kind in set(self.cfg.layer_types):
            cos, sin = self.rope(kind, positions.device)[:, rope_pos].unsqueeze(3).to(dtype)  # [B, T, 1, D] each
            k_pos = step.key_positions[kind] if step is not None else positions
            window = self.cfg.sliding_window if kind == LOCAL else None
            per_kind[kind] = AttentionInputs(cos, sin, attention_mask(positions, k_pos, window), positions, k_pos)
        return per_kind

    def forward(
        self,
        tokens: torch.Tensor,  # [B, T]
        positions: torch.Tensor | None = None,  # [B, T]; -1 = padding
        kv_cache: KVCacheBase | None = None,
        last_only: bool = False,
        return_hidden: bool = False,
        apply_head: bool = True,  # False: the final normed hidden states [B, T, C] (self.logits makes logits)
        embeds: torch.Tensor | None = None,  # [B, T, C]: input vectors used instead of the tokens' embeddings
    ):
        B, T = tokens.shape
        if positions is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        if int(positions.max()) >= self.cfg.max_seq_len:
            raise LigeroError(
                f"sequence reaches position {int(positions.max())} but the model's context is "
                f"{self.cfg.max_seq_len} tokens; shorten the input or lower --ctx"
            )
        # Given vectors (a prompt with image features spliced in) replace the embedding lookup; tokens keep the shape.
        x = self.embed_tokens(tokens) if embeds is None else embeds.to(self.dtype)  # [B, T, C]
        hidden = []
        plan = native_decode_plan(self, kv_cache) if T == 1 and not return_hidden else None
        if plan is not None:
            x = self._native_layers(plan, x, positions, kv_cache)
        else:
            step = kv_cache.begin(positions) if kv_cache is not None else None
            per_kind = self.attention_inputs(positions, x.dtype, step)
            checkpointed = getattr(self, "gradient_checkpointing", False) and torch.is_grad_enabled() \
                and kv_cache is None
            for i, layer in enumerate(self.layers):
                if checkpointed:  # keep each block's input only; its activations are recomputed for backward
                    x = torch.utils.checkpoint.checkpoint(layer, x, per_kind[self.cfg.layer_types[i]], None, i, None,
                                                          use_reentrant=False)
                    continue
                x = layer(x, per_kind[self.cfg.layer_types[i]], kv_cache, i, step)
                if return_hidden:
                    hidden.append(x)
            if kv_cache is not None:
                kv_cache.commit(step)
        if last_only:
            x = x[:, -1:]
        if not apply_head:
            return self.norm(x)
        logits = self.logits(self.norm(x))
        return (logits, hidden) if return_hidden else logits

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        """The vocabulary head on final normed hidden states [..., C] -> [..., V] (Gemma's soft cap included)."""
        logits = self.lm_head(normed)
        if self.cfg.final_logit_softcap:
            cap = self.cfg.final_logit_softcap
            logits = torch.tanh(logits / cap) * cap
        return logits

    def prefill_row(self, kv_cache, row: int, tokens: list[int], start: int,
                    embeds: torch.Tensor | None = None) -> torch.Tensor | None:
        """A prompt chunk of one row of a SlotKVCache or of a one-row KVCache (positions start.. of row `row`) through
        the native step: every layer in one call, the chunk's tokens as the step's rows, all reading that one cache
        row, each masked to the keys up to its own position. Returns the last token's logits [V], or None where the
        step cannot run natively (sliding-window rings: a chunk's keys could overwrite ones its earlier tokens read;
        chunks over PREFILL_NATIVE_TOKENS; packed KV caches; no native plan): the caller then runs the layers.
        Why: the layers pay ~10 ms of per-op overhead per chunk on SmolLM2-135M (30 layers), most of a short prompt's
        prefill (37 tokens: 29 -> 20 ms natively)."""
        n = len(tokens)
        # (a cache's ring exists only with LOCAL layers; a packed KV cache has no begin_chunk)
        if n > PREFILL_NATIVE_TOKENS or LOCAL in self.cfg.layer_types or not hasattr(kv_cache, "begin_chunk"):
            return None
        plan = native_decode_plan(self, kv_cache)
        if plan is None:
            return None
        device = self.device
        step = kv_cache.begin_chunk(row, start, n)  # [n, S] key positions, the chunk's slots
        positions = torch.arange(start, start + n, device=device)[:, None]  # [n, 1]: one query per step row
        x = (self.embed_tokens(torch.tensor([tokens], device=device)) if embeds is None
             else embeds[None].to(self.dtype))[0]  # [n, C]
        cos, sin = self.rope(GLOBAL, device)[:, positions[:, 0]]  # [n, D] each
        mask = attention_mask(positions, step.key_positions[GLOBAL], None)  # [n, 1, 1, S]: causal within the chunk
        x = plan.run(x, cos, sin, mask, step.row_slots[GLOBAL], *_absent_kind(x), cache_row=row)
        kv_cache.commit(step)
        return self.logits(self.norm(x[-1:]))[0]

    def _native_layers(self, plan, x: torch.Tensor, positions: torch.Tensor, kv_cache: "KVCache") -> torch.Tensor:
        """Every layer of a one-token step in one native call: x [B, 1, C] -> [B, 1, C]. Writes the step's keys
        and values into the cache and reads it back exactly as KVCache.update does."""
        step = kv_cache.begin(positions)
        start, kinds = step.global_slots.start, set(self.cfg.layer_types)
        rope_pos = positions[:, 0].clamp(min=0)
        B, args = positions.shape[0], []
        for kind in (GLOBAL, LOCAL):
            if kind not in kinds:
                args += _absent_kind(x[:, 0])
                continue
            cos, sin = self.rope(kind, positions.device)[:, rope_pos]  # [B, D] each
            if step.row_slots is not None:  # rows at their own positions (SlotKVCache)
                slots = step.row_slots[kind]
            else:  # every row writes the step's slot
                slots = torch.full((B,), start if kind == GLOBAL else start % kv_cache.window, dtype=torch.long)
            window = self.cfg.sliding_window if kind == LOCAL else None
            args += [cos, sin, attention_mask(positions, step.key_positions[kind], window), slots]
        x = plan.run(x[:, 0], *args)[:, None]
        kv_cache.commit(step)
        return x


def _absent_kind(x: torch.Tensor) -> list[torch.Tensor]:
    """The native step's RoPE, mask and slot arguments for a layer kind the model does not have (x: [B, C])."""
    return [x[:, :0], x[:, :0], torch.ones(1, 1, 1, 1, dtype=torch.bool), torch.zeros(x.shape[0])]


DECODE_STEP_MODES = ("native", "layers")
# A prompt chunk through the native step (Transformer.prefill_row): the step's rows are the chunk's tokens, each with
# its own [S] mask row and [C] scratch, so longer chunks take the layers (measured on SmolLM2-135M int4: 128 tokens
# 66 ms natively vs 84 ms layer by layer; the fixed per-op overhead matters less as chunks grow).
PREFILL_NATIVE_TOKENS = 256


def decode_step_mode() -> str:
    """LIGERO_DECODE_STEP: "native" (default: a one-token step runs every layer in one native call where it can)
    or "layers" (the reference: one module call per layer, as prefill runs)."""
    mode = os.environ.get("LIGERO_DECODE_STEP", "native").strip().lower() or "native"
    if mode not in DECODE_STEP_MODES:
        raise LigeroError(f"LIGERO_DECODE_STEP={mode!r} is not a decode mode; use one of "
                          f"{', '.join(DECODE_STEP_MODES)}")
    return mode


def _has_hooks(layers: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in layers.modules())


def native_decode_plan(model: Transformer, kv_cache: KVCacheBase | None):
    """The native decode step for this model and cache, built once per cache, or None where the step must run
    layer by layer: another cache kind or KV format (packed KV), more than MAX_KERNEL_ROWS rows, autograd, forward hooks
    inside the layers (they must see each module's call), experts (an MoE layer routes in Python), no kernels, or
    LIGERO_DECODE_STEP=layers."""
    if model.cfg.n_experts or not getattr(type(kv_cache), "NATIVE", False) or kv_cache.k[0].shape[0] > MAX_KERNEL_ROWS \
            or torch.is_grad_enabled() \
            or type(model.kv_format) is not KVFormat:  # a packed KV format's attention reads its own rounding
        return None
    if kv_cache.native is not None and kv_cache.native[0] is model:
        return kv_cache.native[1]
    plan = None
    cfg = model.cfg
    ext = cpu_kernels() if decode_step_mode() == "native" else None
    native = ext is not None and model.dtype == torch.float32 and model.device.type == "cpu" \
        and kv_cache.k[0].dtype in (torch.float32, torch.float16) and cfg.head_dim % 2 == 0 and cfg.head_dim <= 512
    if native and not _has_hooks(model.layers):
        if not pages.moved(model):  # before any plan holds the weights: they are read from the huge-page block
            for module in model.modules():  # kernel layouts made on demand exist before the move, and move too
                if hasattr(module, "native_op"):
                    module.native_op()
            pages.move_buffers(model)
        plan = ext.DecodeStep([_native_layer(ext, layer, kv_cache, i) for i, layer in enumerate(model.layers)],
                              cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.norm_eps, cfg.norm_offset, cfg.scale,
                              cfg.activation == "gelu_tanh")
    kv_cache.native = (model, plan)
    return plan


def _native_linear(ext, module: nn.Module):
    op = module.native_op() if hasattr(module, "native_op") else None
    if op is None:
        return ext.NativeLinear(0, [], module=module)  # called back in Python: its own forward, as the reference
    return ext.NativeLinear(NATIVE_KINDS[op.kind], [t.contiguous() for t in op.tensors], op.group, op.act8,
                            op.tensor_scale, op.act_fp8, op.out_features)


def _native_layer(ext, layer: Block, kv_cache: KVCache, i: int):
    attn, mlp = layer.attn, layer.mlp
    weight = lambda norm: None if norm is None else norm.weight.detach()  # noqa: E731
    return ext.NativeLayer(
        _native_linear(ext, attn.qkv_proj), _native_linear(ext, attn.o_proj), _native_linear(ext, mlp.gate_up_proj),
        _native_linear(ext, mlp.down_proj), weight(layer.attn_norm), weight(layer.mlp_norm),
        weight(layer.attn_post_norm), weight(layer.mlp_post_norm), weight(attn.q_norm), weight(attn.k_norm),
        kv_cache.k[i], kv_cache.v[i], attn.layer_type == LOCAL)


@dataclass
class CacheStep:
    """What one forward step shares across layers: the key positions attention sees per layer kind, the global
    slots it fills, and per kind how many leading keys come back dequantized from packed storage."""

    key_positions: dict[str, torch.Tensor]  # kind -> [B, S]
    global_slots: slice  # slots of the static (global-layer) cache this step writes
    n_stored: dict[str, int] = field(default_factory=dict)  # kind -> leading packed keys (none: 0)
    row_slots: dict[str, torch.Tensor] | None = None  # kind -> [B] slot per row, where rows write different slots


class KVCacheBase(ABC):
    """What attention needs from a KV cache: `begin` a step, `update` a layer (store this step's K/V and return
    every key and value the step reads), `commit` the step. Implemented by KVCache (full precision), by
    models/slots.py's SlotKVCache (rows at their own positions) and by quant/kv.py's packed cache."""

    NATIVE = False  # True: fp32 or fp16 tensors k[i] / v[i] [B, K, N, D] the native decode step may write and read

    @abstractmethod
    def begin(self, positions: torch.Tensor) -> CacheStep: ...

    @abstractmethod
    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor,
               step: CacheStep) -> tuple[torch.Tensor, torch.Tensor]: ...

    @abstractmethod
    def commit(self, step: CacheStep) -> None: ...

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes the cache holds."""


class KVFormat:
    """How a model keeps keys and values: which cache decoding builds and how attention reads the keys. This one
    is full precision; quant/kv.py provides the packed (KIVI) format."""

    def new_cache(self, cfg: ModelConfig, batch: int, max_len: int, device=None,
                  dtype: torch.dtype = torch.float32) -> KVCacheBase:
        return KVCache(cfg, batch, max_len, device=device, dtype=dtype)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionInputs, scale: float,
               n_stored: int) -> torch.Tensor:
        """q [B, H, T, D], k/v [B, K, S, D] (the first `n_stored` keys from packed storage) -> [B, H, T, D]."""
        # Query head h reads KV head h // (H / K) (enable_gqa groups heads contiguously).
        if q.shape[2] <= MAX_KERNEL_ROWS and q.shape[-1] <= 512 and q.device.type == "cpu" \
                and q.dtype == torch.float32 and k.dtype in (torch.float32, torch.float16) \
                and not torch.is_grad_enabled():
            ext = cpu_kernels()  # decode: one native call instead of SDPA's per-call setup (~100 us a layer)
            if ext is not None:
                return ext.attend_decode(q, k, v, ctx.mask, scale)
        if k.dtype != q.dtype:  # a cache stored at lower precision (fp16) than the model computes in
            k, v = k.to(q.dtype), v.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])


FULL_PRECISION_KV = KVFormat()


@dataclass
class RollingCacheStep(CacheStep):
    """KVCache's step: also the rolling-buffer slots the sliding-window layers write."""

    local_slots: torch.Tensor | None = None  # rolling-buffer slots to write
    local_src: slice | None = None  # slice of the new tokens that go into the rolling buffer


class KVCache(KVCacheBase):
    """Preallocated K/V for every layer. Global layers: a static cache indexed by slot (slot = step order).
    Sliding-window layers: a rolling buffer of W slots (O(window) memory). A one-token step writes its key into
    the buffer and attention reads the buffer (the slot it overwrites held a key already outside the window);
    a longer step reads the buffer as it was before the step plus the new keys, so steps past the window stay
    exact."""

    NATIVE = True

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device=None, dtype=torch.float32):
        self.cfg, self.max_len, self.length = cfg, max_len, 0
        self.native = None  # (model, its native decode step or None), set by native_decode_plan
        self.window = min(cfg.sliding_window, max_len) if LOCAL in cfg.layer_types else 0
        shape = lambda n: (batch, cfg.n_kv_heads, n, cfg.head_dim)  # noqa: E731
        shapes = [shape(max_len if kind == GLOBAL else self.window) for kind in cfg.layer_types]
        tensors = pages.zeros_many(shapes * 2, dtype, device)  # keys then values, every layer's in one block
        self.k, self.v = tensors[: len(shapes)], tensors[len(shapes) :]
        self.pos = {
            GLOBAL: torch.full((batch, max_len), -1, dtype=torch.long, device=device),
            LOCAL: torch.full((batch, max(self.window, 1)), -1, dtype=torch.long, device=device),
        }

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def take_rows(self, index: torch.Tensor) -> KVCache:
        """A new cache holding the given rows of this one (repeats allowed) as they are now: one prompt prefilled
        once, then continued several ways."""
        new = copy.copy(self)
        new.k = [t.index_select(0, index) for t in self.k]
        new.v = [t.index_select(0, index) for t in self.v]
        new.pos = {kind: p.index_select(0, index) for kind, p in self.pos.items()}
        new.native = None
        return new

    def begin(self, positions: torch.Tensor) -> RollingCacheStep:
        T = positions.shape[1]
        start = self.length
        if start + T > self.max_len:
            raise LigeroError(
                f"generation needs {start + T} cache slots but the cache holds {self.max_len}; "
                "lower --max-new-tokens or shorten the prompt"
            )
        key_positions = {}
        self.pos[GLOBAL][:, start : start + T] = positions
        key_positions[GLOBAL] = self.pos[GLOBAL][:, : start + T]
        local_slots = local_src = None
        if self.window:
            n = min(T, self.window)
            local_src = slice(T - n, T)
            local_slots = torch.arange(start + T - n, start + T, device=positions.device) % self.window
            if T == 1:  # the buffer as it will be after this step's write
                ring = self.pos[LOCAL].clone()
                ring[:, start % self.window] = positions[:, 0]
                key_positions[LOCAL] = ring
            else:
                key_positions[LOCAL] = torch.cat([self.pos[LOCAL], positions], dim=1)
        return RollingCacheStep(key_positions, slice(start, start + T), local_slots=local_slots, local_src=local_src)

    def begin_chunk(self, row: int, start: int, n: int) -> CacheStep:
        """Positions start..start+n-1 of a one-row cache written at once (a prompt chunk through the native step,
        whose rows are the chunk's tokens): each token's key positions [n, S] and slot [n]. Global layers only."""
        first = self.length
        if row != 0 or self.k[0].shape[0] != 1 or self.window:
            raise LigeroError("KVCache.begin_chunk takes one-row caches without sliding-window layers")
        if first + n > self.max_len:
            raise LigeroError(f"generation needs {first + n} cache slots but the cache holds {self.max_len}; "
                              "lower --max-new-tokens or shorten the prompt")
        self.pos[GLOBAL][0, first : first + n] = torch.arange(start, start + n, device=self.pos[GLOBAL].device)
        keys = self.pos[GLOBAL][:, : first + n].expand(n, first + n)
        slots = torch.arange(first, first + n, device=keys.device)
        return RollingCacheStep({GLOBAL: keys}, slice(first, first + n), row_slots={GLOBAL: slots})

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, step: RollingCacheStep):
        kc, vc = self.k[layer], self.v[layer]
        if self.cfg.layer_types[layer] == GLOBAL:
            kc[:, :, step.global_slots] = k
            vc[:, :, step.global_slots] = v
            end = step.global_slots.stop
            return kc[:, :, :end], vc[:, :, :end]
        k, v = k.to(kc.dtype), v.to(vc.dtype)  # a cache stored in fp16 rounds the new keys once, here
        if k.shape[2] == 1:
            kc.index_copy_(2, step.local_slots, k)
            vc.index_copy_(2, step.local_slots, v)
            return kc, vc
        keys, values = torch.cat([kc, k], dim=2), torch.cat([vc, v], dim=2)
        kc.index_copy_(2, step.local_slots, k[:, :, step.local_src])
        vc.index_copy_(2, step.local_slots, v[:, :, step.local_src])
        return keys, values

    def commit(self, step: RollingCacheStep) -> None:
        if self.window:
            ring = step.key_positions[LOCAL]
            if ring.shape[1] == self.window:  # a one-token step: already the buffer after the write
                self.pos[LOCAL].copy_(ring)
            else:
                new = ring[:, self.window :]
                self.pos[LOCAL].index_copy_(1, step.local_slots, new[:, step.local_src])
        self.length = step.global_slots.stop
