"""Quantized layers: packed storage in buffers (saved as-is), decode through packed kernels.

Every layer saves only its packed tensors. Decode (at most MAX_KERNEL_ROWS rows, CPU, inference) reads them
packed through Ligero's kernels; group-wise integer layers first copy theirs, once, into the int4 kernel's x8
layout (rows in bundles of 8), kept in memory beside the saved one (as many bytes again, not saved). Larger
batches (prefill) dequantize the layer's weight transiently and use torch's GEMM, except where the packed
kernel's integer dot products on int8 activations are faster (`kernel_prefills`).
Which config each layer stores is registered in ligero.quant.schemes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ligero.errors import LigeroError
from ligero.kernels import MAX_KERNEL_ROWS, NativeOp, cpu_kernels
from ligero.quant import formats, ggml
from ligero.quant.config import (
    Float16Config,
    FP4Config,
    FP8Config,
    GGMLConfig,
    Int8WeightConfig,
    IntGroupConfig,
    NF4Config,
    PartsConfig,
    QuantConfig,
    TernaryConfig,
    W8A8Config,
    scheme_spec,
)


def _use_kernel(x: torch.Tensor, any_rows: bool = False) -> bool:
    """Whether x goes through the packed kernel: decode-sized (or `any_rows`), CPU fp32, inference."""
    rows = x.numel() // x.shape[-1]
    return (any_rows or rows <= MAX_KERNEL_ROWS) and x.device.type == "cpu" and x.dtype == torch.float32 \
        and not torch.is_grad_enabled()


def _tensor_key(t: torch.Tensor) -> tuple[int, int]:
    """Identifies a tensor's current contents for caches derived from it: its storage and in-place edit count
    (tensors made under torch.inference_mode count no edits: those are identified by storage alone)."""
    return t.data_ptr(), -1 if t.is_inference() else t._version


def _round_int8_blocks(x: torch.Tensor, kernel_prefills: bool) -> torch.Tensor:
    """x for a layer with int8 activations per 32 inputs: as it is where the packed kernel takes it (the kernel
    rounds it itself, identically), otherwise rounded here (natively in one pass where the kernels are built)."""
    ext = cpu_kernels() if _use_kernel(x, any_rows=True) else None
    if ext is None:
        return formats.fake_quantize_int8_blocks(x)
    if not _use_kernel(x, kernel_prefills):  # torch's GEMM follows
        return ext.fake_quant_int8_blocks(x)
    return x


# Prefill multiplies by a dequantized fp32 weight; a layer larger than this many weights (32 MB in fp32) is
# dequantized and multiplied a block of output rows at a time, so a 32k-vocabulary head at width 2048 adds 32 MB to
# the peak instead of 262 MB (each output column is the same dot product either way).
PREFILL_BLOCK_WEIGHTS = 1 << 23


class _FrozenQuantizedMatmul(torch.autograd.Function):
    """x W^T through a frozen quantized layer with a gradient for x only: W is dequantized for the product and again
    for the backward pass, so training through the layer (QLoRA's adapters on a 4-bit base) never keeps its fp32
    weight alive between the passes, as autograd would for F.linear."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "QuantizedLinear") -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.prefill_weight().to(x.dtype))

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        return grad_y @ ctx.layer.prefill_weight().to(grad_y.dtype), None


class QuantizedLinear(nn.Module):
    """Base class: subclasses define their buffers, `dequantize(rows)` and optionally `_kernel(x2d)`."""

    config: QuantConfig
    # Whether from_float of a block of rows gives those rows of from_float of the whole (every buffer row-major over
    # the output rows, nothing computed across rows): quantize() then builds large layers a block of rows at a time.
    row_separable: bool = False

    def __init__(self, in_features: int, out_features: int, config: QuantConfig,
                 segments: tuple[int, ...] | None = None):
        super().__init__()
        self.in_features, self.out_features, self.config = in_features, out_features, config
        # Output segments of a fused projection (q, k, v / gate, up); per-tensor formats scale each separately.
        self.segments = tuple(segments or (out_features,))

    @classmethod
    def from_float(cls, weight: torch.Tensor, config: QuantConfig, segments=None) -> "QuantizedLinear":
        raise NotImplementedError

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 weight [out, in], or only the given output rows (embedding lookups)."""
        raise NotImplementedError

    def _kernel(self, x2d: torch.Tensor) -> torch.Tensor | None:
        return None

    def prefill_weight(self) -> torch.Tensor:
        """The fp32 weight that prefill's GEMM multiplies by (made for the call, not kept)."""
        return self.dequantize()

    def prefill_rows(self, start: int, stop: int) -> torch.Tensor:
        """Output rows start:stop of prefill_weight() (made for the call)."""
        return self.dequantize(torch.arange(start, stop, device=self.prefill_device()))

    def prefill_device(self) -> torch.device:
        return next(self.buffers()).device

    def kernel_prefills(self) -> bool:
        """Whether the packed kernel also serves prefill-sized inputs: true where its integer dot products on int8
        activations beat dequantizing the weight and torch's fp32 GEMM (prefill columns of docs/vs-llamacpp*.md)."""
        return False

    def native_op(self) -> NativeOp | None:
        """What the native decode step runs for this layer, or None when decode needs this module's own forward
        (the step then calls it back in Python)."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():  # training something before or around this frozen layer
            return _FrozenQuantizedMatmul.apply(x, self)
        if _use_kernel(x, self.kernel_prefills()):
            y = self._kernel(x.reshape(-1, self.in_features))
            if y is not None:
                return y.view(*x.shape[:-1], self.out_features)
        if self.out_features * self.in_features <= PREFILL_BLOCK_WEIGHTS:
            return F.linear(x, self.prefill_weight().to(x.dtype))
        step = max(1, PREFILL_BLOCK_WEIGHTS // self.in_features)
        x2d = x.reshape(-1, self.in_features)
        y = torch.empty(x2d.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        for r in range(0, self.out_features, step):
            y[:, r:r + step] = torch.mm(x2d, self.prefill_rows(r, min(r + step, self.out_features)).to(x.dtype).t())
        return y.view(*x.shape[:-1], self.out_features)

    def stored_bytes(self) -> int:
        """Bytes held in memory (the layer's buffers)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        bits = self.stored_bytes() * 8 / (self.in_features * self.out_features)
        return f"{self.in_features} -> {self.out_features}, {self.config.kind}, {bits:.2f} bits/weight"


class CompactForm:
    """A layer that can hold only its decode kernel's x8 layout (non-saved buffers named `X8`) instead of its
    saved row-major buffers (named `ROW_MAJOR`), which are then rebuilt from it on demand (`_row_major`): saving,
    export, prefill's weight, embedding lookups, reading them. Assigning one of them, loading a state dict or
    moving the layer expands it again. Mixed in before QuantizedLinear."""

    ROW_MAJOR: tuple[str, ...] = ()
    X8: tuple[str, ...] = ()
    _compact = False

    def set_compact(self, layout: list[torch.Tensor]) -> None:
        """Hold `layout` (the kernel's x8 tensors, in X8's order) as the layer's weights, in the compact form."""
        for name in self.ROW_MAJOR:
            self._buffers.pop(name, None)
        for name, t in zip(self.X8, layout):
            self.register_buffer(name, t, persistent=False)
        self._forget_layouts()
        self._compact = True

    def _forget_layouts(self) -> None:
        """Drop caches derived from the row-major buffers."""

    def _row_major(self, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """The ROW_MAJOR tensors rebuilt from the x8 layout, of all rows or of the given ones."""
        raise NotImplementedError

    def _checked_rows(self, rows: torch.Tensor | None, device) -> torch.Tensor:
        if rows is None:
            return torch.arange(self.out_features, device=device)
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.out_features):
            # the padding rows of the last bundle would read as zeros, and negative ids wrap: neither is a row
            raise LigeroError(f"row ids must be in [0, {self.out_features}), got {int(rows.min())}.."
                              f"{int(rows.max())} (a token id outside the vocabulary?)")
        return rows

    def _expand(self) -> None:
        if not self._compact:
            return
        tensors = self._row_major()
        for name in self.X8:
            del self._buffers[name]
        self._compact = False
        for name, t in zip(self.ROW_MAJOR, tensors):
            self.register_buffer(name, t)

    def __getattr__(self, name):
        if name in type(self).ROW_MAJOR and self.__dict__.get("_compact"):
            return self._row_major()[self.ROW_MAJOR.index(name)]
        return super().__getattr__(name)

    def __setattr__(self, name, value):
        if name in type(self).ROW_MAJOR and self.__dict__.get("_compact"):
            self._expand()
        super().__setattr__(name, value)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._compact:  # the saved form stays row-major
            for name, t in zip(self.ROW_MAJOR, self._row_major()):
                destination[prefix + name] = t

    def _load_from_state_dict(self, *args, **kwargs):
        self._expand()
        return super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        self._expand()
        return super()._apply(fn, recurse)


class Int8Linear(CompactForm, QuantizedLinear):
    """int8 codes [out, in] and scales: fp32 per row [out], or fp16 per 32 inputs [out, in / 32] (GGUF Q8_0).
    GGUF's Q8_0 with int8 activations (llama.cpp's arithmetic) has a compact form: the x8 layout of pack_int8_x8,
    whose kernel multiplies 8 output rows per vector (2x the row-major kernel at 1 row, 1.6x at 8-16 rows)."""

    row_separable = True
    ROW_MAJOR = ("q", "scale")
    X8 = ("codes_x8", "scale_x8")

    def __init__(self, in_features: int, out_features: int, config: Int8WeightConfig, segments=None):
        super().__init__(in_features, out_features, config, segments)
        self.register_buffer("q", torch.empty(out_features, in_features, dtype=torch.int8))
        blocks = getattr(config, "group_size", None)
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32) if blocks is None else
                             torch.empty(out_features, in_features // blocks, dtype=torch.float16))

    @classmethod
    def from_float(cls, weight, config, segments=None):
        layer = cls(weight.shape[1], weight.shape[0], config, segments)
        if getattr(config, "group_size", None) is None:
            layer.q, layer.scale = formats.quantize_int8_per_channel(weight)
        else:
            layer.q, layer.scale = formats.quantize_int8_blocks(weight, config.group_size)
        return layer

    def compact(self) -> bool:
        """Keep only the x8 layout (CompactForm) where it applies: fp16 scales per 32 inputs with int8 activations,
        on the CPU with the kernels. Returns whether the layer is compact."""
        if self._compact:
            return True
        ext = cpu_kernels()
        if ext is None or not self.act8 or self.scale.dim() != 2 or self.q.device.type != "cpu":
            return False
        self.set_compact(ext.pack_int8_x8(self.q, self.scale))
        return True

    def _row_major(self, rows=None):
        codes, scale8 = (self._buffers[n] for n in self.X8)
        rows = self._checked_rows(rows, codes.device)
        bundles, blocks = codes.shape[0], self.in_features // 32
        u, r = rows // 8, rows % 8
        # codes[u, b, k, r, i] = row 8u + r's byte 4k + i of block b, stored + 128; scales [u, b, r]
        q = (codes.view(bundles, blocks, 8, 8, 4)[u, :, :, r].reshape(len(rows), self.in_features) ^ 128)
        return q.view(torch.int8), scale8.view(bundles, blocks, 8)[u, :, r]

    def saved_bytes(self) -> int:
        """Bytes of the saved (row-major) form, without rebuilding it."""
        if not self._compact:
            return sum(t.numel() * t.element_size() for t in (self.q, self.scale))
        return self.out_features * (self.in_features + 2 * (self.in_features // 32))

    def dequantize(self, rows=None):
        if self._compact:
            q, s = self._row_major(None if rows is None else rows.reshape(-1))
        else:
            q, s = (self.q, self.scale) if rows is None else (self.q[rows], self.scale[rows])
        if s.dim() == 2:
            return formats.dequantize_int8_blocks(q, s)
        return formats.dequantize_int8_per_channel(q, s)

    def prefill_weight(self):
        ext = cpu_kernels() if self.prefill_device().type == "cpu" else None
        return ext.dequant_int8(self.q, self.scale) if ext is not None else self.dequantize()

    def prefill_rows(self, start, stop):
        ext = cpu_kernels() if self.prefill_device().type == "cpu" else None
        if ext is None:
            return super().prefill_rows(start, stop)
        if self._compact:
            return ext.dequant_int8(*self._row_major(torch.arange(start, stop)))
        return ext.dequant_int8(self.q[start:stop], self.scale[start:stop])

    @property
    def act8(self) -> bool:
        """Activations rounded to int8 per 32 inputs (W8A8's config, per token in torch, has no such field)."""
        return bool(getattr(self.config, "act_int8_blocks", False))

    def forward(self, x):
        if self.act8:
            x = _round_int8_blocks(x, self.kernel_prefills())
        return super().forward(x)

    def kernel_prefills(self):
        # Measured at 512 rows (AVX2): the int8-activation kernel matches or beats rounding + dequantize + torch's GEMM
        # on SmolLM2's, Gemma 3's and TinyLlama's layer shapes (0.95x-1.13x below 5M weights, 1.2x-1.35x above).
        return self.act8

    def _kernel(self, x2d):
        ext = cpu_kernels()
        if ext is None:
            return None
        if self._compact:
            return ext.linear_int8_x8(x2d, *(self._buffers[n] for n in self.X8), self.out_features)
        return ext.linear_int8(x2d, self.q, self.scale, self.act8)

    def native_op(self):
        if self._compact:
            return NativeOp("int8x8", [self._buffers[n] for n in self.X8], out_features=self.out_features)
        return NativeOp("int8", [self.q, self.scale], act8=self.act8)


ROW_MAJOR_NAMES = ("packed", "scale", "minimum")  # IntGroupLinear's saved buffers
X8_NAMES = ("codes_x8", "scale_x8", "minimum_x8")  # its compact form's buffers (not saved)


class IntGroupLinear(CompactForm, QuantizedLinear):
    """Group-wise integer weights: w = scale * q + minimum (fp16 per group). 4-bit codes are stored two per byte
    in GGUF's Q4 order; 2- and 3-bit codes are stored densely (8 codes in `bits` bytes) and expanded to the
    4-bit kernel layout in memory (not saved) for decode. Also stores AdaRound's and LSQ's results."""

    row_separable = True
    ROW_MAJOR, X8 = ROW_MAJOR_NAMES, X8_NAMES

    def __init__(self, in_features: int, out_features: int, config: IntGroupConfig, segments=None):
        super().__init__(in_features, out_features, config, segments)
        self.bits = config.bits
        n_groups = -(-in_features // config.group_size)
        self.register_buffer("packed", torch.empty(out_features, in_features * self.bits // 8, dtype=torch.uint8))
        self.register_buffer("scale", torch.empty(out_features, n_groups, dtype=torch.float16))
        self.register_buffer("minimum", torch.empty(out_features, n_groups, dtype=torch.float16))
        self._nibble_layout: tuple[tuple, torch.Tensor] | None = None
        self._x8_layout: tuple[tuple, list[torch.Tensor]] | None = None
        self._minimum_implied: tuple | None = None  # (scale key, minimum key, minimum == -8 scale)
        self._compact = False  # see compact()

    # --- compact form: the x8 kernel layout only ---------------------------------------------------------------
    def compact(self) -> bool:
        """Keep only the decode kernel's x8 layout of 4-bit codes (held as non-saved buffers) and drop the
        row-major buffers, which are rebuilt from it on demand: saving, export, prefill's weight, reading
        `packed` / `scale` / `minimum`. Halves the layer's memory (a Q4_0 layer then holds its file's bytes);
        assigning one of those three, loading a state dict or moving the layer expands it again. Returns whether
        the layer is compact (not for 2- and 3-bit codes, off the CPU or without the kernels)."""
        if self._compact:
            return True
        ext = cpu_kernels()
        if self.bits != 4 or ext is None or self.packed.device.type != "cpu":
            return False
        self.set_compact(self.kernel_layout(ext))
        return True

    def _forget_layouts(self) -> None:
        self._x8_layout = self._nibble_layout = self._minimum_implied = None

    def _row_major(self, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(packed, scale, minimum) rebuilt from the x8 layout (the inverse of pack_int4_x8), of all rows or of
        the given ones (embedding lookups read a few rows of the table)."""
        codes, scale8, minimum8 = (self._buffers[n] for n in X8_NAMES)
        rows = self._checked_rows(rows, codes.device)
        bundles, blocks = codes.shape[0], self.in_features // 32
        u, r = rows // 8, rows % 8
        # codes[u, b, k, r, i] = row 8u + r's byte 4k + i of block b; scales [u, g, r]
        packed = codes.view(bundles, blocks, 4, 8, 4)[u, :, :, r].reshape(len(rows), blocks * 16)
        scale = scale8.view(bundles, -1, 8)[u, :, r]
        minimum = minimum8.view(bundles, -1, 8)[u, :, r] if minimum8.numel() else scale * -8  # empty: symmetric
        return packed, scale, minimum

    def saved_bytes(self) -> int:
        """Bytes of the saved (row-major) form, without rebuilding it."""
        if not self._compact:
            return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.minimum))
        n_groups = self._buffers["scale_x8"].shape[1] // 8
        return self.out_features * (self.in_features // 2 + 4 * n_groups)

    @classmethod
    def from_float(cls, weight, config, segments=None):
        layer = cls(weight.shape[1], weight.shape[0], config, segments)
        q, layer.scale, layer.minimum = formats.quantize_int_groups(weight, layer.bits, config.group_size,
                                                                    symmetric=getattr(config, "symmetric", False))
        layer.set_codes(q)
        return layer

    def set_codes(self, q: torch.Tensor) -> None:
        self.packed = formats.pack_nibbles(q) if self.bits == 4 else formats.pack_bits(q, self.bits)

    def codes(self, packed: torch.Tensor | None = None) -> torch.Tensor:
        packed = self.packed if packed is None else packed
        return formats.unpack_nibbles(packed) if self.bits == 4 else formats.unpack_bits(packed, self.bits)

    def dequantize(self, rows=None):
        if self._compact:
            p, s, m = self._row_major(None if rows is None else rows.reshape(-1))
        else:
            p, s, m = (self.packed, self.scale, self.minimum) if rows is None else \
                (self.packed[rows], self.scale[rows], self.minimum[rows])
        return formats.dequantize_int_groups(self.codes(p), s, m, self.config.group_size)

    def forward(self, x):
        if getattr(self.config, "act_int8", False):  # LSQ W4A8: int8 activations per token
            x = formats.fake_quantize_int8_tokens(x)
        if getattr(self.config, "act_int8_blocks", False):
            x = _round_int8_blocks(x, self.kernel_prefills())
        return super().forward(x)

    def kernel_prefills(self):
        # Measured at 512 rows (AVX2, x8 layout): the int8-activation kernel beats dequantize + torch's GEMM on every
        # layer shape tried, 1.2x (SmolLM2's 576 x 576) to 1.5x (TinyLlama's 2048 x 5632); the exact kernel does
        # twice the integer work per weight and stays on the GEMM.
        return bool(getattr(self.config, "act_int8_blocks", False)) and not getattr(self.config, "act_int8", False)

    def nibbles(self) -> torch.Tensor:
        """The codes two per byte, row-major in GGUF's Q4 order ([out, in/2]): the stored tensor for 4-bit codes,
        an expansion kept in memory (not saved) for 2- and 3-bit ones."""
        if self.bits == 4:
            return self.packed
        if self._nibble_layout is None or self._nibble_layout[0] != _tensor_key(self.packed):  # new weights
            self._nibble_layout = (_tensor_key(self.packed), formats.pack_nibbles(self.codes()))
        return self._nibble_layout[1]

    def kernel_minimum(self) -> torch.Tensor:
        """The minimums for the kernels, or an empty tensor where the grid is symmetric (minimum = -8 * scale,
        exactly): the kernels then derive them from the scales and read 0.5 bit/weight less per token."""
        key = (_tensor_key(self.scale), _tensor_key(self.minimum))
        if self._minimum_implied is None or self._minimum_implied[:2] != key:  # new or reloaded weights
            implied = self.bits == 4 and getattr(self.config, "symmetric", False) and \
                torch.equal(self.minimum, self.scale * -8)
            self._minimum_implied = (*key, implied)
        # a new empty tensor, not an empty slice, which would keep the minimum's storage alive in a compact layer
        return self.minimum.new_empty((0, 0)) if self._minimum_implied[2] else self.minimum

    def kernel_layout(self, ext) -> list[torch.Tensor]:
        """[codes, scales, minimums] in the decode kernel's x8 layout (output rows in bundles of 8; made by the
        kernels once per weights and kept in memory, not saved; see pack_int4_x8 in kernels/cpu_kernels.cpp)."""
        if self._compact:
            return [self._buffers[n] for n in X8_NAMES]
        key = self._x8_key()
        if self._x8_layout is None or self._x8_layout[0] != key:  # new, reloaded or edited weights
            self._x8_layout = (key, ext.pack_int4_x8(self.nibbles(), self.scale, self.kernel_minimum()))
        return self._x8_layout[1]

    def kernel_cache(self) -> list[torch.Tensor]:
        """The decode kernel's x8 layout where it is kept beside the buffers (not compact), for
        models.pages.move_buffers to move with them; [] otherwise."""
        return [] if self._compact or self._x8_layout is None else list(self._x8_layout[1])

    def set_kernel_cache(self, tensors: list[torch.Tensor]) -> None:
        """Keep `tensors` (kernel_cache's, moved) as the x8 layout of the buffers as they are now."""
        self._x8_layout = (self._x8_key(), tensors)

    def _x8_key(self) -> tuple:
        """What the x8 layout derives from, as it is now (its cache's key)."""
        return _tensor_key(self.packed), _tensor_key(self.scale), _tensor_key(self.minimum)

    def _kernel(self, x2d):
        ext = cpu_kernels()
        if ext is None:
            return None
        return ext.linear_int4(x2d, *self.kernel_layout(ext), self.config.group_size,
                               bool(getattr(self.config, "act_int8_blocks", False)), self.out_features)

    def prefill_weight(self):
        ext = cpu_kernels() if self._compact or self.packed.device.type == "cpu" else None
        if ext is None:
            return self.dequantize()
        if self._compact:
            return ext.dequant_int4(*self._row_major(), self.config.group_size)
        return ext.dequant_int4(self.nibbles(), self.scale, self.minimum, self.config.group_size)

    def prefill_rows(self, start, stop):
        ext = cpu_kernels() if self._compact or self.packed.device.type == "cpu" else None
        if ext is None:
            return super().prefill_rows(start, stop)
        if self._compact:
            rows = torch.arange(start, stop, device=self._buffers["codes_x8"].device)
            return ext.dequant_int4(*self._row_major(rows), self.config.group_size)
        return ext.dequant_int4(self.nibbles()[start:stop], self.scale[start:stop], self.minimum[start:stop],
                                self.config.group_size)

    def native_op(self):
        if getattr(self.config, "act_int8", False):  # LSQ's per-token rounding runs in torch
            return None
        return NativeOp("int4", self.kernel_layout(cpu_kernels()), self.config.group_size,
                        bool(getattr(self.config, "act_int8_blocks", False)), out_features=self.out_features)


class GGMLLinear(QuantizedLinear):
    """Weights in a llama.cpp block format (Q5_0, Q5_1, K-quants), kept as the GGUF file stores them: `blocks`
    [out, row bytes] uint8, one row's blocks after another. Decode runs the native kernels (integer ones for the
    K-types Q4_K / Q5_K / Q6_K on AVX2, row expansion otherwise); prefill expands the layer for torch's GEMM
    (quant/ggml.py holds the layouts and the torch reference)."""

    row_separable = True

    def __init__(self, in_features: int, out_features: int, config: GGMLConfig, segments=None):
        super().__init__(in_features, out_features, config, segments)
        self.type_id = ggml.GGML_TYPE_IDS[config.ggml_type]
        self.register_buffer("blocks", torch.empty(out_features, ggml.row_bytes(config.ggml_type, in_features),
                                                   dtype=torch.uint8))

    @classmethod
    def from_float(cls, weight, config, segments=None):
        layer = cls(weight.shape[1], weight.shape[0], config, segments)
        layer.blocks = ggml.quantize_rows(weight.float(), config.ggml_type)
        return layer

    def dequantize(self, rows=None):
        data = self.blocks if rows is None else self.blocks[rows]
        return ggml.dequantize_rows(data, self.config.ggml_type)

    @property
    def act8(self) -> bool:
        """Inputs rounded as llama.cpp's CPU backend rounds them for this type (Q8_K per 256 for K-quants)."""
        return bool(getattr(self.config, "act_int8_blocks", False))

    def forward(self, x):
        if self.act8 and (not _use_kernel(x, self.kernel_prefills()) or cpu_kernels() is None):  # GEMM follows
            ext = cpu_kernels() if x.device.type == "cpu" and x.dtype == torch.float32 else None
            if ext is None:
                x = ggml.round_activations(x, self.config.ggml_type)
            else:
                x = ext.round_act_ggml(x.reshape(-1, self.in_features), self.type_id).view(x.shape)
        return super().forward(x)

    def kernel_prefills(self):
        # Measured at 128 rows, 5632 x 2048 (AVX2): the Q8_K integer kernels take 0.4x (Q4_K) and 0.7x (Q6_K) the
        # time of dequantizing + torch's GEMM; the ~16-bit split kernels and the row-expanding types do not win.
        return self.act8 and self.config.ggml_type in ("Q4_K", "Q5_K", "Q6_K")

    def _kernel(self, x2d):
        ext = cpu_kernels()
        return None if ext is None else ext.linear_ggml(x2d, self.blocks, self.type_id, self.act8)

    def prefill_weight(self):
        ext = cpu_kernels() if self.blocks.device.type == "cpu" else None
        return self.dequantize() if ext is None else ext.dequant_ggml(self.blocks, self.type_id, self.in_features)

    def prefill_rows(self, start, stop):
        ext = cpu_kernels() if self.blocks.device.type == "cpu" else None
        if ext is None:
            return self.dequantize(slice(start, stop))
        return ext.dequant_ggml(self.blocks[start:stop], self.type_id, self.in_features)

    def native_op(self):
        return NativeOp("ggml", [self.blocks], self.type_id, act8=self.act8)


class Float16Linear(QuantizedLinear):
    """16-bit weights (`weight16`: fp16 or bf16 [out, in]) computed in fp32: decode's kernel widens each weight in
    registers, prefill widens a block of rows for torch's fp32 GEMM. GGUF F16 / BF16 tensors load as they are."""

    row_separable = True

    def __init__(self, in_features: int, out_features: int, config: Float16Config, segments=None):
        super().__init__(in_features, out_features, config, segments)
        dtype = torch.float16 if config.dtype == "f16" else torch.bfloat16
        self.register_buffer("weight16", torch.empty(out_features, in_features, dtype=dtype))

    @classmethod
    def from_float(cls, weight, config, segments=None):
        layer = cls(weight.shape[1], weight.shape[0], config, segments)
        layer.weight16 = weight.to(layer.weight16.dtype)
        return layer

    def dequantize(self, rows=None):
        return (self.weight16 if rows is None else self.weight16[rows]).float()

    def prefill_rows(self, start, stop):
        return self.weight16[start:stop].float()

    def forward(self, x):
        if self.config.act16:
            x = x.to(self.weight16.dtype).to(x.dtype)
        return super().forward(x)

    def _kernel(self, x2d):
        ext = cpu_kernels()
        return None if ext is None else ext.linear_half(x2d, self.weight16)

    def native_op(self):
        return None if self.config.act16 else NativeOp("half", [self.weight16])


class PartsLinear(QuantizedLinear):
    """A fused projection held as one layer per part (`parts`, in segment order): quantized layers of their own
    configs, or full-precision Linears. The output is the parts' outputs side by side."""

    def __init__(self, in_features: int, out_features: int, config: PartsConfig, segments=None):
        super().__init__(in_features, out_features, config, segments)
        configs = config.configs()
        if len(configs) != len(self.segments):
            raise LigeroError(f"a parts config with {len(configs)} parts for a layer of {len(self.segments)} segments")
        self.parts = nn.ModuleList(
            nn.Linear(in_features, n, bias=False) if c is None else scheme_spec(c).layer(in_features, n, c)
            for c, n in zip(configs, self.segments))

    @classmethod
    def from_float(cls, weight, config, segments=None):
        layer = cls(weight.shape[1], weight.shape[0], config, segments)
        for i, (c, part) in enumerate(zip(config.configs(), weight.split(list(layer.segments)))):
            if c is None:
                layer.parts[i].weight = nn.Parameter(part.clone(), requires_grad=False)
            else:
                layer.parts[i] = scheme_spec(c).layer.from_float(part.contiguous(), c)
        return layer

    def dequantize(self, rows=None):
        if rows is not None:
            raise LigeroError("a fused projection is not an embedding table")
        return torch.cat([p.weight if isinstance(p, nn.Linear) else p.dequantize() for p in self.parts])

    def forward(self, x):
        return torch.cat([p(x) for p in self.parts], dim=-1)

    def stored_bytes(self):
        return sum(p.weight.numel() * p.weight.element_size() if isinstance(p, nn.Linear) else p.stored_bytes()
                   for p in self.parts)


FP8_CODES = {"e4m3": 1, "e5m2": 2}  # the kernels' names for the FP8 formats


class FP8Linear(QuantizedLinear):
    """FP8 bytes + fp32 scale per output channel; FP8 per-token activations when config.activations.

    This CPU has no FP8 arithmetic: products are computed in fp32 from the exact FP8 values (what FP8 tensor
    cores do with fp32 accumulation), so accuracy is the format's, speed is not FP8 hardware's.
    """

    row_separable = True

    def __init__(self, in_features: int, out_features: int, config: FP8Config, segments=None):
        super().__init__(in_features, out_features, config, segments)
        self.register_buffer("q", torch.empty(out_features, in_features, dtype=formats.FP8_DTYPES[config.fmt]))
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32))

    @classmethod
    def from_float(cls, weight, config, segments=None):
        layer = cls(weight.shape[1], weight.shape[0], config, segments)
        layer.q, layer.scale = formats.quantize_fp8_rows(weight, config.fmt)
        return layer

    def dequantize(self, rows=None):
        if rows is None:
            return self.q.float() * self.scale[:, None]
        q = self.q.view(torch.uint8)[rows].view(self.q.dtype)  # indexing is defined on bytes, not on FP8
        return q.float() * self.scale[rows][:, None]

    def forward(self, x):
        if self.config.activations:
            ext = cpu_kernels() if _use_kernel(x) else None  # decode: the native rounding, op for op the same
            x = ext.fake_quant_fp8_rows(x, FP8_CODES[self.config.fmt]) if ext is not None \
                else formats.fake_quantize_fp8_rows(x, self.config.fmt)
        return super().forward(x)

    def _kernel(self, x2d):
        ext = cpu_kernels()
        if ext is None:
            return None
        return ext.linear_lut8(x2d, self.q.view(torch.uint8), self.scale, formats.fp8_lut(self.config.fmt))

    def native_op(self):
        # FP8 activations: the native step rounds them per token itself, op for op as fake_quantize_fp8_rows
        act = FP8_CODES[self.config.fmt] if self.config.activations else 0
        return NativeOp("lut8", [self.q.view(torch.uint8), self.scale, formats.fp8_lut(self.config.fmt)], act_fp8=act)


class FP4Linear(QuantizedLinear):
    """E2M1 codes packed two per byte (as 4-bit integer codes are) + one scale byte per block; NVFP4 adds one fp32
    scale per original tensor (a fused qkv / gate_up projection keeps one per segment, as if stored unfused)."""

    def __init__(self, in_features: int, out_features: int, config: FP4Config, segments=None):
        super().__init__(in_features, out_features, config, segments)
        block = formats.FP4_BLOCK[config.fmt]
        self.register_buffer("packed", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scale_codes", torch.empty(out_features, in_features // block, dtype=torch.uint8))
        self.register_buffer("tensor_scale", torch.ones(len(self.segments), dtype=torch.float32))
        self._row_scale_cache: tuple[tuple[int, int], torch.Tensor] | None = None  # decode only (no autograd)

    @classmethod
    def from_float(cls, weight, config, segments=None):
        layer = cls(weight.shape[1], weight.shape[0], config, segments)
        codes, scale_codes, tensor_scales = zip(*(formats.quantize_fp4_blocks(w, config.fmt)
                                                  for w in weight.split(layer.segments)))
        layer.packed = formats.pack_nibbles(torch.cat(codes))
        layer.scale_codes = torch.cat(scale_codes)
        layer.tensor_scale = torch.stack(tensor_scales).reshape(len(layer.segments))
        return layer

    def row_scale(self) -> torch.Tensor:
        """The tensor scale of each output row [out]."""
        return torch.repeat_interleave(self.tensor_scale, torch.tensor(self.segments, device=self.tensor_scale.device))

    def dequantize(self, rows=None):
        p, s, t = self.packed, self.scale_codes, self.row_scale()
        if rows is not None:
            p, s, t = p[rows], s[rows], t[rows]
        return formats.dequantize_fp4_blocks(formats.unpack_nibbles(p), s, t, self.config.fmt)

    def forward(self, x):
        if self.config.activations:
            x = formats.fake_quantize_fp4(x, self.config.fmt)
        return super().forward(x)

    def _kernel(self, x2d):
        ext = cpu_kernels()
        if ext is None:
            return None
        single = len(self.segments) == 1
        y = ext.linear_lut4(x2d, self.packed, self.scale_codes, formats.fp4_scale_lut(self.config.fmt),
                            formats.E2M1_VALUES, float(self.tensor_scale[0]) if single else 1.0,
                            formats.FP4_BLOCK[self.config.fmt])
        if single:
            return y
        key = (self.tensor_scale.data_ptr(), self.tensor_scale._version)  # new or changed scales: rebuild
        if self._row_scale_cache is None or self._row_scale_cache[0] != key:
            self._row_scale_cache = (key, self.row_scale())  # one repeat_interleave per layer, not per token
        return y * self._row_scale_cache[1]

    def native_op(self):
        if self.config.activations:
            return None
        luts = [formats.fp4_scale_lut(self.config.fmt).float(), formats.E2M1_VALUES.float()]
        single = len(self.segments) == 1
        return NativeOp("lut4", [self.packed, self.scale_codes, *luts] + ([] if single else [self.row_scale()]),
                        group=formats.FP4_BLOCK[self.config.fmt],
                        tensor_scale=float(self.tensor_scale[0]) if single else 1.0)


class NF4Linear(QuantizedLinear):
    """NF4 codes packed two per byte (the 4-bit layout) + an E4M3 scale byte per group + one fp32 scale per output
    segment (a fused projection scales q, k, v separately, as if stored unfused). The LUT kernels read blocks of 32:
    for them each group's scale byte is repeated per 32 inputs, a copy made in memory (not saved)."""

    def __init__(self, in_features: int, out_features: int, config: NF4Config, segments=None):
        super().__init__(in_features, out_features, config, segments)
        self.register_buffer("packed", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scale_codes", torch.empty(out_features, in_features // config.group_size,
                                                        dtype=torch.uint8))
        self.register_buffer("tensor_scale", torch.ones(len(self.segments), dtype=torch.float32))
        self._kernel_cache: tuple[tuple, list[torch.Tensor]] | None = None

    @classmethod
    def from_float(cls, weight, config, segments=None):
        layer = cls(weight.shape[1], weight.shape[0], config, segments)
        codes, scale_codes, tensor_scales = zip(*(formats.quantize_nf4_blocks(w, config.group_size)
                                                  for w in weight.split(layer.segments)))
        layer.packed = formats.pack_nibbles(torch.cat(codes))
        layer.scale_codes = torch.cat(scale_codes)
        layer.tensor_scale = torch.stack(tensor_scales).reshape(len(layer.segments))
        return layer

    row_scale = FP4Linear.row_scale  # the same per-segment tensor scale, one per output row

    def dequantize(self, rows=None):
        p, s, t = self.packed, self.scale_codes, self.row_scale()
        if rows is not None:
            p, s, t = p[rows], s[rows], t[rows]
        return formats.dequantize_nf4_blocks(formats.unpack_nibbles(p), s, t[:, None], self.config.group_size)

    def _kernel_tensors(self) -> list[torch.Tensor]:
        """[scale codes per 32 inputs, row scales], rebuilt when the buffers change."""
        key = (self.scale_codes.data_ptr(), self.scale_codes._version, self.tensor_scale._version)
        if self._kernel_cache is None or self._kernel_cache[0] != key:
            per32 = self.scale_codes.repeat_interleave(self.config.group_size // 32, dim=1).contiguous()
            self._kernel_cache = (key, [per32, self.row_scale()])
        return self._kernel_cache[1]

    def _kernel(self, x2d):
        ext = cpu_kernels()
        if ext is None:
            return None
        per32, rows = self._kernel_tensors()
        y = ext.linear_lut4(x2d, self.packed, per32, formats.fp8_lut("e4m3"), formats.NF4_VALUES, 1.0, 32)
        return y * rows

    def native_op(self):
        per32, rows = self._kernel_tensors()
        luts = [formats.fp8_lut("e4m3").float(), formats.NF4_VALUES.float()]
        return NativeOp("lut4", [self.packed, per32, *luts, rows], group=32, tensor_scale=1.0)


class TernaryLinear(QuantizedLinear):
    """BitNet b1.58 layer for inference: trits stored 5 per byte; a 2-bit copy in the kernel's layout is
    rebuilt in memory (not saved). Each output segment (q, k, v of a fused projection) has its own scale."""

    def __init__(self, in_features: int, out_features: int, config: TernaryConfig, segments=None):
        super().__init__(in_features, out_features, config, segments)
        self.register_buffer("packed", torch.empty(-(-in_features * out_features // 5), dtype=torch.uint8))
        self.register_buffer("scale", torch.empty(len(self.segments), dtype=torch.float32))
        self._compute: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (source ptr, 2-bit layout, row scale)

    @classmethod
    def from_float(cls, weight, config, segments=None):
        layer = cls(weight.shape[1], weight.shape[0], config, segments)
        trits, scales = zip(*(formats.ternarize(w) for w in weight.split(layer.segments)))
        layer.packed = formats.pack_trits(torch.cat(trits))
        layer.scale = torch.stack(scales)
        return layer

    def trits(self) -> torch.Tensor:
        return formats.unpack_trits(self.packed, self.in_features * self.out_features).view(self.out_features, -1)

    def row_scale(self) -> torch.Tensor:
        return torch.repeat_interleave(self.scale, torch.tensor(self.segments, device=self.scale.device))

    def dequantize(self, rows=None):
        w = self.trits().float() * self.row_scale()[:, None]
        return w if rows is None else w[rows]

    def compute_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The kernel's 2-bit layout and the per-row scale (rebuilt when the weights are new or reloaded)."""
        if self._compute is None or self._compute[0] != self.packed.data_ptr():
            layout = formats.ternary_compute_layout(self.trits())
            self._compute = (self.packed.data_ptr(), layout, self.row_scale().contiguous())
        return self._compute[1], self._compute[2]

    def native_op(self):
        return NativeOp("ternary", list(self.compute_layout())) if self.in_features % 64 == 0 else None

    def kernel_prefills(self):
        return self.in_features % 64 == 0

    def forward(self, x):
        if self.kernel_prefills() and _use_kernel(x, any_rows=True) and cpu_kernels() is not None:
            layout, row_scale = self.compute_layout()
            # The kernel quantizes x per token to int8 itself, exactly as fake_quantize_int8_tokens does.
            y = cpu_kernels().linear_ternary(x.reshape(-1, self.in_features), layout, row_scale)
            return y.view(*x.shape[:-1], self.out_features)
        x = formats.fake_quantize_int8_tokens(x)  # BitNet quantizes activations per token to int8
        return F.linear(x, self.prefill_weight().to(x.dtype))

    def prefill_weight(self):
        ext = cpu_kernels() if self.in_features % 64 == 0 and self.packed.device.type == "cpu" else None
        return ext.dequant_ternary(*self.compute_layout()) if ext is not None else self.dequantize()


class W8A8Linear(Int8Linear):
    """int8 weights per channel, int8 activations per token. `smooth` (per input channel) is SmoothQuant's
    s: the layer computes (x / s) W'^T with W' = W * s, which equals x W^T before rounding."""

    row_separable = False  # the smoothing vector is computed over all rows

    def __init__(self, in_features: int, out_features: int, config: W8A8Config, segments=None):
        super().__init__(in_features, out_features, config, segments)
        self.register_buffer("smooth", torch.ones(in_features, dtype=torch.float32))

    @classmethod
    def from_float(cls, weight, config, segments=None, act_max: torch.Tensor | None = None):
        smooth = torch.ones(weight.shape[1])
        if config.smooth_alpha is not None:
            if act_max is None:
                raise LigeroError("SmoothQuant needs calibration statistics; quantize with calibration data")
            a = config.smooth_alpha
            w_max = weight.abs().amax(0).float().clamp(min=1e-5)
            smooth = (act_max.float().clamp(min=1e-5).pow(a) / w_max.pow(1 - a)).clamp(min=1e-5)
        layer = super().from_float(weight.float() * smooth[None, :], config, segments)
        layer.smooth = smooth
        return layer

    def forward(self, x):
        return super().forward(formats.fake_quantize_int8_tokens(x / self.smooth.to(x.dtype)))

    def native_op(self):
        return None  # the smoothing and per-token rounding run in torch


class QuantizedEmbedding(nn.Module):
    """Embedding lookups from a quantized [vocab, dim] table (shared with the output head when tied)."""

    def __init__(self, table: QuantizedLinear):
        super().__init__()
        self.table = table
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = self.table.dequantize(tokens.reshape(-1))
        return rows.view(*tokens.shape, self.embedding_dim)
