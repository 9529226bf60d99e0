"""Continuous batching (models/slots.py): requests that join a running batch, leave it, reuse its rows and grow its
cache decode exactly what they decode alone."""

from __future__ import annotations

import pytest
import torch

from ligero.errors import LigeroError
from ligero.models.generate import BatchGeneration, SamplingConfig
from ligero.models.slots import ContinuousBatch, RowRequest, SlotKVCache

SEQ = 40  # longer than the tiny models' sliding window (8)


def _alone(model, request: RowRequest) -> tuple[list[int], list[float]]:
    """The request decoded by itself (BatchGeneration, one row with its own settings)."""
    gen = BatchGeneration(model, [request.prompt], request.max_new_tokens, [request.sampling],
                          top_logprobs=request.top_logprobs)
    logprobs = []
    while not gen.done:
        logprobs += [lp for _, _, lp in gen.step()]
    return gen.tokens[0], logprobs


def _drive(model, arrivals: dict[int, list[RowRequest]], rows: int = 3, prefill_tokens: int | None = None,
           capacity: int = 16, kv_dtype: torch.dtype | None = None):
    """Run a continuous batch: requests admitted at the step numbers of `arrivals` (waiting for a free row when
    none is), prompts fed `prefill_tokens` at a time between steps. Returns per request (in arrival order):
    tokens, logprobs, the step of its first token and the step it ended."""
    batch = ContinuousBatch(model, rows, capacity=capacity, kv_dtype=kv_dtype)
    order = [r for step in sorted(arrivals) for r in arrivals[step]]
    waiting, owner = [], {}
    out = {id(r): {"tokens": [], "logprobs": [], "first": None, "end": None} for r in order}
    step = 0
    while step <= max(arrivals) or waiting or owner:
        waiting += arrivals.get(step, [])
        while waiting and batch.free:
            req = waiting.pop(0)
            owner[batch.admit(req)] = req
        batch.prefill(prefill_tokens)
        for row, token, lp in batch.step():
            rec = out[id(owner[row])]
            rec["tokens"].append(token)
            rec["logprobs"].append(lp)
            rec["first"] = step if rec["first"] is None else rec["first"]
        for row, reason in batch.reasons.items():
            if reason is not None:
                out[id(owner.pop(row))]["end"] = step
                batch.release(row)
        step += 1
    return [out[id(r)] for r in order]


def _prompt(seed: int, n: int) -> list[int]:
    return torch.randint(1, 150, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("prefill_tokens", [None, 5])
def test_requests_joining_a_running_batch_decode_what_they_decode_alone(tiny_pair, prefill_tokens):
    """Greedy and seeded sampling; prompts longer than the sliding window; joins at different steps; a fourth
    request waits for a row to free and reuses it (the previous request's keys must stay hidden)."""
    _, model, _ = tiny_pair
    reqs = [RowRequest(_prompt(1, SEQ), 12),
            RowRequest(_prompt(2, 5), 6, SamplingConfig(0.9, top_p=0.9, seed=7)),
            RowRequest(_prompt(3, 23), 9, SamplingConfig(1.0, seed=3)),
            RowRequest(_prompt(4, 11), 10)]
    got = _drive(model, {0: reqs[:1], 3: reqs[1:3], 4: reqs[3:]}, prefill_tokens=prefill_tokens)
    for req, rec in zip(reqs, got):
        tokens, logprobs = _alone(model, req)
        assert rec["tokens"] == tokens
        torch.testing.assert_close(torch.tensor(rec["logprobs"]), torch.tensor(logprobs), atol=1e-4, rtol=0)
    assert got[3]["first"] > got[1]["end"]  # it waited for a free row


def test_a_request_joining_mid_batch_starts_before_the_running_batch_ends(tiny_pair):
    _, model, _ = tiny_pair
    first, late = RowRequest(_prompt(5, 8), 30), RowRequest(_prompt(6, 30), 4)
    got = _drive(model, {0: [first], 5: [late]}, prefill_tokens=8)
    assert got[1]["first"] < got[0]["end"]
    assert got[1]["end"] < got[0]["end"]  # it also finished first: no waiting for the batch
    # chunked prefill: the long prompt (30 tokens, 8 per step) did not stop the running row
    steps_of_first = got[0]["end"] - got[0]["first"] + 1
    assert steps_of_first == len(got[0]["tokens"])


def test_logit_adjustments_and_top_logprobs_per_row(tiny_pair):
    _, model, _ = tiny_pair
    plain = RowRequest(_prompt(7, 9), 8)
    adjusted = RowRequest(_prompt(8, 9), 8, SamplingConfig(frequency_penalty=1.5, presence_penalty=0.5,
                                                           logit_bias={3: 2.0, 5: -100.0}))
    batch = ContinuousBatch(model, 2)
    rows = [batch.admit(plain), batch.admit(adjusted)]
    batch.prefill()
    tokens, alts = {r: [] for r in rows}, []
    while any(r is None for r in batch.reasons.values()):
        for row, token, _ in batch.step():
            tokens[row].append(token)
    assert tokens[rows[0]] == _alone(model, plain)[0]
    assert tokens[rows[1]] == _alone(model, adjusted)[0]
    assert 5 not in tokens[rows[1]]
    asks = RowRequest(_prompt(9, 6), 3, top_logprobs=4)
    row = batch.admit(asks) if batch.free else None
    assert row is None  # both rows still held until released
    for r in rows:
        batch.release(r)
    row = batch.admit(asks)
    batch.prefill()
    expected = torch.log_softmax(model(torch.tensor([asks.prompt]))[0, -1].float(), -1).topk(4)
    batch.step()
    alts = batch.alternatives[row]
    assert [t for t, _ in alts] == expected.indices.tolist()
    torch.testing.assert_close(torch.tensor([v for _, v in alts]), expected.values, atol=1e-4, rtol=0)


@pytest.mark.parametrize("capacity", [4, 8])  # 4: the sliding-window ring (8) grows with the capacity too
def test_the_cache_grows_and_keeps_the_running_rows(tiny_pair, capacity):
    _, model, _ = tiny_pair
    small, big = RowRequest(_prompt(10, 3), 20), RowRequest(_prompt(11, 30), 10)
    got = _drive(model, {0: [small], 4: [big]}, capacity=capacity)
    assert got[0]["tokens"] == _alone(model, small)[0] and got[1]["tokens"] == _alone(model, big)[0]


def test_native_and_layer_by_layer_steps_agree(tiny_pair, monkeypatch):
    _, model, _ = tiny_pair
    reqs = [RowRequest(_prompt(12, 12), 8), RowRequest(_prompt(13, 20), 8, SamplingConfig(0.7, seed=1))]
    native = _drive(model, {0: reqs[:1], 2: reqs[1:]})
    monkeypatch.setenv("LIGERO_DECODE_STEP", "layers")
    layers = _drive(model, {0: reqs[:1], 2: reqs[1:]})
    for a, b in zip(native, layers):
        assert a["tokens"] == b["tokens"]
        torch.testing.assert_close(torch.tensor(a["logprobs"]), torch.tensor(b["logprobs"]), atol=1e-4, rtol=0)


def test_an_fp16_cache_holds_half_the_bytes_and_decodes_close_to_fp32(tiny_pair, monkeypatch):
    """Serving's default cache (--kv-cache f16): the native step and the layer-by-layer path (torch's attention over
    the widened keys) agree on it, and it stays close to the fp32 cache (each key and value rounded once)."""
    _, model, _ = tiny_pair
    assert ContinuousBatch(model, 3, kv_dtype=torch.float16).cache.nbytes() * 2 == \
        ContinuousBatch(model, 3).cache.nbytes()
    reqs = [RowRequest(_prompt(12, 12), 8), RowRequest(_prompt(13, SEQ), 8)]  # past the sliding window
    arrivals = {0: reqs[:1], 2: reqs[1:]}
    half = _drive(model, arrivals, prefill_tokens=5, kv_dtype=torch.float16)
    full = _drive(model, arrivals, prefill_tokens=5)
    with monkeypatch.context() as m:
        m.setenv("LIGERO_DECODE_STEP", "layers")
        layers = _drive(model, arrivals, prefill_tokens=5, kv_dtype=torch.float16)
    for h, f, lay in zip(half, full, layers):
        assert h["tokens"] == lay["tokens"]
        torch.testing.assert_close(torch.tensor(h["logprobs"]), torch.tensor(lay["logprobs"]), atol=1e-4, rtol=0)
        assert h["tokens"][0] == f["tokens"][0]  # later tokens may fork at a near-tie of a random model
        assert abs(h["logprobs"][0] - f["logprobs"][0]) < 1e-2
        assert h["logprobs"][0] != f["logprobs"][0]  # the cache did round: this is not the fp32 path again


def test_bad_requests_and_full_batches_are_refused(tiny_pair):
    _, model, _ = tiny_pair
    batch = ContinuousBatch(model, 1)
    with pytest.raises(LigeroError, match="at least one token"):
        batch.admit(RowRequest([], 4))
    with pytest.raises(LigeroError, match="context"):
        batch.admit(RowRequest([1] * model.cfg.max_seq_len, 4))
    with pytest.raises(LigeroError, match="logit_bias"):
        batch.admit(RowRequest([1], 4, SamplingConfig(logit_bias={10_000: 1.0})))
    batch.admit(RowRequest([1, 2], 4))
    with pytest.raises(LigeroError, match="no free row"):
        batch.admit(RowRequest([1, 2], 4))
    cache = SlotKVCache(model.cfg, 2, 4)
    with pytest.raises(LigeroError, match="grow"):
        cache.begin(torch.tensor([[4], [0]]))


def test_a_freed_row_lends_its_prompt_prefix_to_the_next_request(tiny_pair):
    """A request that starts like the row's last prompt skips those positions (llama.cpp's slot reuse) and still
    decodes what it decodes alone; a vision-style prompt (vectors) never reuses; a sliding-window ring that has
    wrapped (the tiny models' window is 8) is not reused."""
    _, model, _ = tiny_pair
    system = _prompt(20, 4)
    first, second = RowRequest(system + [7], 2), RowRequest(system + [9, 11], 3)
    batch = ContinuousBatch(model, 1)
    for req, reused in ((first, 0), (second, len(system))):
        row = batch.admit(req)
        assert batch.reused_tokens == reused
        batch.prefill()
        tokens = []
        while batch.reasons[row] is None:
            tokens += [t for _, t, _ in batch.step()]
        assert tokens == _alone(model, req)[0]
        batch.release(row)
    embeds = model.embed_tokens(torch.tensor([system + [5]]))[0]
    batch.admit(RowRequest(system + [5], 1, embeds=embeds))
    assert batch.reused_tokens == len(system)  # unchanged: vectors are not compared
    batch.release(0)
    long = RowRequest(_prompt(21, 12), 4)
    batch.admit(long)
    batch.prefill()
    while batch.reasons[0] is None:
        batch.step()
    batch.release(0)
    again = RowRequest(long.prompt + [3], 4)
    batch.admit(again)
    wrapped = bool(model.cfg.sliding_window) and model.cfg.sliding_window < 16
    assert batch.reused_tokens == len(system) + (0 if wrapped else len(long.prompt))
    batch.prefill()
    tokens = []
    while batch.reasons[0] is None:
        tokens += [t for _, t, _ in batch.step()]
    assert tokens == _alone(model, again)[0]


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
def test_a_prompt_chunk_through_the_native_step_equals_the_layers(tiny_pair, kv_dtype):
    """Transformer.prefill_row: a chunk's tokens as the native step's rows, all on one cache row, each masked to its
    own past. Same last logits and same keys, values and positions as the layer-by-layer prefill, chunk after chunk,
    in a middle row (the other rows untouched); a model with sliding-window layers declines (None)."""
    _, model, _ = tiny_pair
    prompt = _prompt(5, 20)
    native, layers = (SlotKVCache(model.cfg, 3, 32, dtype=kv_dtype) for _ in range(2))
    with torch.inference_mode():
        got = [model.prefill_row(native, 1, prompt[a:b], a) for a, b in ((0, 12), (12, 20))]
        want = [model(torch.tensor([prompt[a:b]]), torch.arange(a, b)[None], kv_cache=layers.row(1, a),
                      last_only=True)[0, -1] for a, b in ((0, 12), (12, 20))]
    if model.cfg.sliding_window:
        assert got == [None, None]
        return
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    for kind in native.pos:
        assert torch.equal(native.pos[kind], layers.pos[kind])
    for a, b in zip(native.k + native.v, layers.k + layers.v):
        torch.testing.assert_close(a[:, :, :20], b[:, :, :20], atol=1e-5, rtol=1e-3)
        assert not a[0].any() and not a[2].any()  # rows 0 and 2: nothing written


@pytest.mark.parametrize("tiny_pair", ["llama"], indirect=True)
def test_a_prefix_is_reused_only_from_rows_that_do_not_widen_the_step(tiny_pair):
    """A step computes rows 0 up to the highest in use, so a lone request in row 3 would pay four rows per step for
    its whole life to save one prefill: with no row busy a request takes row 0 even when row 3 holds its prefix;
    with row 3 busy, row 2's prefix (inside the span) is reused."""
    _, model, _ = tiny_pair
    prompts = [_prompt(30 + k, 6) for k in range(4)]
    for busy_top in (False, True):
        batch = ContinuousBatch(model, 4)
        rows = [batch.admit(RowRequest(p, 50 if busy_top and k == 3 else 1)) for k, p in enumerate(prompts)]
        assert rows == [0, 1, 2, 3]
        batch.prefill()
        batch.step()
        for row in rows[:3] if busy_top else rows:
            batch.release(row)
        if busy_top:  # row 3 decodes on: rows 0-2 are inside the step anyway
            assert batch.admit(RowRequest(prompts[2] + [5], 2)) == 2 and batch.reused_tokens == len(prompts[2])
        else:
            assert batch.admit(RowRequest(prompts[3] + [5], 2)) == 0 and batch.reused_tokens == 0
