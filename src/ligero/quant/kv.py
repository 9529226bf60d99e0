"""KV-cache quantization (KIVI-style): keys per channel over groups of tokens, values per token over groups of
channels, asymmetric min/max, the most recent tokens kept in full precision.

What attention sees equals a cache that quantizes each group of G tokens once it has left the full-precision
residual window of R tokens: for a query at position t, key j is read quantized iff
j < Q(t) = floor(max(0, t + 1 - R) / G) * G (keys leave the residual in whole groups).
The cache keeps full-precision copies and quantizes on read (simulated storage; memory is reported as the
quantized size would be).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ligero.quant.config import KVQuantConfig


def _minmax_quant(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    levels = (1 << bits) - 1
    scale = (hi - lo) / levels
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant groups: zero range, exact
    return torch.round((x - lo) / safe).clamp(0, levels) * scale + lo


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


def attention_with_quantized_kv(q, k, v, mask, q_pos, k_pos, scale: float, cfg: KVQuantConfig) -> torch.Tensor:
    """q [B, H, T, D], k/v [B, K, S, D] full precision; returns [B, H, T, D] as a KIVI cache would give."""
    H, K = q.shape[1], k.shape[1]
    k_hat = fake_quantize_keys(k, k_pos, cfg.bits, cfg.group_size)
    v_hat = fake_quantize_values(v, cfg.bits, cfg.group_size)
    if H != K:  # query head h reads KV head h // (H / K)
        k, v, k_hat, v_hat = (t.repeat_interleave(H // K, dim=1) for t in (k, v, k_hat, v_hat))
    from_quant = quantized_key_mask(q_pos, k_pos, cfg)  # [B, 1, T, S]
    scores = torch.where(from_quant, q @ k_hat.transpose(-1, -2), q @ k.transpose(-1, -2)) * scale
    p = F.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return (p * from_quant) @ v_hat + (p * ~from_quant) @ v
