"""Weights and KV caches in huge-page blocks (ligero.models.pages): the same values, the same sharing, the same
tokens; the block really is advised for 2 MB pages where Linux offers them."""

import sys

import pytest
import torch
from torch import nn

from ligero.models import pages
from ligero.models.generate import generate_tokens

ADVISED = pages._ADVISE and sys.platform.startswith("linux")


def vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping that holds `address` in this process (Linux /proc/self/smaps)."""
    inside, flags = False, None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= address < end
            elif inside and head == "VmFlags:":
                flags = line.split()[1:]
    assert flags is not None, "no mapping holds the block"
    return flags


def test_a_block_is_zeros_on_a_2mb_boundary_advised_for_huge_pages():
    block = pages.huge_page_block(3 << 20)
    assert block.dtype == torch.uint8 and block.numel() == 3 << 20 and not block.any()
    if ADVISED:
        assert block.data_ptr() % pages.HUGE_PAGE == 0
        assert "hg" in vm_flags(block.data_ptr()), "the mapping was not advised MADV_HUGEPAGE"
    block[-1] = 7  # writable to its last byte
    assert int(block[-1]) == 7


def test_zeros_many_shares_one_block_from_2mb_and_stays_ordinary_below():
    big = pages.zeros_many([(4, 3, 1400, 64), (4, 3, 1400, 64), (5,)], torch.float16)  # 4.3 MB
    assert [tuple(t.shape) for t in big] == [(4, 3, 1400, 64), (4, 3, 1400, 64), (5,)]
    assert all(t.dtype == torch.float16 and not t.any() for t in big)
    if ADVISED:
        starts = [t.data_ptr() for t in big]
        assert starts[0] % pages.HUGE_PAGE == 0 and all(s % pages.ALIGN == 0 for s in starts)
        assert starts[1] - starts[0] == big[0].numel() * 2  # one block, in order
    big[0][1, 2, 3, 4] = 1.5  # the views do not overlap
    assert int((big[0] != 0).sum()) == 1 and not big[1].any() and not big[2].any()
    small = pages.zeros_many([(2, 3)], torch.float32)
    assert small[0].shape == (2, 3) and not small[0].any()


class Holder(nn.Module):
    def __init__(self, shared: torch.Tensor):
        super().__init__()
        self.register_buffer("codes", torch.randint(0, 255, (3 << 20,), dtype=torch.uint8))
        self.register_buffer("shared", shared)
        self.weight = nn.Parameter(torch.randn(64, 64))


def test_move_buffers_keeps_values_ties_views_and_parameters():
    table = torch.randn(1024, 256)  # 1 MB, held by two modules (a tied head and embedding)
    model = nn.Sequential(Holder(table), Holder(table))
    base = torch.randn(4096)
    model[0].register_buffer("whole", base)
    model[1].register_buffer("part", base[:100])  # a view: the pair must keep sharing, so neither moves
    before = {name: t.clone() for name, t in model.named_buffers(remove_duplicate=False)}
    weight = model[0].weight
    moved = pages.move_buffers(model)
    if not ADVISED:
        assert moved == 0
        return
    assert moved >= 2 * (3 << 20) + table.numel() * 4
    for name, t in model.named_buffers(remove_duplicate=False):
        assert torch.equal(t, before[name]), name
    assert model[0].shared is model[1].shared and model[0].shared.data_ptr() != table.data_ptr()
    assert model[0].whole.data_ptr() == base.data_ptr() and model[1].part.data_ptr() == base.data_ptr()
    assert model[0].weight is weight  # parameters stay (an optimizer may hold them)
    assert pages.move_buffers(model) == 0  # once per model


def test_buffers_moved_in_inference_mode_stay_ordinary_tensors():
    model = Holder(torch.randn(8))
    with torch.inference_mode():
        moved = pages.move_buffers(model)  # as at a model's first native decode step
    assert not model.codes.is_inference() and model.codes._version >= 0  # layers key caches on versions
    if ADVISED:
        assert moved > 0 and "hg" in vm_flags(model.codes.data_ptr())


@pytest.mark.slow
def test_the_shipped_gguf_decodes_the_same_tokens_from_huge_pages(smollm2, monkeypatch):
    """SmolLM2's Q4_1 GGUF as stored (what `ligero serve` runs): its packed layers and Q8_0 head move at the first
    native step, and decode what the layers decode from where they were loaded."""
    from ligero.eval.variants import AS_SHIPPED, build_variant

    prompt = smollm2.tokenizer.encode("The capital of France is a city that")
    layered = build_variant("smollm2-135m", AS_SHIPPED).model
    monkeypatch.setenv("LIGERO_DECODE_STEP", "layers")  # no native step: the buffers stay where they were loaded
    head_before = layered.embed.table.codes_x8.data_ptr()
    expected, _ = generate_tokens(layered, [prompt], 24, eos_ids=[])
    assert layered.embed.table.codes_x8.data_ptr() == head_before
    monkeypatch.delenv("LIGERO_DECODE_STEP")
    native = build_variant("smollm2-135m", AS_SHIPPED).model
    got, _ = generate_tokens(native, [prompt], 24, eos_ids=[])
    assert got == expected
    if ADVISED:
        assert native in pages._MOVED and native.embed.table.codes_x8.data_ptr() % pages.ALIGN == 0
        assert "hg" in vm_flags(native.embed.table.codes_x8.data_ptr())


@pytest.mark.slow
def test_quantized_int4_layers_move_their_kernel_layout_too(smollm2):
    """The int4 layers `quantize` makes keep their kernel's x8 layout beside their buffers: it moves with them (the
    cache stays valid: no rebuild into ordinary memory at the next step), and decoding gives the same tokens."""
    from ligero.eval.variants import build_variant

    prompt = smollm2.tokenizer.encode("The capital of France is a city that")
    reference = build_variant("smollm2-135m", "int4").model
    pages._MOVED.add(reference)  # decodes from ordinary memory
    expected, _ = generate_tokens(reference, [prompt], 16, eos_ids=[])
    model = build_variant("smollm2-135m", "int4").model
    got, _ = generate_tokens(model, [prompt], 16, eos_ids=[])
    assert got == expected
    layer = model.layers[0].mlp.down_proj
    layout = layer.kernel_cache()
    assert layout, "the x8 layout is kept beside the buffers"
    if ADVISED:
        assert "hg" in vm_flags(layout[0].data_ptr()) and "hg" in vm_flags(layer.packed.data_ptr())
        generate_tokens(model, [prompt], 2, eos_ids=[])
        assert layer.kernel_cache()[0].data_ptr() == layout[0].data_ptr()  # still the moved layout
