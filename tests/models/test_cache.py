"""KV cache: incremental decoding equals a full forward; the rolling buffer equals a full cache past the window."""

import pytest
import torch

from ligero.models.generate import SamplingConfig, generate_tokens, left_pad
from ligero.models.transformer import LOCAL, KVCache
from tiny_models import SEQ


def incremental_logits(model, tokens, chunks):
    """Feed `tokens` [B, T] through the cache in chunks of the given sizes; return the logits [B, T, V]."""
    B, T = tokens.shape
    cache = KVCache(model.cfg, B, T)
    out, start = [], 0
    for size in chunks:
        pos = torch.arange(start, start + size).expand(B, size)
        out.append(model(tokens[:, start:start + size], pos, kv_cache=cache))
        start += size
    assert start == T
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("chunks", [[1] * SEQ, [5, 1, 1, 13, 1, 19], [SEQ]])
def test_incremental_equals_full_forward(any_tiny_pair, chunks):
    _, model, _ = any_tiny_pair
    tokens = torch.randint(0, model.cfg.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(tokens)
        inc = incremental_logits(model, tokens, chunks)
    torch.testing.assert_close(inc, full, atol=1e-5, rtol=0)


def test_rolling_buffer_is_window_sized_and_exact_past_the_window(any_tiny_pair):
    _, model, _ = any_tiny_pair
    if LOCAL not in model.cfg.layer_types:
        pytest.skip("no sliding-window layers")
    window = model.cfg.sliding_window
    cache = KVCache(model.cfg, 1, SEQ)
    local = model.cfg.layer_types.index(LOCAL)
    assert cache.k[local].shape[2] == window < SEQ  # O(window) memory, not O(sequence)
    tokens = torch.randint(0, model.cfg.vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(tokens)  # full attention with a window mask
        rolled = incremental_logits(model, tokens, [window + 3] + [1] * (SEQ - window - 3))
    torch.testing.assert_close(rolled[:, window:], full[:, window:], atol=1e-5, rtol=0)


def test_left_padded_batch_equals_single_sequences(any_tiny_pair):
    _, model, _ = any_tiny_pair
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, model.cfg.vocab_size, (n,), generator=g).tolist() for n in (3, 17, 11)]
    with torch.no_grad():
        batched, _ = generate_tokens(model, prompts, 12, SamplingConfig(), eos_ids=[], pad_id=0)
        single = [generate_tokens(model, [p], 12, SamplingConfig(), eos_ids=[], pad_id=0)[0][0] for p in prompts]
    assert batched == single


def test_left_pad_positions():
    tokens, positions = left_pad([[5, 6], [7, 8, 9]], pad_id=0)
    assert tokens.tolist() == [[0, 5, 6], [7, 8, 9]]
    assert positions.tolist() == [[-1, 0, 1], [0, 1, 2]]
