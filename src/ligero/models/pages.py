"""Large CPU tensors on 2 MB memory pages where Linux allows it (transparent huge pages, `madvise` mode or `always`).

Why: a decode step reads every weight, and with many rows every cached key and value, once. In 4 KB pages
SmolLM2-135M's packed weights (~92 MB) span ~23k pages, a TLB miss and a page walk each per token; in 2 MB pages
~50. Measured in one process, the same tensors in 2 MB pages against 4 KB, pairs alternated: the 120 int4
projections of its Q4_1 file at one row 0.82x the time (16 of 16 pairs faster), the Q8_0 head at one row 0.75x; at
16 rows 0.99x and 0.84x; attention over a 16-row fp16 cache 0.86-0.92x; the whole one-row decode 1.11x the tokens
per second (12 of 12). torch's allocator advises huge pages only under THP_MEM_ALLOC_ENABLE=1 and for single
allocations of 2 MB or more, which most layers' weights are not: so a model's weights move into one block here,
and a KV cache's layers share one. Elsewhere (no madvise, or THP off) the blocks are ordinary memory: same results.
A layer that keeps its kernel's layout in a cache beside its buffers (the int4 layers `quantize` makes) offers it
through `kernel_cache` / `set_kernel_cache`, and it moves with them.
"""

from __future__ import annotations

import mmap
import weakref

import numpy as np
import torch
from torch import nn

HUGE_PAGE = 2 << 20
ALIGN = 64  # each tensor in a block starts on a cache line (the kernels' vector loads)
_ADVISE = hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_ANONYMOUS") and hasattr(mmap, "MAP_PRIVATE")
_MOVED: weakref.WeakSet = weakref.WeakSet()  # models whose buffers moved (a deep copy is a model of its own)


def _aligned(nbytes: int) -> int:
    """Bytes a tensor of `nbytes` takes in a block (the next one starts on a cache line)."""
    return -(-nbytes // ALIGN) * ALIGN


def huge_page_block(nbytes: int) -> torch.Tensor:
    """A zero-filled uint8 CPU tensor of `nbytes`, starting on a 2 MB boundary of an anonymous private mapping
    advised MADV_HUGEPAGE (ordinary zeros where the platform has no such advice). The mapping lives as long as any
    view of the tensor."""
    if not _ADVISE:
        return torch.zeros(nbytes, dtype=torch.uint8)
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mapping.madvise(mmap.MADV_HUGEPAGE)
    array = np.frombuffer(mapping, dtype=np.uint8)  # holds the mapping
    start = -array.ctypes.data % HUGE_PAGE
    return torch.from_numpy(array[start : start + nbytes])


def zeros_many(shapes: list[tuple[int, ...]], dtype: torch.dtype, device=None) -> list[torch.Tensor]:
    """torch.zeros of each shape; on the CPU, views of one huge-page block when they come to 2 MB or more together
    (a KV cache: every layer's keys and values)."""
    item = torch.empty((), dtype=dtype).element_size()
    sizes = [int(np.prod(shape)) * item for shape in shapes]
    padded = [_aligned(n) for n in sizes]
    if not _ADVISE or sum(padded) < HUGE_PAGE or torch.device(device or "cpu").type != "cpu":
        return [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]
    block, at, out = huge_page_block(sum(padded)), 0, []
    for shape, n, step in zip(shapes, sizes, padded):
        out.append(block[at : at + n].view(dtype).view(shape))
        at += step
    return out


def moved(model: nn.Module) -> bool:
    """Whether move_buffers has run on this model (or could not: no madvise here)."""
    return not _ADVISE or model in _MOVED


def move_buffers(model: nn.Module) -> int:
    """Every CPU buffer of `model` (its quantized weights and tables; never parameters, which an optimizer may hold)
    copied into one huge-page block, each module then holding the block's view; once per model. A buffer that shares
    its storage with another tensor (a view, or one storage behind two buffers) stays where it is, so no aliasing is
    undone. Once per model: buffers it gains afterwards (quantized after decoding) stay in ordinary memory.
    Returns the bytes moved (0: nothing to move, already done, or under 2 MB in all)."""
    if moved(model):
        return 0
    owners: dict[int, tuple[torch.Tensor, list[tuple[nn.Module, str]]]] = {}
    storages: dict[int, set[int]] = {}
    for module in model.modules():
        for name, t in module._buffers.items():
            if t is None or t.device.type != "cpu" or t.numel() == 0:
                continue
            owners.setdefault(id(t), (t, []))[1].append((module, name))
            storages.setdefault(t.untyped_storage().data_ptr(), set()).add(id(t))
    movable = [(t, where) for t, where in owners.values()
               if t.is_contiguous() and len(storages[t.untyped_storage().data_ptr()]) == 1
               and t.untyped_storage().nbytes() == t.numel() * t.element_size()]
    owners.clear()
    # kernel layouts a layer keeps beside its buffers (`kernel_cache` / `set_kernel_cache`): they move too
    caches = [(m, m.kernel_cache()) for m in model.modules() if hasattr(m, "kernel_cache")]
    caches = [(m, ts) for m, ts in caches if ts and all(t.device.type == "cpu" and t.is_contiguous() for t in ts)]
    padded = lambda t: _aligned(t.numel() * t.element_size())  # noqa: E731
    total = sum(padded(t) for t, _ in movable) + sum(padded(t) for _, ts in caches for t in ts)
    if total < HUGE_PAGE:
        _MOVED.add(model)
        return 0
    # outside inference mode (the first decode step runs in it): the buffers stay ordinary tensors, which track
    # versions (layers key caches on them) and may be used by autograd later
    with torch.inference_mode(False):
        block, at = huge_page_block(total), 0

        def place(t: torch.Tensor) -> torch.Tensor:
            nonlocal at
            view = block[at : at + t.numel() * t.element_size()].view(t.dtype).view(t.shape).copy_(t)
            at += padded(t)
            return view

        # buffers one at a time, the old memory freed as soon as nothing else holds it: the peak stays about the
        # weights' size plus the largest tensor, not twice the weights (a 7B model's 4 GB); the kernel layouts a
        # layer caches are all copied before the old copies go (their keys, below)
        while movable:
            t, where = movable.pop()
            view = place(t)
            for module, name in where:
                module._buffers[name] = view
            del t, where
        placed = [(module, [place(t) for t in ts]) for module, ts in caches]
        del caches
        # last: a cache is keyed on its buffers' versions, which the block's views share (every copy_ above counts)
        for module, views in placed:
            module.set_kernel_cache(views)
    _MOVED.add(model)
    return at
