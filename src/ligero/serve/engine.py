"""One served variant: a model, its tokenizer and a worker thread that batches concurrent requests.

Dynamic batching: the worker takes the first waiting request, waits up to `batch_wait_s` for more (at most
`max_batch`), and decodes them together with `BatchGeneration` (one forward pass per step for the whole batch, each
row with its own sampling settings, random stream and token budget). A row leaves the batch as soon as it finishes
(EOS, budget, a stop string, a guardrail, a client that went away); requests that arrive meanwhile wait for the next
batch. On a CPU, decoding 8 rows costs about 2.6x one row (SmolLM2), so throughput grows with concurrency.

Requests talk to the worker through `Job`: the worker pushes ("token", id, logprob, alternatives) and ("end", reason)
events into the job's asyncio queue (thread-safe via the event loop; alternatives are the job's `top_logprobs` most
likely tokens as [(id, logprob)], or None when it asked for none), and reads `job.cancelled`, which the request handler
sets to stop its row (a stop string, a blocked output or a disconnect).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from ligero.errors import LigeroError
from ligero.models.generate import BatchGeneration, SamplingConfig


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

    def emit(self, *event) -> None:
        """Called from the worker thread: hand an event to the request's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed (server shutting down): nobody is listening
            pass


class Engine:
    """The worker of one variant. `submit` is thread-safe; `stats` feeds /metrics."""

    def __init__(self, name: str, model, tokenizer, max_batch: int = 8, batch_wait_s: float = 0.005,
                 compute_lock: threading.Lock | None = None):
        if max_batch < 1:
            raise LigeroError(f"--max-batch must be >= 1, got {max_batch}")
        self.name, self.model, self.tokenizer = name, model, tokenizer
        self.max_batch, self.batch_wait_s = max_batch, batch_wait_s
        self.waiting: queue.Queue[Job | None] = queue.Queue()
        self.batches = 0  # batches run so far
        self.running = 0  # rows in the batch being decoded now
        # Engines of one server share the CPU: each forward step holds this lock, so variants take turns step by
        # step instead of oversubscribing the cores.
        self.compute_lock = compute_lock or threading.Lock()
        self._thread = threading.Thread(target=self._work, name=f"ligero-engine-{name}", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        self.waiting.put(job)

    def close(self) -> None:
        self.waiting.put(None)
        self._thread.join(timeout=30)

    @property
    def queue_depth(self) -> int:
        return self.waiting.qsize()

    # --- worker thread ------------------------------------------------------------------------------------------

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
        self.batches += 1
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
                for i, token, logprob in produced:
                    batch[i].emit("token", token, logprob, gen.alternatives.get(i))
                for i, reason in enumerate(gen.reasons):
                    if reason is not None and not ended[i]:
                        ended[i] = True
                        batch[i].emit("end", reason)
                if gen.done:
                    return
        finally:
            self.running = 0
