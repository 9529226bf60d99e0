"""llama.cpp's block formats that Ligero keeps as they are stored (Q5_0, Q5_1 and the K-quants): byte layouts and
plain-torch dequantizers, the reference the native kernels are tested against.

A weight row of `in` inputs is in / block_size blocks of block_bytes bytes, so a layer stores its GGUF tensor's
bytes unchanged ([out, row bytes] uint8): loading, saving and exporting move bytes, never values. The K-quants
have 256-input super-blocks with one or two fp16 factors and small integer scales per 16 or 32 inputs:

  Q2_K (84 B):  scales[16] (4-bit scale | 4-bit min << 4), qs[64] (2-bit codes), d, dmin  -> w = d*sc*q - dmin*m
  Q3_K (110 B): hmask[32] (3rd bit), qs[64] (low 2 bits), scales[12] (16 x 6-bit, offset 32), d  -> w = d*(sc-32)*(q-4)
  Q4_K (144 B): d, dmin, scales[12] (8 x 6-bit scale and min), qs[128]  -> w = d*sc*q - dmin*m per 32 inputs
  Q5_K (176 B): d, dmin, scales[12], qh[32] (5th bit), qs[128]  -> as Q4_K with 5-bit codes
  Q6_K (210 B): ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] int8, d  -> w = d*sc*(q-32) per 16 inputs
  Q5_0 (22 B):  d, qh (u32, 5th bits), qs[16]  -> w = d*(q-16);  Q5_1 (24 B): d, m, qh, qs -> w = d*q + m

Products are formed in llama.cpp's order (the per-block factor first: (d*sc) * q - dmin*m) in fp32, so these,
gguf's numpy dequantizers and the kernels agree to the last bit or within one rounding.
"""

from __future__ import annotations

import torch

from ligero.errors import LigeroError
from ligero.quant import formats

# type -> (inputs per block, bytes per block)
GGML_BLOCKS = {"Q5_0": (32, 22), "Q5_1": (32, 24), "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144),
               "Q5_K": (256, 176), "Q6_K": (256, 210)}
# Block types whose layers load as Ligero's int8 / int4 layers (io.gguf_file.PACKED_TYPES); dequantized here too, so
# a full-precision load reads every quantized tensor with the torch code below.
LEGACY_BLOCKS = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20)}
# The kernels' numbers for the types (kernels/cpu_kernels.cpp: GgmlType)
GGML_TYPE_IDS = {"Q5_0": 0, "Q5_1": 1, "Q2_K": 2, "Q3_K": 3, "Q4_K": 4, "Q5_K": 5, "Q6_K": 6}


def row_bytes(type_name: str, in_features: int) -> int:
    block, size = GGML_BLOCKS[type_name]
    if in_features % block:
        raise LigeroError(f"{type_name} needs rows of a multiple of {block} inputs (got {in_features})")
    return in_features // block * size


def _f16(b: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 stored at byte `at` of every block -> fp32 [N, 1]."""
    return b[:, at:at + 2].contiguous().view(torch.float16).float()


def _bits(b: torch.Tensor) -> torch.Tensor:
    """uint8 [N, k] -> their bits [N, k * 8], least significant first (bit j of byte i at 8 i + j)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=b.device)
    return ((b[..., None] >> shifts) & 1).reshape(*b.shape[:-1], -1)


def _k4_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins (as fp32 [N, 8])."""
    lo_sc, lo_m, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([lo_sc & 63, (hi & 0xF) | ((lo_sc >> 6) << 4)], dim=1)
    m = torch.cat([lo_m & 63, (hi >> 4) | ((lo_m >> 6) << 4)], dim=1)
    return sc.float(), m.float()


def _q3k_scales(s: torch.Tensor) -> torch.Tensor:
    """Q3_K: 12 bytes -> 16 six-bit scales minus 32 (fp32 [N, 16]): low 4 bits from bytes 0-7 (low nibbles for
    scales 0-7, high for 8-15), high 2 bits from bytes 8-11 (scale i: byte 8 + i % 4, bits 2 (i // 4))."""
    low = torch.cat([s[:, 0:8] & 0xF, s[:, 0:8] >> 4], dim=1)
    shifts = (2 * torch.arange(4, dtype=torch.uint8, device=s.device)).repeat_interleave(4)
    high = (s[:, 8:12].repeat(1, 4) >> shifts) & 3
    return (low | (high << 4)).float() - 32


def dequantize_blocks(blocks: torch.Tensor, type_name: str) -> torch.Tensor:
    """uint8 [N, block bytes] -> fp32 [N, block inputs]."""
    b = blocks
    n = b.shape[0]
    if type_name == "Q8_0":
        return _f16(b, 0) * b[:, 2:].contiguous().view(torch.int8).float()
    if type_name in ("Q4_0", "Q4_1"):
        off = 2 if type_name == "Q4_0" else 4
        q = torch.cat([b[:, off:] & 0xF, b[:, off:] >> 4], dim=1).float()  # low nibbles: inputs 0-15
        return _f16(b, 0) * (q - 8) if type_name == "Q4_0" else _f16(b, 0) * q + _f16(b, 2)
    if type_name in ("Q5_0", "Q5_1"):
        off = 2 if type_name == "Q5_0" else 4
        qs = b[:, off + 4:off + 20]
        q = torch.cat([qs & 0xF, qs >> 4], dim=1).float() + 16 * _bits(b[:, off:off + 4]).float()
        d = _f16(b, 0)
        return d * (q - 16) if type_name == "Q5_0" else d * q + _f16(b, 2)
    if type_name == "Q4_K" or type_name == "Q5_K":
        d, dmin = _f16(b, 0), _f16(b, 2)
        sc, m = _k4_scales(b[:, 4:16])
        qs = b[:, -128:].reshape(n, 4, 1, 32)
        q = torch.cat([qs & 0xF, qs >> 4], dim=2).reshape(n, 8, 32).float()  # sub-block 2j: low nibbles of chunk j
        if type_name == "Q5_K":
            q = q + 16 * _bits(b[:, 16:48]).reshape(n, 32, 8).transpose(1, 2).float()  # bit s of qh[l]: sub-block s
        return ((d * sc)[..., None] * q - (dmin * m)[..., None]).reshape(n, 256)
    if type_name == "Q6_K":
        ql, qh = b[:, 0:128].reshape(n, 2, 2, 32), b[:, 128:192].reshape(n, 2, 1, 32)
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).view(1, 1, 4, 1)
        low = torch.cat([ql & 0xF, ql >> 4], dim=2)  # [n, half, 4, 32]: 32-input groups k of each half
        q = (low | (((qh >> shifts) & 3) << 4)).float() - 32
        sc = b[:, 192:208].contiguous().view(torch.int8).float()
        return ((_f16(b, 208) * sc)[..., None] * q.reshape(n, 16, 16)).reshape(n, 256)
    if type_name == "Q2_K":
        s = b[:, 0:16]
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).view(1, 1, 4, 1)
        q = ((b[:, 16:80].reshape(n, 2, 1, 32) >> shifts) & 3).float().reshape(n, 16, 16)
        dl, ml = _f16(b, 80) * (s & 0xF).float(), _f16(b, 82) * (s >> 4).float()
        return (dl[..., None] * q - ml[..., None]).reshape(n, 256)
    if type_name == "Q3_K":
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).view(1, 1, 4, 1)
        low = ((b[:, 32:96].reshape(n, 2, 1, 32) >> shifts) & 3).float()  # [n, half, j, 32]
        high = _bits(b[:, 0:32]).reshape(n, 32, 2, 4).permute(0, 2, 3, 1).float()  # hmask bit 4 half + j of byte l
        q = (low - 4 * (1 - high)).reshape(n, 16, 16)
        dl = _f16(b, 108) * _q3k_scales(b[:, 96:108])
        return (dl[..., None] * q).reshape(n, 256)
    raise LigeroError(f"unknown GGML block type {type_name}; known: {', '.join(GGML_BLOCKS)}")


def round_activations(x: torch.Tensor, type_name: str) -> torch.Tensor:
    """x [..., in] rounded as llama.cpp's CPU backend rounds a `type_name` layer's inputs, back in fp32 (torch
    reference of the kernels' act8 mode). K-quants: Q8_K, per 256 inputs iscale = -127 / (the input of largest |x|,
    signed), q = min(127, round(iscale * x)) (ties to even), x_hat = q * (1 / iscale); Q5_0 / Q5_1: int8 per 32
    with an fp16 step (Q8_0 / Q8_1, as formats.fake_quantize_int8_blocks)."""
    if type_name in ("Q5_0", "Q5_1"):
        return formats.fake_quantize_int8_blocks(x)
    xf = x.float()
    b = xf.reshape(*xf.shape[:-1], xf.shape[-1] // 256, 256)
    pick = b.abs().argmax(-1, keepdim=True)  # the first of equal maxima, as llama.cpp's strict > keeps
    mx = b.gather(-1, pick)
    nonzero = mx != 0
    iscale = torch.where(nonzero, torch.full_like(mx, -127.0) / torch.where(nonzero, mx, torch.ones_like(mx)),
                         torch.zeros_like(mx))  # tensor / tensor: correctly rounded, as C's division
    d = torch.where(nonzero, torch.ones_like(iscale) / torch.where(nonzero, iscale, torch.ones_like(iscale)),
                    torch.zeros_like(iscale))
    q = torch.round(b * iscale).clamp(max=127)
    return (q * d).reshape(xf.shape).to(x.dtype)


def dequantize_rows(data: torch.Tensor, type_name: str) -> torch.Tensor:
    """A layer's stored bytes [out, row bytes] -> fp32 weight [out, in]."""
    table = GGML_BLOCKS.get(type_name) or LEGACY_BLOCKS.get(type_name)
    if table is None:
        raise LigeroError(f"unknown GGML block type {type_name}; known: {', '.join([*GGML_BLOCKS, *LEGACY_BLOCKS])}")
    block, size = table
    if data.dim() != 2 or data.shape[1] % size:
        raise LigeroError(f"{type_name} rows must be [rows, a multiple of {size} bytes], got {tuple(data.shape)}")
    n_in = data.shape[1] // size * block
    if data.shape[0] == 0:
        return torch.zeros(0, n_in)
    return dequantize_blocks(data.reshape(-1, size), type_name).reshape(data.shape[0], n_in)


# --- quantizers: llama.cpp's reference algorithms (ggml-quants.c, quantize_row_*_ref), vectorized over blocks ----
GROUP_MAX_EPS = 1e-15  # a block whose largest |x| is below this is stored as zeros
# Bit-exactness with the C reference (checked against llama.cpp's ggml-quants.c, byte for byte) needs its fp32
# arithmetic: sums left to right (_sum), C's division for number / tensor (_cdiv: torch multiplies by a rounded
# reciprocal), constants rounded to fp32 as C forms them (_f32), and a correctly rounded square root.


def _sum(t: torch.Tensor) -> torch.Tensor:
    """Row sums [N, n] -> [N, 1], accumulated left to right in fp32 as the reference's loops do."""
    acc = t[:, 0:1].clone()
    for i in range(1, t.shape[1]):
        acc = acc + t[:, i:i + 1]
    return acc


def _f32(v: float) -> float:
    return float(torch.tensor(v, dtype=torch.float32))


def _cdiv(num: float, t: torch.Tensor) -> torch.Tensor:
    """num / t rounded as C's float division."""
    return torch.full_like(t, num) / t


def _half_bytes(v: torch.Tensor) -> torch.Tensor:
    """fp32 [N] -> fp16 bytes [N, 2]."""
    return v.to(torch.float16).reshape(-1, 1).view(torch.uint8)


def _f16_round(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.float16).float()


def _signed_absmax(x: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude per row (its sign kept): [N, n] -> [N, 1]."""
    return x.gather(1, x.abs().argmax(1, keepdim=True))


def make_qx_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric codes in [0, 2 nmax) for rows of x [N, n], weighted by x^2: the scale of round(x * iscale) for
    iscale = -(nmax + 0.1 k) / max, k in -9..9, that best fits x in least squares (llama.cpp's make_qx_quants with
    rmse_type 1). Returns (scale [N], codes [N, n] uint8 with nmax added)."""
    mx = _signed_absmax(x)
    empty = x.abs().amax(1, keepdim=True) < GROUP_MAX_EPS
    mx = torch.where(empty, torch.ones_like(mx), mx)
    w = x * x

    def fit(iscale):
        q = torch.round(iscale * x).clamp(-nmax, nmax - 1)
        return q, _sum(w * x * q), _sum(w * q * q)

    best_l, sumlx, suml2 = fit(-nmax / mx)  # nmax a power of two: exact either way
    scale = torch.where(suml2 > 0, sumlx / suml2.clamp(min=1e-30), torch.zeros_like(sumlx))
    best = scale * sumlx
    for k in range(-9, 10):
        if k == 0:
            continue
        q, sumlx, suml2 = fit(_cdiv(-_f32(nmax + _f32(_f32(0.1) * k)), mx))
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        new_scale = sumlx / suml2.clamp(min=1e-30)
        best_l = torch.where(better, q, best_l)
        scale = torch.where(better, new_scale, scale)
        best = torch.where(better, new_scale * sumlx, best)
    codes = torch.where(empty, torch.zeros_like(best_l), best_l + nmax)
    return torch.where(empty, torch.zeros_like(scale), scale)[:, 0], codes.to(torch.uint8)


def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q3_K's sub-block fit (llama.cpp's make_q3_quants with do_rmse): codes in [-nmax, nmax) from iscale =
    -nmax / max, then up to 5 sweeps of coordinate descent on each code against the x^2-weighted least-squares
    scale. Returns (scale [N], codes [N, n] uint8 with nmax added)."""
    mx = _signed_absmax(x)
    empty = x.abs().amax(1, keepdim=True) < GROUP_MAX_EPS
    mx = torch.where(empty, torch.ones_like(mx), mx)
    q = torch.round(-nmax / mx * x).clamp(-nmax, nmax - 1)
    w = x * x
    sumlx, suml2 = _sum(w * x * q)[:, 0], _sum(w * q * q)[:, 0]
    for _ in range(5):
        changed = torch.zeros_like(sumlx, dtype=torch.bool)
        for i in range(x.shape[1]):  # sequential in i within a row, as the reference; vectorized over rows
            xi, wi, li = x[:, i], w[:, i], q[:, i]
            slx, sl2 = sumlx - wi * xi * li, suml2 - wi * li * li
            ok = slx > 0
            new_l = torch.round(xi * sl2 / torch.where(ok, slx, torch.ones_like(slx))).clamp(-nmax, nmax - 1)
            slx2, sl22 = slx + wi * xi * new_l, sl2 + wi * new_l * new_l
            take = ok & (new_l != li) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            q[:, i] = torch.where(take, new_l, li)
            sumlx, suml2 = torch.where(take, slx2, sumlx), torch.where(take, sl22, suml2)
            changed |= take
        if not changed.any():
            break
    scale = torch.where(suml2 > 0, sumlx / suml2.clamp(min=1e-30), torch.zeros_like(sumlx))
    scale = torch.where(empty[:, 0], torch.zeros_like(scale), scale)
    return scale, torch.where(empty, torch.zeros_like(q), q + nmax).to(torch.uint8)


def make_qkx2_quants(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
                     use_mad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric codes in [0, nmax] for rows of x [N, n] with importance w: from the min-max grid, try nstep + 1
    grids iscale = (rmin + rdelta k + nmax) / (max - min), solve the weighted least-squares scale and offset for
    each (offset kept <= 0) and keep the lowest weighted error (squared, or absolute with use_mad): llama.cpp's
    make_qkx2_quants. Returns (scale [N], minimum as a positive offset [N] (w = scale q - minimum), codes)."""
    mn = x.amin(1, keepdim=True).clamp(max=0)
    mx = x.amax(1, keepdim=True)
    flat = mx == mn
    span = torch.where(flat, torch.ones_like(mx), mx - mn)
    sum_w, sum_x = _sum(w), _sum(w * x)

    def error(scale, offset, q):
        diff = scale * q + offset - x
        return _sum(w * (diff.abs() if use_mad else diff * diff))

    iscale = _cdiv(float(nmax), span)
    best_l = torch.round(iscale * (x - mn)).clamp(0, nmax)
    scale, offset = 1 / iscale, mn
    best = error(scale, offset, best_l)
    for k in range(nstep + 1):
        # every later grid is re-centred on the best offset so far (the reference overwrites its `min`)
        num = _f32(_f32(rmin + _f32(_f32(rdelta) * k)) + nmax)
        q = torch.round(_cdiv(num, torch.where(flat, span, mx - offset)) * (x - offset)).clamp(0, nmax)
        sum_l, sum_l2, sum_xl = _sum(w * q), _sum(w * q * q), _sum(w * q * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        safe = torch.where(det > 0, det, torch.ones_like(det))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe
        positive = this_min > 0
        this_scale = torch.where(positive, sum_xl / sum_l2.clamp(min=1e-30), this_scale)
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        cur = error(this_scale, this_min, q)
        better = (det > 0) & (cur < best)
        best_l = torch.where(better, q, best_l)
        scale, offset = torch.where(better, this_scale, scale), torch.where(better, this_min, offset)
        best = torch.where(better, cur, best)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    best_l = torch.where(flat, torch.zeros_like(best_l), best_l)
    return scale[:, 0], -offset[:, 0], best_l.to(torch.uint8)


def _requantize(x: torch.Tensor, d: torch.Tensor, dm: torch.Tensor | None, lo: int, hi: int,
                previous: torch.Tensor) -> torch.Tensor:
    """Codes of x [N, n] on the stored grid d * q - dm, clamped to [lo, hi], shifted to start at 0; rows whose
    d is 0 keep their previous codes (the reference skips them)."""
    safe = torch.where(d == 0, torch.ones_like(d), d)
    q = torch.round((x + (0 if dm is None else dm)) / safe).clamp(lo, hi) - lo
    return torch.where(d == 0, previous.float(), q).to(torch.uint8)


def _pack_2bit_groups(L: torch.Tensor) -> torch.Tensor:
    """Codes [N, 256] (< 4) -> [N, 64]: per 128 inputs, byte l holds inputs l, l+32, l+64, l+96 (2 bits each)."""
    q = L.reshape(-1, 2, 4, 32).to(torch.uint8)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def _quantize_q4k_q5k(x: torch.Tensor, five: bool) -> torch.Tensor:
    n = x.shape[0]
    sub = x.reshape(n * 8, 32)
    av_x = (_sum(sub * sub) / 32).double().sqrt().float()  # torch's fp32 sqrt is not correctly rounded
    nmax = 31 if five else 15
    scales, mins, L = make_qkx2_quants(sub, av_x + sub.abs(), nmax, -0.5 if five else -1.0, 0.1, 15 if five else 20,
                                       use_mad=False)
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
    max_scale, max_min = scales.amax(1, keepdim=True), mins.amax(1, keepdim=True)
    # the reference's running maxima start at +0 (strict >): never negative, never -0 (fp16 0x8000)
    max_scale = torch.where(max_scale > 0, max_scale, torch.zeros_like(max_scale))
    max_min = torch.where(max_min > 0, max_min, torch.zeros_like(max_min))
    inv_scale = torch.where(max_scale > 0, _cdiv(63.0, max_scale.clamp(min=1e-30)), torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, _cdiv(63.0, max_min.clamp(min=1e-30)), torch.zeros_like(max_min))
    ls = torch.round(inv_scale * scales).clamp(max=63).to(torch.uint8)
    lm = torch.round(inv_min * mins).clamp(max=63).to(torch.uint8)
    packed_scales = torch.cat([ls[:, :4] | ((ls[:, 4:] >> 4) << 6), lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
                               (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)], dim=1)
    d, dmin = _f16_round(max_scale[:, 0] / 63), _f16_round(max_min[:, 0] / 63)
    dl = (d[:, None] * ls.float()).reshape(-1, 1)
    dml = (dmin[:, None] * lm.float()).reshape(-1, 1)
    L = _requantize(sub, dl, dml, 0, nmax, L).reshape(n, 4, 2, 32)
    qs = ((L[:, :, 0] & 0xF) | ((L[:, :, 1] & 0xF) << 4)).reshape(n, 128)
    head = [_half_bytes(d), _half_bytes(dmin), packed_scales]
    if not five:
        return torch.cat(head + [qs], dim=1)
    bit = (L >> 4).reshape(n, 8, 32)  # the 5th bit of sub-block s goes to bit s of qh[l]
    shifts = torch.arange(8, dtype=torch.uint8).view(1, 8, 1)
    qh = (bit << shifts).sum(1).to(torch.uint8)
    return torch.cat(head + [qh, qs], dim=1)


def _quantize_q6k(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    sub = x.reshape(n * 16, 16)
    scales, L = make_qx_quants(sub, 32)
    scales = scales.reshape(n, 16)
    max_scale = _signed_absmax(scales)
    empty = max_scale.abs() < GROUP_MAX_EPS
    iscale = -128 / torch.where(empty, torch.ones_like(max_scale), max_scale)
    d = torch.where(empty, torch.zeros_like(iscale), _f16_round(1 / iscale))
    sc = torch.round(iscale * scales).clamp(max=127)
    sc = torch.where(empty, torch.zeros_like(sc), sc)
    L = _requantize(sub, (d * sc).reshape(-1, 1), None, -32, 31, L).reshape(n, 2, 4, 32)
    L = torch.where(empty.view(n, 1, 1, 1), torch.zeros_like(L), L)
    ql = torch.cat([(L[:, :, 0] & 0xF) | ((L[:, :, 2] & 0xF) << 4), (L[:, :, 1] & 0xF) | ((L[:, :, 3] & 0xF) << 4)],
                   dim=2).reshape(n, 128)
    qh = ((L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6))
    return torch.cat([ql, qh.reshape(n, 64), sc.to(torch.int8).view(torch.uint8), _half_bytes(d[:, 0])], dim=1)


def _quantize_q2k(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    sub = x.reshape(n * 16, 16)
    scales, mins, L = make_qkx2_quants(sub, sub.abs(), 3, -0.5, 0.1, 15, use_mad=True)
    scales, mins = scales.reshape(n, 16), mins.reshape(n, 16)
    max_scale, max_min = scales.amax(1, keepdim=True), mins.amax(1, keepdim=True)
    ls = torch.where(max_scale > 0, torch.round(_cdiv(15.0, max_scale.clamp(min=1e-30)) * scales),
                     torch.zeros_like(scales))
    lm = torch.where(max_min > 0, torch.round(_cdiv(15.0, max_min.clamp(min=1e-30)) * mins), torch.zeros_like(mins))
    d = torch.where(max_scale[:, 0] > 0, _f16_round(max_scale[:, 0] / 15), torch.zeros_like(max_scale[:, 0]))
    dmin = torch.where(max_min[:, 0] > 0, _f16_round(max_min[:, 0] / 15), torch.zeros_like(max_min[:, 0]))
    ls, lm = ls.to(torch.uint8), lm.to(torch.uint8)
    dl, dml = (d[:, None] * ls.float()).reshape(-1, 1), (dmin[:, None] * lm.float()).reshape(-1, 1)
    L = _requantize(sub, dl, dml, 0, 3, L).reshape(n, 256)
    return torch.cat([ls | (lm << 4), _pack_2bit_groups(L), _half_bytes(d), _half_bytes(dmin)], dim=1)


def _quantize_q3k(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    sub = x.reshape(n * 16, 16)
    scales, L = make_q3_quants(sub, 4)
    scales = scales.reshape(n, 16)
    max_scale = _signed_absmax(scales)
    empty = max_scale == 0
    iscale = -32 / torch.where(empty, torch.ones_like(max_scale), max_scale)
    ls = (torch.round(iscale * scales).clamp(-32, 31) + 32)
    ls = torch.where(empty, torch.zeros_like(ls), ls).to(torch.uint8)  # 6-bit, offset 32
    low, high = ls & 0xF, ls >> 4
    shifts = (2 * torch.arange(4, dtype=torch.uint8)).view(1, 4, 1)
    packed_scales = torch.cat([low[:, :8] | (low[:, 8:] << 4), (high.reshape(n, 4, 4) << shifts).sum(1)
                               .to(torch.uint8)], dim=1)
    d = torch.where(empty[:, 0], torch.zeros_like(iscale[:, 0]), _f16_round(1 / iscale[:, 0]))
    dl = (d[:, None] * (ls.float() - 32)).reshape(-1, 1)
    L = _requantize(sub, dl, None, -4, 3, L).reshape(n, 256)
    hbits = (L >> 2).reshape(n, 8, 32)  # input v's 3rd bit: bit v // 32 of hmask byte v % 32
    hmask = (hbits << torch.arange(8, dtype=torch.uint8).view(1, 8, 1)).sum(1).to(torch.uint8)
    return torch.cat([hmask, _pack_2bit_groups(L & 3), packed_scales, _half_bytes(d)], dim=1)


def _quantize_q5(x: torch.Tensor, with_min: bool) -> torch.Tensor:
    n = x.shape[0]
    if with_min:
        mn, mx = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
        d = (mx - mn) / 31
        idv = torch.where(d != 0, 1 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))
        q = torch.floor((x - mn) * idv + 0.5).clamp(max=31)
        head = [_half_bytes(d[:, 0]), _half_bytes(mn[:, 0])]
    else:
        d = _signed_absmax(x) / -16
        idv = torch.where(d != 0, 1 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))
        q = torch.trunc(x * idv + 16.5).clamp(max=31)  # (int8_t)(x + 16.5f): truncation, as the reference
        head = [_half_bytes(d[:, 0])]
    q = q.to(torch.uint8)
    qs = (q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)
    qh = ((q >> 4).reshape(n, 4, 8) << torch.arange(8, dtype=torch.uint8)).sum(2).to(torch.uint8)
    return torch.cat(head + [qh, qs], dim=1)


_QUANTIZERS = {"Q5_0": lambda x: _quantize_q5(x, False), "Q5_1": lambda x: _quantize_q5(x, True),
               "Q2_K": _quantize_q2k, "Q3_K": _quantize_q3k, "Q4_K": lambda x: _quantize_q4k_q5k(x, False),
               "Q5_K": lambda x: _quantize_q4k_q5k(x, True), "Q6_K": _quantize_q6k}


NATIVE_QUANTIZERS = ("Q4_K", "Q5_K", "Q6_K")  # also in the CPU kernels: the same bytes, ~20x faster


@torch.no_grad()
def quantize_rows(weight: torch.Tensor, type_name: str, rows_per_chunk: int = 256, native: bool = True) -> torch.Tensor:
    """fp32 weight [out, in] -> the GGUF tensor's bytes [out, row bytes], a few rows at a time (the fits make
    several temporaries of the chunk's size). `native`: the CPU kernels' port of the same algorithm where there is
    one (NATIVE_QUANTIZERS; byte for byte this module's, which the tests check)."""
    block, size = GGML_BLOCKS[type_name]
    out, in_features = weight.shape
    row_bytes(type_name, in_features)  # checks the width
    if out == 0:
        return torch.zeros(0, in_features // block * size, dtype=torch.uint8)
    ext = None
    if native and type_name in NATIVE_QUANTIZERS and weight.device.type == "cpu":
        from ligero.kernels import cpu_kernels

        ext = cpu_kernels()
    parts = []
    for r in range(0, out, rows_per_chunk):
        chunk = weight[r:r + rows_per_chunk].float().reshape(-1, block)
        data = ext.quantize_kquant(chunk, GGML_TYPE_IDS[type_name]) if ext is not None else \
            _QUANTIZERS[type_name](chunk)
        parts.append(data.reshape(-1, in_features // block * size))
    return torch.cat(parts)
