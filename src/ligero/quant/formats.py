"""Number formats and their packed storage, as plain torch functions (the reference for the kernels).

Weights are [out, in] (torch.nn.Linear layout). Granularity is one idea, the block size along `in`:
per-channel = block of `in`, group-wise = block of 32/64/128, per-tensor = everything.
"""

from __future__ import annotations

from functools import lru_cache

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


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf: halves away from zero (torch.round rounds them to even)."""
    r = torch.trunc(x)
    return torch.where((x - r).abs() >= 0.5, r + torch.sign(x), r)  # x - r is exact in fp32


def quantize_int8_blocks(w: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per `block` inputs, GGUF Q8_0's algorithm byte for byte (llama.cpp's quantize_row_q8_0_ref):
    d = amax / 127 (kept in fp16), q = roundf(w x (1 / d)) with d in fp32 before it is stored. Returns (q int8
    [out, in], scale fp16 [out, in / block])."""
    b = w.float().reshape(w.shape[0], -1, block)
    d = b.abs().amax(-1) / 127.0
    inv = torch.where(d > 0, torch.ones_like(d) / d, torch.zeros_like(d))  # a true division, as C's 1.0f / d
    q = round_half_away(b * inv[..., None]).clamp_(-127, 127).to(torch.int8)
    return q.reshape(w.shape), d.to(torch.float16)


def dequantize_int8_blocks(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    block = q.shape[1] // scale.shape[1]
    return (q.float().reshape(q.shape[0], -1, block) * scale.float()[..., None]).reshape(q.shape)


def quantize_int_groups(w: torch.Tensor, bits: int, group: int,
                        symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest per group: w ~ q * scale + minimum, q in [0, 2^bits - 1].

    Asymmetric (GGUF's Q4_1): the group's range maps onto the codes, computed against the fp16-rounded scale and
    minimum. Symmetric (Q4_0): scale d = the group's largest-magnitude value / -2^(bits-1), minimum =
    -2^(bits-1) * scale, so that value is exactly code 0 and zero is exactly code 2^(bits-1); the codes follow
    llama.cpp's quantize_row_q4_0_ref byte for byte (q = min(qmax, trunc(w x (1 / d) + 2^(bits-1) + 0.5)), d in
    fp32 before it is stored). Both kinds are stored and computed the same way.
    The last group may be shorter when `group` does not divide `in` (576 = 4 x 128 + 64).
    Returns (q uint8 [out, in], scale f16 [out, G], minimum f16 [out, G]).
    """
    out, n = w.shape
    n_groups = -(-n // group)
    pad = n_groups * group - n
    wf = w.float()
    padded = torch.nn.functional.pad(wf, (0, pad), value=float("nan")) if pad else wf
    g = padded.view(out, n_groups, group)
    qmax = (1 << bits) - 1
    if symmetric:
        half = 1 << (bits - 1)
        filled = torch.nan_to_num(g, nan=0.0)
        extreme = filled.gather(-1, filled.abs().argmax(-1, keepdim=True)).squeeze(-1)  # signed, largest |w|
        scale16 = (extreme / -half).half()
        min16 = (scale16.float() * -half).half()  # exact: a power-of-two multiple of an fp16
    else:
        lo = torch.nan_to_num(g, nan=float("inf")).amin(-1)
        hi = torch.nan_to_num(g, nan=float("-inf")).amax(-1)
        scale16 = ((hi - lo) / qmax).half()
        min16 = lo.half()
    s = expand_groups(scale16.float(), group, n)
    m = expand_groups(min16.float(), group, n)
    if symmetric:
        d = expand_groups(extreme / -half, group, n)
        inv = torch.where(d != 0, torch.ones_like(d) / d, torch.zeros_like(d))  # a true division, as C's
        q = torch.trunc(wf * inv + (half + 0.5)).clamp_(0, qmax).to(torch.uint8)
        return q, scale16, min16
    safe = torch.where(s != 0, s, torch.ones_like(s))
    q = torch.round((wf - m) / safe).clamp_(0, qmax).to(torch.uint8)
    return q, scale16, min16


def expand_groups(per_group: torch.Tensor, group: int, n: int) -> torch.Tensor:
    """[out, G] -> [out, n]: each group value repeated over its columns (last group may be short)."""
    return per_group.repeat_interleave(group, dim=1)[:, :n]


def dequantize_int_groups(q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, group: int) -> torch.Tensor:
    n = q.shape[1]
    return q.float() * expand_groups(scale.float(), group, n) + expand_groups(minimum.float(), group, n)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[out, in] 4-bit codes 0..15 (integer or E2M1) -> [out, in/2] bytes. Per 32-value block: byte j = q[j] |
    q[j + 16] << 4 (GGUF's Q4 layout: one 16-byte load gives 16 low and 16 high values in order)."""
    out, n = q.shape
    if n % 32:
        raise ValueError(f"packing 4-bit codes needs in_features divisible by 32, got {n}")
    b = q.to(torch.uint8).view(out, n // 32, 2, 16)
    return (b[:, :, 0] | (b[:, :, 1] << 4)).reshape(out, n // 2)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    out, half = packed.shape
    b = packed.view(out, half // 16, 16)
    return torch.stack([b & 0xF, b >> 4], dim=2).reshape(out, half * 2)


# --- floating point: FP8 (E4M3, E5M2) and FP4 (E2M1) with block scales --------------------------------
FP8_MAX = {"e4m3": 448.0, "e5m2": 57344.0}
FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
_E2M1_MIDPOINTS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])


@lru_cache(maxsize=None)
def fp8_lut(fmt: str) -> torch.Tensor:
    """fp32 value of every FP8 byte (NaN codes included as NaN), on the CPU."""
    return torch.arange(256, dtype=torch.uint8, device="cpu").view(FP8_DTYPES[fmt]).float()


def quantize_fp8_rows(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 with one fp32 scale per row (per output channel for weights, per token for activations):
    the row's max |w| maps to the format's max. Returns (fp8 tensor, scale [rows])."""
    amax = w.abs().amax(dim=-1).float()
    scale = torch.where(amax > 0, amax / FP8_MAX[fmt], torch.ones_like(amax))
    scaled = (w.float() / scale[..., None]).clamp(-FP8_MAX[fmt], FP8_MAX[fmt])  # the cast does not saturate
    return scaled.to(FP8_DTYPES[fmt]), scale


def fake_quantize_fp8_rows(x: torch.Tensor, fmt: str) -> torch.Tensor:
    q, scale = quantize_fp8_rows(x, fmt)
    return (q.float() * scale[..., None]).to(x.dtype)


def e2m1_encode(v: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 code (0..15, sign in bit 3) of values already divided by their scale; saturates at ±6."""
    mag = v.abs().clamp(max=6.0)
    code = torch.bucketize(mag, _E2M1_MIDPOINTS.to(v.device))
    return (code | ((v < 0).to(code.dtype) << 3)).to(torch.uint8)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    return E2M1_VALUES.to(codes.device)[codes.long()]


@lru_cache(maxsize=None)
def e8m0_lut() -> torch.Tensor:
    """fp32 value of every E8M0 (power-of-two) scale byte: 2^(code - 127); 255 is NaN in the spec."""
    lut = torch.pow(2.0, torch.arange(256, dtype=torch.float64, device="cpu") - 127).float()
    lut[255] = float("nan")
    return lut


def quantize_fp4_blocks(w: torch.Tensor, fmt: str,
                        per_row: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MXFP4 (block 32, E8M0 scale) or NVFP4 (block 16, E4M3 scale x one fp32 scale per tensor).

    w: [..., n] with n divisible by the block. Returns (codes uint8 [..., n], scale codes uint8 [..., n/block],
    tensor scale fp32: a scalar, or [...] per row with per_row=True (activations: one per token); 1 for MXFP4).
    """
    block = FP4_BLOCK[fmt]
    *lead, n = w.shape
    b = w.float().reshape(*lead, n // block, block)
    amax = b.abs().amax(-1)
    if fmt == "mxfp4":
        # OCP MX: shared exponent floor(log2(amax)) - emax(E2M1) = ... - 2; values above 6 x scale saturate.
        exp = torch.floor(torch.log2(amax.clamp(min=2.0**-127))) - 2
        exp = exp.clamp(-127, 127)
        scale_codes = (exp + 127).to(torch.uint8)
        scale = torch.pow(2.0, exp)
        tensor_scale = torch.tensor(1.0)
    else:
        # NVFP4: block scale in E4M3 relative to a per-tensor fp32 scale that keeps block scales in range.
        t_amax = amax.amax(-1, keepdim=True) if per_row else amax.amax()
        tensor_scale = torch.where(t_amax > 0, t_amax / (6.0 * 448.0), torch.ones_like(t_amax))
        block_scale = (amax / 6.0 / tensor_scale).clamp(max=448.0).to(torch.float8_e4m3fn)
        scale_codes = block_scale.view(torch.uint8)
        scale = block_scale.float() * tensor_scale
        if per_row:
            tensor_scale = tensor_scale.squeeze(-1)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = e2m1_encode(b / safe[..., None]).reshape(*lead, n)
    return codes, scale_codes, tensor_scale.float()


FP4_BLOCK = {"mxfp4": 32, "nvfp4": 16}

# --- NF4 (QLoRA, Dettmers et al. 2023) -------------------------------------------------------------------------
# 4-bit NormalFloat: 16 levels at quantiles of N(0, 1), scaled to [-1, 1], with an exact zero (8 levels for the
# positive half, 7 for the negative); each block of weights is divided by its absolute maximum. The values are the
# paper's table (as bitsandbytes ships it).
NF4_VALUES = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
    0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])
_NF4_MIDPOINTS = (NF4_VALUES[1:] + NF4_VALUES[:-1]) / 2


def quantize_nf4_blocks(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NF4 codes per block of `block` inputs, each block scaled by its absolute maximum, the block scales
    double-quantized to E4M3 against one fp32 scale per tensor (QLoRA quantizes its fp32 block scales to 8-bit floats
    with a second scale per 256 of them; one per tensor here, as NVFP4 stores its block scales).

    w: [out, n], n divisible by the block. Returns (codes uint8 [out, n], scale codes uint8 [out, n / block],
    tensor scale fp32 scalar)."""
    out, n = w.shape
    b = w.float().reshape(out, n // block, block)
    amax = b.abs().amax(-1)
    t_amax = amax.amax()
    tensor_scale = torch.where(t_amax > 0, t_amax / 448.0, torch.ones_like(t_amax))
    # to the nearest E4M3 value: a block whose scale rounded down clips its largest weight to the +-1 level, still
    # closer on average than rounding every scale up (20.7 against 20.4 dB SQNR on Gaussian weights)
    block_scale = (amax / tensor_scale).clamp(max=448.0).to(torch.float8_e4m3fn)
    scale = block_scale.float() * tensor_scale
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.bucketize(b / safe[..., None], _NF4_MIDPOINTS.to(w.device)).to(torch.uint8)
    return codes.reshape(out, n), block_scale.view(torch.uint8), tensor_scale.float()


def dequantize_nf4_blocks(codes: torch.Tensor, scale_codes: torch.Tensor, tensor_scale: torch.Tensor,
                          block: int) -> torch.Tensor:
    *lead, n = codes.shape
    values = NF4_VALUES.to(codes.device)[codes.long()].reshape(*lead, n // block, block)
    scale = fp8_lut("e4m3").to(codes.device)[scale_codes.long()] * tensor_scale.to(codes.device)
    return (values * scale[..., None]).reshape(*lead, n)


def fp4_scale_lut(fmt: str) -> torch.Tensor:
    return e8m0_lut() if fmt == "mxfp4" else fp8_lut("e4m3")


def dequantize_fp4_blocks(codes: torch.Tensor, scale_codes: torch.Tensor, tensor_scale: torch.Tensor,
                          fmt: str) -> torch.Tensor:
    block = FP4_BLOCK[fmt]
    *lead, n = codes.shape
    values = e2m1_decode(codes).reshape(*lead, n // block, block)
    tensor_scale = tensor_scale.to(codes.device)
    tensor_scale = tensor_scale[..., None] if tensor_scale.dim() else tensor_scale
    scale = fp4_scale_lut(fmt).to(codes.device)[scale_codes.long()] * tensor_scale
    return (values * scale[..., None]).reshape(*lead, n)


def fake_quantize_fp4(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Quantize-dequantize activations per token in the FP4 block format (W4A4)."""
    codes, scale_codes, tensor_scale = quantize_fp4_blocks(x, fmt, per_row=True)
    return dequantize_fp4_blocks(codes, scale_codes, tensor_scale, fmt).to(x.dtype)


# --- ternary (BitNet b1.58) ---------------------------------------------------------------------------
def ternarize(w: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """BitNet b1.58 absmean: t = RoundClip(w / (mean|w| + eps), -1, 1). Returns (t in {-1, 0, 1} int8, scale)."""
    scale = w.abs().mean().float() + eps
    return torch.round(w.float() / scale).clamp_(-1, 1).to(torch.int8), scale


def act_quant_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax int8: q = Clip(Round(x * 127 / max|x|), -128, 127). Returns (q as float, scale [..., 1])."""
    scale = x.abs().amax(-1, keepdim=True).float().clamp(min=1e-8) / 127.0
    return torch.round(x.float() / scale).clamp_(-128, 127), scale


def fake_quantize_int8_tokens(x: torch.Tensor) -> torch.Tensor:
    q, scale = act_quant_int8(x)
    return (q * scale).to(x.dtype)


def fake_quantize_int8_blocks(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Activations rounded to int8 per `block` inputs (llama.cpp's Q8_0): q = round(x * (127 / amax)), x_hat =
    q * d with d = amax / 127 rounded to fp16 (Q8_0 stores it so), in fp32, exactly as the kernels' int8-activation
    paths compute them."""
    xf = x.float()
    b = xf.reshape(*xf.shape[:-1], xf.shape[-1] // block, block)
    amax = b.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return (torch.round(b * inv) * (amax / 127.0).half().float()).reshape(xf.shape).to(x.dtype)


_POW3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32)


def pack_trits(t: torch.Tensor) -> torch.Tensor:
    """{-1, 0, 1} -> bytes, 5 trits per byte (3^5 = 243 <= 256): 1.6 bits per weight. Flattened, zero-padded."""
    flat = (t.reshape(-1).to(torch.int32) + 1)
    pad = (-flat.numel()) % 5
    flat = torch.cat([flat, torch.ones(pad, dtype=torch.int32)]) if pad else flat
    return (flat.view(-1, 5) * _POW3).sum(-1).to(torch.uint8)


def unpack_trits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    digits = (packed.to(torch.int32)[:, None] // _POW3) % 3
    return (digits.reshape(-1)[:numel] - 1).to(torch.int8)


def ternary_compute_layout(t: torch.Tensor) -> torch.Tensor:
    """[out, in] trits -> [out, in/4] bytes for the VNNI kernel: per 64 inputs, byte j holds w+1 of inputs
    j, j+16, j+32, j+48 in bits 0-1, 2-3, 4-5, 6-7 (one 16-byte load expands to 64 ordered bytes)."""
    out, n = t.shape
    u = (t.to(torch.int32) + 1).view(out, n // 64, 4, 16)
    return (u[:, :, 0] | (u[:, :, 1] << 2) | (u[:, :, 2] << 4) | (u[:, :, 3] << 6)).to(torch.uint8).reshape(out, n // 4)


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """[out, in] values < 2^bits -> [out, in * bits / 8] bytes: every 8 values fill `bits` bytes, little-endian
    (dense 2- and 3-bit storage; in must be a multiple of 8)."""
    out, n = q.shape
    v = q.to(torch.int64).view(out, n // 8, 8) << (bits * torch.arange(8, dtype=torch.int64))
    word = v.sum(-1)  # [out, n/8], 8 * bits <= 24 bits
    packed = torch.stack([(word >> (8 * b)) & 0xFF for b in range(bits)], dim=-1)
    return packed.to(torch.uint8).reshape(out, n // 8 * bits)


def unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    out, n = packed.shape
    b = packed.to(torch.int64).view(out, n // bits, bits) << (8 * torch.arange(bits, dtype=torch.int64))
    word = b.sum(-1)
    codes = (word[..., None] >> (bits * torch.arange(8, dtype=torch.int64))) & ((1 << bits) - 1)
    return codes.to(torch.uint8).reshape(out, n // bits * 8)
