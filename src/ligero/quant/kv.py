"""KV-cache quantization (KIVI, Liu et al. 2024): keys per channel over groups of tokens, values per token over
groups of channels, asymmetric min/max, the most recent tokens kept in full precision.

The rule both paths follow: a query at position t reads key j quantized iff
j < Q(t) = floor(max(0, t + 1 - R) / G) * G, i.e. keys leave the full-precision residual window of R tokens in
whole groups of G. `QuantizedKVCache` stores those groups packed (codes at `bits` bits plus fp16 scale and
minimum per group) and only the residual in full precision. A forward pass without a cache (perplexity) uses
`fake_quantize_*` to give every query exactly what such a cache would return at that point of decoding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ligero.errors import LigeroError
from ligero.models.config import GLOBAL, LOCAL, ModelConfig
from ligero.models.transformer import AttentionInputs, CacheStep, KVCacheBase, KVFormat
from ligero.quant.config import KVQuantConfig
from ligero.quant.formats import pack_bits, unpack_bits


def group_params(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(minimum, scale) of a min/max group as stored: fp16 up to 8 bits (as KIVI), full precision above."""
    scale = (hi - lo) / ((1 << bits) - 1)
    if bits <= 8:
        lo, scale = lo.half().to(hi.dtype), scale.half().to(hi.dtype)
    return lo, scale


def quant_codes(x: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant groups: zero range, exact
    return torch.round((x - lo) / safe).clamp(0, (1 << bits) - 1)


def _minmax_quant(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    lo, scale = group_params(lo, hi, bits)
    return quant_codes(x, lo, scale, bits) * scale + lo


def fake_quantize_keys(k: torch.Tensor, k_pos: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """k [B, K, S, D]; per (head, channel) over tokens of the same position group (pos // group)."""
    B, K, S, D = k.shape
    gid = torch.where(k_pos >= 0, k_pos // group, torch.zeros_like(k_pos))  # padding rides along, never read
    n = int(gid.max()) + 1 if gid.numel() else 1
    index = gid[:, None, :, None].expand(B, K, S, D)
    hi = torch.full((B, K, n, D), float("-inf"), dtype=k.dtype, device=k.device).scatter_reduce(2, index, k, "amax")
    lo = torch.full((B, K, n, D), float("inf"), dtype=k.dtype, device=k.device).scatter_reduce(2, index, k, "amin")
    return _minmax_quant(k, lo.gather(2, index), hi.gather(2, index), bits)


def fake_quantize_values(v: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """v [B, K, S, D]; per token over groups of `group` channels."""
    B, K, S, D = v.shape
    g = min(group, D)
    vg = v.reshape(B, K, S, D // g, g)
    return _minmax_quant(vg, vg.amin(-1, keepdim=True), vg.amax(-1, keepdim=True), bits).reshape(B, K, S, D)


def quantized_key_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, cfg: KVQuantConfig) -> torch.Tensor:
    """[B, 1, T, S] True where query t reads key j from the quantized part of the cache."""
    limit = torch.div((q_pos + 1 - cfg.residual).clamp(min=0), cfg.group_size, rounding_mode="floor") * cfg.group_size
    return (k_pos[:, None, None, :] >= 0) & (k_pos[:, None, None, :] < limit[:, None, :, None])


def attention_with_quantized_kv(q, k, v, mask, q_pos, k_pos, scale: float, cfg: KVQuantConfig,
                                n_stored: int = 0) -> torch.Tensor:
    """q [B, H, T, D]; k/v [B, K, S, D] whose first `n_stored` keys come dequantized from a packed cache and the
    rest in full precision. Returns [B, H, T, D] as a KIVI cache gives it."""
    H, K = q.shape[1], k.shape[1]
    from_quant = quantized_key_mask(q_pos, k_pos[:, n_stored:], cfg)  # [B, 1, T, S - n_stored]
    if not bool(from_quant.any()):  # decode: the residual is all full precision
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=H != K)
    stored = lambda t: t[:, :, :n_stored]  # noqa: E731
    k_hat = torch.cat([stored(k), fake_quantize_keys(k[:, :, n_stored:], k_pos[:, n_stored:], cfg.bits,
                                                     cfg.group_size)], dim=2)
    v_hat = torch.cat([stored(v), fake_quantize_values(v[:, :, n_stored:], cfg.bits, cfg.group_size)], dim=2)
    from_quant = torch.cat([from_quant.new_ones(*from_quant.shape[:3], n_stored), from_quant], dim=-1)
    if H != K:  # query head h reads KV head h // (H / K)
        k, v, k_hat, v_hat = (t.repeat_interleave(H // K, dim=1) for t in (k, v, k_hat, v_hat))
    scores = torch.where(from_quant, q @ k_hat.transpose(-1, -2), q @ k.transpose(-1, -2)) * scale
    p = F.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return (p * from_quant) @ v_hat + (p * ~from_quant) @ v


class PackedGroups:
    """Quantized K/V of one layer: a ring of `n_groups` groups of G tokens (global layers never wrap).
    Codes are packed along the head dim (dense `bits`-bit codes); keys carry a minimum and scale per
    (head, channel, group), values per (token, group of channels)."""

    def __init__(self, batch: int, heads: int, head_dim: int, n_groups: int, cfg: KVQuantConfig, device):
        G, b = cfg.group_size, cfg.bits
        self.cfg, self.vg = cfg, min(cfg.group_size, head_dim)
        if head_dim % self.vg:
            raise LigeroError(f"the KV-cache group size {cfg.group_size} must divide the head dim {head_dim}")
        if b <= 4:
            if head_dim % 8:
                raise LigeroError(f"{b}-bit KV packing needs a head dim divisible by 8, got {head_dim}")
            code_shape, code_dtype = head_dim * b // 8, torch.uint8
        else:
            code_shape, code_dtype = head_dim, torch.uint8 if b <= 8 else torch.int32
        param_dtype = torch.float16 if b <= 8 else torch.float32
        slots = n_groups * G
        self.k_codes = torch.zeros(batch, heads, slots, code_shape, dtype=code_dtype, device=device)
        self.v_codes = torch.zeros_like(self.k_codes)
        self.k_min = torch.zeros(batch, heads, n_groups, head_dim, dtype=param_dtype, device=device)
        self.k_scale = torch.zeros_like(self.k_min)
        self.v_min = torch.zeros(batch, heads, slots, head_dim // self.vg, dtype=param_dtype, device=device)
        self.v_scale = torch.zeros_like(self.v_min)

    def tensors(self) -> list[torch.Tensor]:
        return [self.k_codes, self.v_codes, self.k_min, self.k_scale, self.v_min, self.v_scale]

    def _pack(self, codes: torch.Tensor) -> torch.Tensor:
        B, K, S, D = codes.shape
        if self.cfg.bits <= 4:
            return pack_bits(codes.reshape(-1, D).to(torch.uint8), self.cfg.bits).view(B, K, S, -1)
        return codes.to(self.k_codes.dtype)

    def _unpack(self, packed: torch.Tensor) -> torch.Tensor:
        B, K, S, n = packed.shape
        bits = self.cfg.bits
        if bits in (2, 4):  # pack_bits' layout is plain nibbles / crumbs here: unpack with byte ops (fast)
            parts = [(packed >> shift) & ((1 << bits) - 1) for shift in range(0, 8, bits)]
            return torch.stack(parts, dim=-1).view(B, K, S, n * 8 // bits)
        if bits == 3:
            return unpack_bits(packed.reshape(B * K * S, n), bits).view(B, K, S, n * 8 // bits)
        return packed

    def write(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, ring_slots: list[int]) -> None:
        """Quantize whole groups k/v [B, K, n * G, D] (valid [B, n * G]: not padding) into ring groups."""
        cfg, (B, K, S, D) = self.cfg, k.shape
        G, n = cfg.group_size, S // cfg.group_size
        kg = k.view(B, K, n, G, D)
        ok = valid.view(B, 1, n, G, 1)  # padding slots do not stretch a group's range
        hi = kg.masked_fill(~ok, float("-inf")).amax(3)
        lo = kg.masked_fill(~ok, float("inf")).amin(3)
        hi, lo = torch.where(hi >= lo, hi, 0.0), torch.where(hi >= lo, lo, 0.0)  # all-padding groups
        k_lo, k_scale = group_params(lo, hi, cfg.bits)  # [B, K, n, D]
        k_codes = quant_codes(kg, k_lo[:, :, :, None], k_scale[:, :, :, None], cfg.bits).view(B, K, S, D)
        vg = v.reshape(B, K, S, D // self.vg, self.vg)
        v_lo, v_scale = group_params(vg.amin(-1), vg.amax(-1), cfg.bits)  # [B, K, S, D / vg]
        v_codes = quant_codes(vg, v_lo[..., None], v_scale[..., None], cfg.bits).view(B, K, S, D)
        groups = torch.tensor(ring_slots, device=k.device)
        slots = (groups[:, None] * G + torch.arange(G, device=k.device)).flatten()
        self.k_codes.index_copy_(2, slots, self._pack(k_codes))
        self.v_codes.index_copy_(2, slots, self._pack(v_codes))
        self.k_min.index_copy_(2, groups, k_lo.to(self.k_min.dtype))
        self.k_scale.index_copy_(2, groups, k_scale.to(self.k_scale.dtype))
        self.v_min.index_copy_(2, slots, v_lo.to(self.v_min.dtype))
        self.v_scale.index_copy_(2, slots, v_scale.to(self.v_scale.dtype))

    def read(self, n_groups: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized K/V of the first `n_groups` ring groups: [B, K, n * G, D] each."""
        G = self.cfg.group_size
        S = n_groups * G
        k_codes = self._unpack(self.k_codes[:, :, :S]).to(dtype)
        B, K, _, D = k_codes.shape
        k_lo = self.k_min[:, :, :n_groups].to(dtype).repeat_interleave(G, dim=2)
        k_scale = self.k_scale[:, :, :n_groups].to(dtype).repeat_interleave(G, dim=2)
        keys = k_codes * k_scale + k_lo
        v_codes = self._unpack(self.v_codes[:, :, :S]).to(dtype).view(B, K, S, D // self.vg, self.vg)
        values = v_codes * self.v_scale[:, :, :S, :, None].to(dtype) + self.v_min[:, :, :S, :, None].to(dtype)
        return keys, values.view(B, K, S, D)


@dataclass
class PackedCacheStep(CacheStep):
    """QuantizedKVCache's step: also the residual groups this step moves into packed storage."""

    pending: int = 0  # groups leaving the residual
    moved_valid: torch.Tensor | None = None  # [B, pending * G]: the moved slots that are not padding
    ring_groups: dict[str, tuple[int, list[int]]] = field(default_factory=dict)  # kind -> (skipped, ring slots)


class QuantizedKVCache(KVCacheBase):
    """The KIVI cache stored for real: packed groups (a ring of about W / G groups on sliding-window layers)
    plus a full-precision residual of the newest tokens (between R and R + G - 1 of them, plus this step's).

    Groups are formed by cache slot (step order). For one sequence, or a batch without padding, slot equals
    position and attention matches the no-cache forward exactly; in a left-padded batch a row's groups are
    shifted by its padding (padding slots are excluded from each group's range)."""

    def __init__(self, cfg: ModelConfig, kv: KVQuantConfig, batch: int, max_len: int, device=None,
                 dtype=torch.float32):
        self.cfg, self.kv, self.max_len, self.dtype, self.length = cfg, kv, max_len, dtype, 0
        G = kv.group_size
        window = min(cfg.sliding_window, max_len) if LOCAL in cfg.layer_types else 0
        # A ring slot is overwritten only once the whole group is outside every later query's window.
        self.ring = {GLOBAL: math.ceil(max_len / G), LOCAL: math.ceil(window / G) + 1}
        self.packed = [PackedGroups(batch, cfg.n_kv_heads, cfg.head_dim, self.ring[kind], kv, device)
                       for kind in cfg.layer_types]
        empty = torch.zeros(batch, cfg.n_kv_heads, 0, cfg.head_dim, device=device, dtype=dtype)
        self.res_k, self.res_v = [empty] * cfg.n_layers, [empty] * cfg.n_layers
        self.pos_packed = {kind: torch.full((batch, n * G), -1, dtype=torch.long, device=device)
                           for kind, n in self.ring.items()}
        self.pos_res = torch.zeros(batch, 0, dtype=torch.long, device=device)
        self.groups_done = 0  # groups moved from the residual into packed storage so far

    def nbytes(self) -> int:
        """Bytes held: packed codes, group minimums and scales, and the full-precision residual."""
        held = [t for p in self.packed for t in p.tensors()] + self.res_k + self.res_v
        return sum(t.numel() * t.element_size() for t in held)

    def _visible(self, kind: str, groups_done: int) -> int:
        return min(groups_done, self.ring[kind])

    def begin(self, positions: torch.Tensor) -> PackedCacheStep:
        T, start, G = positions.shape[1], self.length, self.kv.group_size
        if start + T > self.max_len:
            raise LigeroError(f"generation needs {start + T} cache slots but the cache holds {self.max_len}; "
                              "lower --max-new-tokens or shorten the prompt")
        # Groups every query of this step reads quantized: pack them now (the boundary only moves forward).
        # (With a residual of 0 the newest key may be read quantized before it is stored: attention fake-quantizes
        # keys of this step itself, so only groups already complete are packed.)
        target = min(max(0, start + 1 - self.kv.residual), start) // G
        first, pending = self.groups_done, target - self.groups_done
        moved = self.pos_res[:, : pending * G]
        keep = {kind: self._ring_groups(kind, first, pending) for kind in self.ring}
        for kind, (skip, slots) in keep.items():
            if slots:
                ring_index = (torch.tensor(slots, device=positions.device)[:, None] * G
                              + torch.arange(G, device=positions.device)).flatten()
                self.pos_packed[kind].index_copy_(1, ring_index, moved[:, skip * G:])
        self.pos_res = torch.cat([self.pos_res[:, pending * G:], positions], dim=1)
        self.groups_done = target
        key_positions = {kind: torch.cat([self.pos_packed[kind][:, : self._visible(kind, target) * G],
                                          self.pos_res], dim=1) for kind in self.ring}
        n_stored = {kind: self._visible(kind, target) * G for kind in self.ring}
        return PackedCacheStep(key_positions, slice(start, start + T), n_stored, pending=pending,
                               moved_valid=moved >= 0, ring_groups=keep)

    def _ring_groups(self, kind: str, first: int, pending: int) -> tuple[int, list[int]]:
        """(how many of the pending groups to skip, ring slots of the rest): a ring keeps only its last groups."""
        skip = max(0, pending - self.ring[kind])
        return skip, [(first + skip + i) % self.ring[kind] for i in range(pending - skip)]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, step: PackedCacheStep):
        kind, G = self.cfg.layer_types[layer], self.kv.group_size
        n = step.pending * G
        if n:
            skip, slots = step.ring_groups[kind]
            if slots:
                self.packed[layer].write(self.res_k[layer][:, :, skip * G: n], self.res_v[layer][:, :, skip * G: n],
                                         step.moved_valid[:, skip * G:], slots)
        self.res_k[layer] = torch.cat([self.res_k[layer][:, :, n:], k], dim=2)
        self.res_v[layer] = torch.cat([self.res_v[layer][:, :, n:], v], dim=2)
        k_q, v_q = self.packed[layer].read(step.n_stored[kind] // G, self.dtype)
        return torch.cat([k_q, self.res_k[layer]], dim=2), torch.cat([v_q, self.res_v[layer]], dim=2)

    def commit(self, step: PackedCacheStep) -> None:
        self.length = step.global_slots.stop


class KIVIFormat(KVFormat):
    """Keys and values quantized as KIVI: decoding keeps them in a QuantizedKVCache, and attention reads every
    key as such a cache returns it at that point of decoding (also in a forward pass without a cache)."""

    def __init__(self, kv: KVQuantConfig):
        self.kv = kv

    def new_cache(self, cfg: ModelConfig, batch: int, max_len: int, device=None,
                  dtype: torch.dtype = torch.float32) -> QuantizedKVCache:
        return QuantizedKVCache(cfg, self.kv, batch, max_len, device=device, dtype=dtype)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionInputs, scale: float,
               n_stored: int) -> torch.Tensor:
        return attention_with_quantized_kv(q, k, v, ctx.mask, ctx.q_pos, ctx.k_pos, scale, self.kv, n_stored)
