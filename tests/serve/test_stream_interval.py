"""The stream interval: how often a row's held tokens go to its client, growing with the rows decoding."""

from __future__ import annotations

import time

import pytest

from ligero.models.generate import SamplingConfig
from ligero.serve.engine import ROWS_PER_INTERVAL, Job, hand_over, stream_interval


class _RecordingLoop:
    """A loop that records what the worker hands over (no asyncio needed: the test reads `handed`)."""

    def __init__(self):
        self.handed = []

    def call_soon_threadsafe(self, fn, batches):
        self.handed += [job for job, _ in batches]


def test_the_stream_interval_grows_with_the_rows_beyond_four():
    assert ROWS_PER_INTERVAL == 4
    assert stream_interval(0.016, 1) == stream_interval(0.016, 4) == 0.016
    assert stream_interval(0.016, 8) == pytest.approx(0.032)
    assert stream_interval(0.016, 16) == pytest.approx(0.064)
    assert stream_interval(0.0, 16) == 0.0  # 0: every token, whatever the rows

    def due_after(rows: int, waited_s: float) -> int:
        loop = _RecordingLoop()
        jobs = [Job([1], 4, SamplingConfig(), loop) for _ in range(rows)]
        for job in jobs:  # each handed its first token `waited_s` ago, one more token held since
            job.handed = time.perf_counter() - waited_s
            job.outbox.append(("token", 7, -0.1, None))
        hand_over(jobs, 0.016)
        return len(loop.handed)

    assert due_after(4, 0.020) == 4  # 20 ms > 16 ms: due
    assert due_after(8, 0.020) == 0  # 8 rows: 32 ms, not yet
    assert due_after(8, 0.040) == 8
    assert due_after(16, 0.040) == 0  # 16 rows: 64 ms
    assert due_after(16, 0.070) == 16


def test_an_end_is_handed_over_at_once_however_many_rows():
    loop = _RecordingLoop()
    jobs = [Job([1], 4, SamplingConfig(), loop) for _ in range(16)]
    for job in jobs:
        job.handed = time.perf_counter()
        job.outbox.append(("token", 7, -0.1, None))
    jobs[3].post("end", "length")
    hand_over(jobs, 0.016)
    assert loop.handed == [jobs[3]]
