"""One served variant: a model, its tokenizer and a worker thread that decodes every request of that variant.

Continuous batching (models with a full-precision KV cache): a request joins the running batch at the next decode
step. The worker admits waiting requests into free rows of a `ContinuousBatch`, feeds their prompts at most
`prefill_chunk` tokens between two decode steps (a long prompt does not stall the rows already decoding; with no row
decoding, prompts are fed whole), and runs one forward pass per step for every ready row, each with its own sampling
settings, random stream and token budget. A row frees the step it finishes (EOS, budget, a stop string, a guardrail,
a client that went away) and the next waiting request takes it. Models whose KV cache is packed (KIVI) keep dynamic
batching: a batch forms from the requests waiting, and requests that arrive meanwhile wait for the next batch.

Back-pressure: at most `max_waiting` requests wait for a row; `submit` refuses more with `EngineBusy` (the server
answers 429 with Retry-After).

Requests talk to the worker through `Job`: the worker hands ("token", id, logprob, alternatives) and ("end", reason)
events to the job's asyncio queue as lists (thread-safe via the event loop; alternatives are the job's `top_logprobs`
most likely tokens as [(id, logprob)], or None when it asked for none), and reads `job.cancelled`, which the request
handler sets to stop its row (a stop string, a blocked output or a disconnect).

Stream interval: tokens are held in the job's outbox and handed over once per decode step for all rows together (one
wake-up of the event loop), and a row's tokens no more often than every `stream_interval_s` (default 16 ms, one frame
of a 60 Hz screen): at one client a token takes ~5 ms, and every hand-over costs a wake-up, the output filter, an SSE
event and the client's parsing on the same cores as the decode (measured against handing over every token, rounds
interleaved: one client +5 % tok/s, 16 clients +8 %). A request's first token and its end are handed over at once, so
time to first token does not change. With more than ROWS_PER_INTERVAL (4) rows decoding the interval grows in
proportion (16 rows: 4 x 16 = 64 ms, the cadence llama.cpp's server streams at with 16 clients), so hand-overs stay at
most ~250 a second whatever the number of clients: the per-event work of the server's loop and of the clients runs on
the cores the decode needs (16 clients, rounds interleaved: +10 % tok/s over a fixed 16 ms, 6 rounds of 6 better).
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ligero.errors import LigeroError
from ligero.kernels import cpu_kernels
from ligero.models.generate import BatchGeneration, SamplingConfig
from ligero.models.slots import ContinuousBatch, RowRequest
from ligero.models.transformer import KVFormat


@dataclass
class Job:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingConfig
    loop: asyncio.AbstractEventLoop
    top_logprobs: int = 0  # alternatives to report per generated token
    prompt_embeds: torch.Tensor | None = None  # [len(prompt_ids), C]: a vision prompt's input vectors
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    on_done: Callable[[], None] | None = None  # called once, with the job's last event ("end" or "error")
    outbox: list[tuple] = field(default_factory=list)  # token events not yet handed to the event loop
    handed: float | None = None  # when tokens were last handed over (None: none yet)

    def emit(self, *event) -> None:
        """Called from the worker thread: hand an event (and any held tokens before it) to the request's loop now."""
        self.post(*event)
        deliver({self.loop: [self]})

    def post(self, *event) -> None:
        """Called from the worker thread: hold an event in the outbox until the next hand-over."""
        if event[0] in ("end", "error") and self.on_done is not None:
            done, self.on_done = self.on_done, None
            done()
        self.outbox.append(event)

    def due(self, now: float, interval_s: float) -> bool:
        """Whether the outbox goes to the loop now: an end, the first token, or `interval_s` since the last."""
        box = self.outbox
        return bool(box) and (box[-1][0] != "token" or self.handed is None or now - self.handed >= interval_s)


def _put(batches: list[tuple[Job, list[tuple]]]) -> None:
    for job, events in batches:
        job.events.put_nowait(events)


def deliver(by_loop: dict[asyncio.AbstractEventLoop, list[Job]]) -> None:
    """Hand the jobs' outboxes to their event loops: one call per loop, whatever the number of jobs."""
    now = time.perf_counter()
    for loop, jobs in by_loop.items():
        batches = []
        for job in jobs:
            batches.append((job, job.outbox))
            job.outbox, job.handed = [], now
        try:
            loop.call_soon_threadsafe(_put, batches)
        except RuntimeError:  # the loop is closed (server shutting down): nobody is listening
            pass


STREAM_INTERVAL_S = 0.016  # see the module's docstring: "Stream interval"
ROWS_PER_INTERVAL = 4  # rows handed over per stream interval before the interval grows (module docstring)


def stream_interval(base_s: float, rows: int) -> float:
    """The stream interval with `rows` rows decoding: `base_s` up to ROWS_PER_INTERVAL rows, then growing with them,
    so hand-overs per second stay at most ROWS_PER_INTERVAL per `base_s`."""
    return base_s * max(1.0, rows / ROWS_PER_INTERVAL)


def hand_over(jobs, interval_s: float) -> None:
    """After a step: the outboxes that are due go to their loops, one call per loop. `interval_s` is the base
    interval; it grows with the number of jobs (stream_interval)."""
    interval_s = stream_interval(interval_s, len(jobs))
    now, by_loop = time.perf_counter(), {}
    for job in jobs:
        if job.due(now, interval_s):
            by_loop.setdefault(job.loop, []).append(job)
    if by_loop:
        deliver(by_loop)


class EngineBusy(LigeroError):
    """The engine's waiting queue is full: the request is refused, not queued (HTTP 429)."""


# --kv-cache: how the continuous batch stores keys and values. f16 is llama.cpp's default cache type: half the bytes
# attention reads per step (at 16 rows decode attention is bound by those reads), one rounding of each key. "auto"
# takes f16 where the native CPU attention reads it directly (an fp32 model on CPU with the kernels built), else the
# model's own dtype: elsewhere an f16 cache would be converted back on every step, more traffic rather than less.
KV_CACHE_TYPES = {"auto": None, "f16": torch.float16, "f32": torch.float32}


def check_kv_cache(kv_cache: str) -> None:
    if kv_cache not in KV_CACHE_TYPES:
        raise LigeroError(f"--kv-cache must be one of {', '.join(KV_CACHE_TYPES)}, got {kv_cache!r}")


def kv_cache_dtype(kv_cache: str, model) -> torch.dtype:
    """The dtype `--kv-cache` gives the continuous batch of `model`."""
    if kv_cache != "auto":
        return KV_CACHE_TYPES[kv_cache]
    native = model.device.type == "cpu" and model.dtype == torch.float32 and cpu_kernels() is not None
    return torch.float16 if native else model.dtype


class Engine:
    """The worker of one variant. `submit` is thread-safe; `stats` feeds /metrics."""

    def __init__(self, name: str, model, tokenizer, max_batch: int = 16, batch_wait_s: float = 0.005,
                 compute_lock: threading.Lock | None = None, max_waiting: int = 64, prefill_chunk: int = 128,
                 kv_cache: str = "auto", stream_interval_s: float = STREAM_INTERVAL_S):
        if max_batch < 1:
            raise LigeroError(f"--max-batch must be >= 1, got {max_batch}")
        if max_waiting < 0:
            raise LigeroError(f"--max-waiting must be >= 0, got {max_waiting}")
        if prefill_chunk < 1:
            raise LigeroError(f"--prefill-chunk must be >= 1, got {prefill_chunk}")
        if not stream_interval_s >= 0:
            raise LigeroError(f"--stream-interval must be >= 0 ms, got {stream_interval_s * 1000:g}")
        check_kv_cache(kv_cache)
        self.kv_cache, self.stream_interval_s = kv_cache, stream_interval_s
        self.name, self.model, self.tokenizer = name, model, tokenizer
        self.max_batch, self.batch_wait_s = max_batch, batch_wait_s
        self.max_waiting, self.prefill_chunk = max_waiting, prefill_chunk
        self.continuous = type(model.kv_format) is KVFormat  # a packed KV cache keeps dynamic batching
        self.waiting: queue.Queue[Job | None] = queue.Queue()
        self.pending: collections.deque[Job] = collections.deque()  # taken from `waiting`, no free row yet
        self.batches = 0  # dynamic: batches run so far; continuous: decode steps run
        self.running = 0  # rows holding a request now
        # Requests accepted and not finished (waiting, pending or on a row), counted under a lock at submit and at
        # their last event: `running` and the queues are updated by the worker a moment after a row fills or frees,
        # so back-pressure read from them could let a request in while every row is already taken.
        self._held, self._held_lock = 0, threading.Lock()
        self.stepped_rows = 0  # rows summed over the decode steps (busy rows per step = stepped_rows / batches)
        self.cache_capacity = 0  # KV cache positions available (continuous batching)
        self.reused_tokens = 0  # prompt tokens whose keys a row still held (prefix reuse), not prefilled again
        # Engines of one server share the CPU: each forward step holds this lock, so variants take turns step by
        # step instead of oversubscribing the cores.
        self.compute_lock = compute_lock or threading.Lock()
        self.wake = threading.Event()  # set on every submit: a shared runner (run_engines) waits on it
        self._batch: ContinuousBatch | None = None  # continuous: the rows, their jobs, open until close()
        self._jobs: dict[int, Job] = {}
        self._open = True
        self._thread: threading.Thread | None = None
        self._external = False  # True once run_engines drives this engine from its caller's thread
        self._start_lock = threading.Lock()

    def _ensure_worker(self) -> None:
        """A worker thread of the engine's own, started with the first request unless run_engines drives it."""
        with self._start_lock:
            if self._thread is None and not self._external:
                target = self._work_continuous if self.continuous else self._work
                self._thread = threading.Thread(target=target, name=f"ligero-engine-{self.name}", daemon=True)
                self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue a request; EngineBusy when every row is taken and `max_waiting` requests already wait."""
        with self._held_lock:
            if self._held >= self.max_waiting + self.max_batch:
                raise EngineBusy(f"variant {self.name} is at capacity: {self.max_batch} row(s) busy and "
                                 f"{self.max_waiting} request(s) waiting")
            self._held += 1
        job.on_done = self._release
        self._ensure_worker()
        self.waiting.put(job)
        self.wake.set()

    def _release(self) -> None:
        with self._held_lock:
            self._held -= 1

    def close(self) -> None:
        self.waiting.put(None)
        self.wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        elif self._external:  # nobody decodes any more: answer what is still held or waiting
            while True:
                try:
                    job = self.waiting.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    self.pending.append(job)
            for job in [*self._jobs.values(), *self.pending]:
                job.emit("error", "the server is shutting down")
            self._jobs.clear()
            self.pending.clear()

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a row (llama.cpp's requests_deferred)."""
        return self.waiting.qsize() + len(self.pending)

    @property
    def busy_per_step(self) -> float:
        return self.stepped_rows / self.batches if self.batches else 0.0

    # --- continuous batching (worker thread) ----------------------------------------------------------------

    def _take_waiting(self, block: bool) -> bool:
        """Move submitted jobs to `pending` (blocking for the first when `block`); False once close() was called."""
        try:
            job = self.waiting.get() if block else self.waiting.get_nowait()
        except queue.Empty:
            return True
        while True:
            if job is None:
                return False
            self.pending.append(job)
            try:
                job = self.waiting.get_nowait()
            except queue.Empty:
                return True

    def _work_continuous(self) -> None:
        torch.set_flush_denormal(True)  # per thread: denormals make SmolLM2 ~20x slower on CPU
        while self.work_once(block=True):
            pass

    def work_once(self, block: bool = False) -> bool:
        """One round of continuous batching: take new requests, admit them into free rows, feed prompts, run one
        decode step. `block`: wait for a request when there is nothing to do. False once closed and drained."""
        if self._batch is None:
            tok = self.tokenizer
            self._batch = ContinuousBatch(self.model, self.max_batch, tok.eos_ids, tok.pad_id,
                                          kv_dtype=kv_cache_dtype(self.kv_cache, self.model))
        batch, jobs = self._batch, self._jobs
        if not self._open and not jobs:
            return False
        if self._open:
            self._open = self._take_waiting(block=block and not jobs and not self.pending)
        try:
            self._admit(batch, jobs)
            self._continuous_step(batch, jobs)
        except Exception as exc:  # a bug must not kill the worker: fail these requests, keep serving
            for row, job in list(jobs.items()):
                job.emit("error", f"{type(exc).__name__}: {exc}")
                batch.release(row)
            jobs.clear()
            batch.forget()
        self.running = len(jobs)
        self.cache_capacity = batch.cache.capacity * self.max_batch
        self.reused_tokens = batch.reused_tokens
        if not self._open and not jobs:
            for job in self.pending:  # closed with requests still waiting: tell them
                job.emit("error", "the server is shutting down")
            self.pending.clear()
            return False
        return True

    @property
    def cache_tokens(self) -> int:
        """KV cache positions held, counted when /metrics asks (not every step: ~0.15 ms a count)."""
        return self._batch.cache.tokens() if self._batch is not None else 0

    @property
    def idle(self) -> bool:
        """Nothing to do until a request arrives."""
        return not self._jobs and not self.pending and self.waiting.empty()

    def _admit(self, batch: ContinuousBatch, jobs: dict[int, Job]) -> None:
        gone = [job for job in self.pending if job.cancelled.is_set()]  # left while waiting: never take a row
        for job in gone:
            self.pending.remove(job)
            job.emit("end", "cancelled")
        while self.pending and batch.free:
            job = self.pending.popleft()
            request = RowRequest(job.prompt_ids, job.max_new_tokens, job.sampling, job.top_logprobs,
                                 job.prompt_embeds)
            try:
                jobs[batch.admit(request)] = job
            except LigeroError as exc:
                job.emit("error", str(exc))
            except Exception as exc:  # e.g. no memory to grow the cache: this request fails, the others go on
                job.emit("error", f"{type(exc).__name__}: {exc}")

    @torch.inference_mode()
    def _continuous_step(self, batch: ContinuousBatch, jobs: dict[int, Job]) -> None:
        for row, job in jobs.items():
            if job.cancelled.is_set():
                batch.finish(row, "cancelled")
        decoding = any(s is not None and s.ready for s in batch.rows)
        if batch.prefilling:  # rows already decoding get one step per chunk; alone, a prompt goes in whole
            with self.compute_lock:
                batch.prefill(self.prefill_chunk if decoding else None)
        with self.compute_lock:
            produced = batch.step()
        for row, token, logprob in produced:
            jobs[row].post("token", token, logprob, batch.alternatives.get(row))
        if produced:
            self.batches, self.stepped_rows = batch.steps, batch.stepped_rows
        ended = []
        for row, reason in batch.reasons.items():
            if reason is not None:
                job = jobs.pop(row)
                job.post("end", reason)
                ended.append(job)
                batch.release(row)
        hand_over([*jobs.values(), *ended], self.stream_interval_s)

    # --- dynamic batching (packed KV caches) ----------------------------------------------------------------

    def _next_batch(self) -> list[Job] | None:
        first = self.waiting.get()
        if first is None:
            return None
        batch = [first]
        deadline = time.monotonic() + self.batch_wait_s
        while len(batch) < self.max_batch:
            try:
                job = self.waiting.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:  # close(): finish this batch, then stop
                self.waiting.put(None)
                break
            batch.append(job)
        return [j for j in batch if not j.cancelled.is_set()]

    def _work(self) -> None:
        torch.set_flush_denormal(True)  # per thread: denormals make SmolLM2 ~20x slower on CPU
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if not batch:
                continue
            try:
                self._decode(batch)
            except Exception as exc:  # a bug must not kill the worker: fail these requests, keep serving
                for job in batch:
                    job.emit("error", f"{type(exc).__name__}: {exc}")

    @torch.inference_mode()
    def _decode(self, batch: list[Job]) -> None:
        tok = self.tokenizer
        self.running = len(batch)
        try:
            with self.compute_lock:
                gen = BatchGeneration(self.model, [j.prompt_ids for j in batch], [j.max_new_tokens for j in batch],
                                      [j.sampling for j in batch], tok.eos_ids, tok.pad_id,
                                      [j.top_logprobs for j in batch],
                                      prompt_embeds=[j.prompt_embeds for j in batch])
            ended = [False] * len(batch)
            while True:
                for i, job in enumerate(batch):
                    if job.cancelled.is_set():
                        gen.finish(i, "cancelled")
                with self.compute_lock:
                    produced = gen.step()
                self.batches += 1
                self.stepped_rows += len(produced)
                for i, token, logprob in produced:
                    batch[i].post("token", token, logprob, gen.alternatives.get(i))
                for i, reason in enumerate(gen.reasons):
                    if reason is not None and not ended[i]:
                        ended[i] = True
                        batch[i].post("end", reason)
                hand_over(batch, self.stream_interval_s)
                if gen.done:
                    return
        finally:
            self.running = 0


def claim(engines: list[Engine]) -> list[Engine]:
    """Mark the continuous engines as driven by run_engines (before any request can start a thread of their own);
    returns them."""
    mine = [e for e in engines if e.continuous]
    for engine in mine:
        with engine._start_lock:
            if engine._thread is not None and not engine._external:
                raise LigeroError(f"engine {engine.name} already has a worker thread")
            engine._external = True
    return mine


def run_engines(engines: list[Engine], stop: threading.Event) -> None:
    """Drive the continuous engines from the calling thread, round-robin, one work round each, until `stop` is set.

    `ligero serve` calls this from the main thread (the HTTP server runs in another): a process's first thread that
    runs OpenMP regions keeps a team whose workers spin between them, while each further thread that runs the
    kernels adds its own team, and libgomp then throttles every team's spinning (more OpenMP threads than cores),
    so each parallel region waits for a sleeping worker: decode measured about 2.5x slower in a second thread.
    Engines with a packed KV cache keep their own threads."""
    torch.set_flush_denormal(True)
    live = claim(engines)
    while live and not stop.is_set():
        for engine in list(live):
            engine.wake.clear()
            if not engine.work_once(block=False):
                live.remove(engine)
        if all(e.idle for e in live):
            for engine in live:  # any submit sets its engine's event; wait on one, poll the others briefly
                if engine.wake.wait(timeout=0.05 / max(1, len(live))):
                    break
