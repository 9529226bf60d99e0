"""Number formats and their packed storage, as plain torch functions (the reference for the kernels).

Weights are [out, in] (torch.nn.Linear layout). Granularity is one idea, the block size along `in`:
per-channel = block of `in`, group-wise = block of 32/64/128, per-tensor = everything.
"""

from __future__ import annotations

import torch

# --- integers -----------------------------------------------------------------------------------------


def quantize_int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: w ~ q * scale, q in [-127, 127]. Returns (q int8 [out, in], scale f32 [out])."""
    amax = w.abs().amax(dim=1).float()
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w.float() / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8_per_channel(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


def quantize_int_groups(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric round-to-nearest per group: w ~ q * scale + minimum, q in [0, 2^bits - 1].

    The last group may be shorter when `group` does not divide `in` (576 = 4 x 128 + 64).
    Scales and minimums are stored as fp16 (as GGUF's Q4_1 does); q is computed against the rounded values.
    Returns (q uint8 [out, in], scale f16 [out, G], minimum f16 [out, G]).
    """
    out, n = w.shape
    n_groups = -(-n // group)
    pad = n_groups * group - n
    wf = w.float()
    padded = torch.nn.functional.pad(wf, (0, pad), value=float("nan")) if pad else wf
    g = padded.view(out, n_groups, group)
    lo = torch.nan_to_num(g, nan=float("inf")).amin(-1)
    hi = torch.nan_to_num(g, nan=float("-inf")).amax(-1)
    qmax = (1 << bits) - 1
    scale16 = ((hi - lo) / qmax).half()
    min16 = lo.half()
    s = expand_groups(scale16.float(), group, n)
    m = expand_groups(min16.float(), group, n)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round((wf - m) / safe).clamp_(0, qmax).to(torch.uint8)
    return q, scale16, min16


def expand_groups(per_group: torch.Tensor, group: int, n: int) -> torch.Tensor:
    """[out, G] -> [out, n]: each group value repeated over its columns (last group may be short)."""
    return per_group.repeat_interleave(group, dim=1)[:, :n]


def dequantize_int_groups(q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, group: int) -> torch.Tensor:
    n = q.shape[1]
    return q.float() * expand_groups(scale.float(), group, n) + expand_groups(minimum.float(), group, n)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[out, in] values 0..15 -> [out, in/2] bytes. Per 32-value block: byte j = q[j] | q[j + 16] << 4
    (GGUF's Q4 layout: one 16-byte load gives 16 low and 16 high values in order)."""
    out, n = q.shape
    if n % 32:
        raise ValueError(f"int4 packing needs in_features divisible by 32, got {n}")
    b = q.to(torch.uint8).view(out, n // 32, 2, 16)
    return (b[:, :, 0] | (b[:, :, 1] << 4)).reshape(out, n // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    out, half = packed.shape
    b = packed.view(out, half // 16, 16)
    return torch.stack([b & 0xF, b >> 4], dim=2).reshape(out, half * 2)
