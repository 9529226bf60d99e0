"""The serving engine's continuous batching, driven as the request pipeline drives it (Jobs and their events), on
tiny random models: joins mid-batch, equality with single requests, cancellation freeing a row, back-pressure."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from ligero.errors import LigeroError
from ligero.models.generate import BatchGeneration, SamplingConfig
from ligero.serve.engine import Engine, EngineBusy, Job
from waiting import wait_for

TOKENIZER = SimpleNamespace(eos_ids=[], pad_id=0)
# The engine's scheduling does not depend on the architecture (tests/models/test_slots.py covers every family)
pytestmark = pytest.mark.parametrize("tiny_pair", ["llama"], indirect=True)


async def _collect(job: Job, log: list | None = None) -> tuple[list[int], str]:
    """The job's tokens and finish reason; each event also appended to `log` as (time, job id, kind)."""
    tokens = []
    while True:
        for event in await asyncio.wait_for(job.events.get(), 60):  # the worker hands events over in lists
            if log is not None:
                log.append((time.perf_counter(), id(job), event[0]))
            if event[0] == "token":
                tokens.append(event[1])
            elif event[0] == "end":
                return tokens, event[1]
            else:
                raise AssertionError(f"engine error: {event}")


def _job(prompt, n, sampling=None) -> Job:
    return Job(prompt, n, sampling or SamplingConfig(), asyncio.get_running_loop())


def _alone(model, prompt, n, sampling=None) -> list[int]:
    gen = BatchGeneration(model, [prompt], n, [sampling or SamplingConfig()])
    while not gen.done:
        gen.step()
    return gen.tokens[0]


def test_engine_decodes_continuously_and_each_request_equals_its_single_run(tiny_pair):
    _, model, _ = tiny_pair
    engine = Engine("t", model, TOKENIZER, max_batch=2)
    assert engine.continuous
    prompts = [[3, 4, 5, 6], [7, 8], [9, 10, 11, 12, 13, 14], [15]]
    settings = [None, SamplingConfig(0.8, seed=4), None, SamplingConfig(1.0, top_p=0.8, seed=9)]

    async def run():
        jobs = [_job(p, 10, s) for p, s in zip(prompts, settings)]
        for job in jobs:
            engine.submit(job)  # 4 requests, 2 rows: two wait and take the rows that free
        return await asyncio.gather(*[_collect(j) for j in jobs])

    try:
        results = asyncio.run(run())
    finally:
        engine.close()
    for (tokens, reason), p, s in zip(results, prompts, settings):
        assert reason == "length" and tokens == _alone(model, p, 10, s)
    assert engine.busy_per_step > 1  # rows were decoded together


def test_a_request_joining_mid_batch_starts_before_the_running_one_ends(tiny_pair):
    _, model, _ = tiny_pair
    engine = Engine("t", model, TOKENIZER, max_batch=4)

    async def run():
        log = []
        long = _job([1, 2, 3], 100)
        engine.submit(long)
        first = asyncio.create_task(_collect(long, log))
        while not any(kind == "token" for _, _, kind in log):
            await asyncio.sleep(0.001)
        late = _job([4, 5, 6, 7], 3)
        engine.submit(late)
        await asyncio.gather(first, _collect(late, log))
        return log, id(long), id(late)

    try:
        log, long, late = asyncio.run(run())
    finally:
        engine.close()
    late_first = min(t for t, j, kind in log if j == late and kind == "token")
    long_end = max(t for t, j, kind in log if j == long and kind == "end")
    late_end = max(t for t, j, kind in log if j == late and kind == "end")
    assert late_first < long_end and late_end < long_end


def test_a_cancelled_request_frees_its_row_at_the_next_step(tiny_pair):
    _, model, _ = tiny_pair
    engine = Engine("t", model, TOKENIZER, max_batch=1)

    async def run():
        gone = _job([1, 2, 3], 10_000 if model.cfg.max_seq_len > 10_000 else model.cfg.max_seq_len - 4)
        engine.submit(gone)
        await gone.events.get()  # its first token
        gone.cancelled.set()  # the client went away
        tokens, reason = await _collect(gone)
        nxt = _job([4, 5], 3)
        engine.submit(nxt)  # the only row is free again
        return reason, await _collect(nxt)

    try:
        reason, (tokens, nxt_reason) = asyncio.run(run())
    finally:
        engine.close()
    assert reason == "cancelled" and nxt_reason == "length" and len(tokens) == 3


def test_a_full_waiting_queue_refuses_requests(tiny_pair):
    _, model, _ = tiny_pair
    engine = Engine("t", model, TOKENIZER, max_batch=1, max_waiting=1)

    async def run():
        jobs = [_job([1, 2, 3], 40) for _ in range(2)]
        for job in jobs:
            engine.submit(job)  # one takes the row, one waits
        with pytest.raises(EngineBusy, match=r"at capacity: 1 row\(s\) busy and 1 request\(s\) waiting"):
            engine.submit(_job([1, 2], 2))  # whether or not the worker has moved one into the row yet
        for job in jobs:
            job.cancelled.set()
        return await asyncio.gather(*[_collect(j) for j in jobs])

    try:
        asyncio.run(run())
    finally:
        engine.close()


def test_a_request_is_refused_the_moment_its_row_streams(tiny_pair):
    """One row, no waiting room: once the first token of a request is out, the next is refused at once (the worker
    has not necessarily recorded the row as taken yet); once that request ends, the row takes the next."""
    _, model, _ = tiny_pair
    engine = Engine("t", model, TOKENIZER, max_batch=1, max_waiting=0)

    async def run():
        running = _job([1, 2, 3], 30)
        engine.submit(running)
        await running.events.get()  # its first token
        with pytest.raises(EngineBusy):
            engine.submit(_job([4, 5], 2))
        first_done = await _collect(running)
        nxt = _job([4, 5], 2)
        engine.submit(nxt)
        return first_done, await _collect(nxt)

    try:
        (_, reason), (tokens, nxt_reason) = asyncio.run(run())
    finally:
        engine.close()
    assert reason == "length" and nxt_reason == "length" and len(tokens) == 2


def test_a_packed_kv_cache_keeps_dynamic_batching(tiny_pair):
    """KIVI's packed cache is not a slot cache: such a variant is batched dynamically, with the same answers."""
    from ligero.io.checkpoint import load_model
    from ligero.quant.api import quantize
    from ligero.quant.config import KVQuantConfig, Recipe

    model = quantize(load_model(str(tiny_pair[2]), device="cpu").model,
                     Recipe(None, head=None, embed=None, kv=KVQuantConfig(bits=4)))
    engine = Engine("kv4", model, TOKENIZER, max_batch=4)
    assert not engine.continuous

    async def run():
        jobs = [_job([1, 2, 3, 4], 6), _job([5, 6], 6, SamplingConfig(0.9, seed=2))]
        for job in jobs:
            engine.submit(job)
        return await asyncio.gather(*[_collect(j) for j in jobs])

    try:
        results = asyncio.run(run())
    finally:
        engine.close()
    assert results[0][0] == _alone(model, [1, 2, 3, 4], 6)
    assert results[1][0] == _alone(model, [5, 6], 6, SamplingConfig(0.9, seed=2))


@pytest.mark.parametrize("spec", ["2.4", "2.3"])
def test_a_stream_whose_client_leaves_before_the_first_byte_frees_its_row(tiny_pair, spec):
    """The client is gone before the first byte: sending the headers fails (ASGI 2.4), or Starlette hears the
    disconnect first and cancels the send (2.3). The body generator never starts, yet the job is cancelled, its
    row freed at the next step, and the request recorded."""
    from starlette.requests import ClientDisconnect

    from ligero.serve.pipeline import JobStream, Outcome

    _, model, _ = tiny_pair
    engine = Engine("t", model, TOKENIZER, max_batch=1)
    recorded, started, out = [], [], Outcome(None, None)

    async def body():  # as the pipeline's events(): marks the outcome when it starts
        out.stream_started = True
        started.append(True)
        yield "data: never\n\n"

    async def send(message):
        if spec == "2.4":
            raise OSError("connection reset by peer")
        await asyncio.sleep(60)  # 2.3: cancelled when the disconnect is heard

    async def receive():
        return {"type": "http.disconnect"}

    async def run():
        job = _job([1, 2, 3], model.cfg.max_seq_len - 4)  # left alone, it would run to the context's end
        engine.submit(job)
        stream = JobStream(body(), job, out, lambda: recorded.append(job), media_type="text/event-stream")
        scope = {"type": "http", "asgi": {"spec_version": spec}}
        if spec == "2.4":
            with pytest.raises(ClientDisconnect):
                await stream(scope, receive, send)
        else:
            await asyncio.wait_for(stream(scope, receive, send), 10)
        tokens, reason = await _collect(job)
        waiting = _job([4, 5], 2)  # the only row is free again
        engine.submit(waiting)
        return tokens, reason, await _collect(waiting)

    try:
        tokens, reason, (after, after_reason) = asyncio.run(run())
    finally:
        engine.close()
    assert not started and reason == "cancelled" and len(tokens) < model.cfg.max_seq_len - 4
    assert after_reason == "length" and len(after) == 2
    assert wait_for(lambda: len(recorded) == 1)



def test_the_kv_cache_type_is_f16_only_where_the_native_attention_reads_it(tiny_pair):
    import torch

    from ligero.errors import LigeroError
    from ligero.kernels import cpu_kernels
    from ligero.serve.engine import kv_cache_dtype

    _, model, _ = tiny_pair  # fp32 on CPU
    assert kv_cache_dtype("auto", model) == (torch.float16 if cpu_kernels() is not None else torch.float32)
    assert kv_cache_dtype("f32", model) == torch.float32 and kv_cache_dtype("f16", model) == torch.float16
    bf16 = SimpleNamespace(device=torch.device("cpu"), dtype=torch.bfloat16)  # no native path: its own dtype
    assert kv_cache_dtype("auto", bf16) == torch.bfloat16
    with pytest.raises(LigeroError, match="--kv-cache must be one of auto, f16, f32"):
        Engine("bad", model, TOKENIZER, kv_cache="q8")
    engine = Engine("f32", model, TOKENIZER, max_batch=2, kv_cache="f32")
    engine.work_once()  # builds the batch
    assert engine._batch.cache.k[0].dtype == torch.float32 and engine.cache_tokens == 0


class _CountingLoop:
    """The running loop, counting the worker's hand-overs (call_soon_threadsafe)."""

    def __init__(self, loop):
        self.loop, self.calls = loop, 0

    def call_soon_threadsafe(self, *args):
        self.calls += 1
        return self.loop.call_soon_threadsafe(*args)


def test_one_hand_over_per_step_for_all_rows_and_tokens_held_for_the_stream_interval(tiny_pair):
    _, model, _ = tiny_pair

    async def run(interval_s: float):
        engine = Engine("t", model, TOKENIZER, max_batch=2, stream_interval_s=interval_s)
        loop = _CountingLoop(asyncio.get_running_loop())
        jobs = [Job([1, 2, 3], 12, SamplingConfig(), loop), Job([4, 5], 12, SamplingConfig(), loop)]
        try:
            for job in jobs:
                engine.submit(job)
            handed = [[], []]  # per job, the events of each hand-over
            for k, job in enumerate(jobs):
                while not handed[k] or handed[k][-1][-1][0] != "end":
                    handed[k].append(await asyncio.wait_for(job.events.get(), 60))
        finally:
            engine.close()
        return handed, loop.calls, engine.batches

    handed, calls, steps = asyncio.run(run(0.0))
    for lists in handed:  # every token on its own, the end with the last
        assert [len(x) for x in lists] == [1] * 11 + [2]
    assert calls <= steps + 2  # one call per step for both rows (the two prefills may hand over apart)
    handed, calls, _ = asyncio.run(run(60.0))
    for lists in handed:  # the first token at once (time to first token), the rest held until the end
        assert [[e[0] for e in x] for x in lists] == [["token"], ["token"] * 11 + ["end"]]
    assert calls <= 4


def test_a_negative_stream_interval_is_refused(tiny_pair):
    _, model, _ = tiny_pair
    with pytest.raises(LigeroError, match="--stream-interval must be >= 0 ms"):
        Engine("t", model, TOKENIZER, stream_interval_s=-0.001)
