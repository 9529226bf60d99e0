"""Speed and memory: prefill and batch-1 decode throughput (median over repeats, after warm-up).

Prefill: one forward over `prefill_tokens` tokens into an empty cache (logits for the last position only,
as generation does). Decode: after a short prompt, `decode_tokens` single-token greedy steps with the cache.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ligero.models.transformer import Transformer, stored_bytes


@dataclass
class SpeedResult:
    prefill_tokens: int
    decode_tokens: int
    prefill_tok_s: float
    decode_tok_s: float
    prefill_runs_s: list[float] = field(default_factory=list)
    decode_runs_s: list[float] = field(default_factory=list)
    weight_bytes: int = 0
    kv_cache_bytes: int = 0
    peak_rss_mb: float = 0.0
    threads: int = 0
    device: str = "cpu"

    def summary(self) -> dict:
        return asdict(self)


def _status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status ("VmRSS", "VmHWM") in MB (10^6 bytes, as every byte count Ligero
    reports; the kernel counts KiB), or None where it is not readable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """The process's peak resident memory (MB) since it started, or since the last reset_peak_rss()."""
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6  # KiB


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat ((0, 0) where it is not readable)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def own_cpu_jiffies() -> int:
    """CPU time of this process and of the children it has waited for (a benchmark's own measurement children)."""
    t = os.times()
    return int((t.user + t.system + t.children_user + t.children_system) * os.sysconf("SC_CLK_TCK"))


class ForeignLoad:
    """Share of the machine's CPU time used by other processes between start() and share(): timings taken while
    it is large are slowed by them. (Sibling processes, such as the other ranks of a data-parallel run, count
    as other processes.)"""

    def start(self) -> "ForeignLoad":
        self.busy, self.total = cpu_jiffies()
        self.own = own_cpu_jiffies()
        return self

    def share(self) -> float:
        busy, total = cpu_jiffies()
        foreign = (busy - self.busy) - (own_cpu_jiffies() - self.own)
        return max(0, foreign) / max(1, total - self.total)


def current_rss_mb() -> float:
    """The process's resident memory now (MB; 0 where /proc is not readable)."""
    return _status_mb("VmRSS") or 0.0


def reset_peak_rss() -> bool:
    """Start the peak over from the current resident memory (Linux >= 4.0: /proc/self/clear_refs), so the peak
    of one model measured after another is its own; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def time_prefill(model: Transformer, tokens: torch.Tensor) -> float:
    device = tokens.device
    cache = model.new_cache(1, tokens.shape[1] + 1)
    _sync(device)
    t0 = time.perf_counter()
    model(tokens, kv_cache=cache, last_only=True)
    _sync(device)
    return time.perf_counter() - t0


@torch.inference_mode()
def time_decode(model: Transformer, prompt: torch.Tensor, steps: int) -> float:
    device = prompt.device
    cache = model.new_cache(1, prompt.shape[1] + steps + 1)
    logits = model(prompt, kv_cache=cache, last_only=True)
    pos = torch.tensor([[prompt.shape[1]]], device=device)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        logits = model(nxt, pos, kv_cache=cache)
        pos = pos + 1
    _sync(device)
    return time.perf_counter() - t0


def speed_runs(repeats: int, warmup: int = 1) -> int:
    """How many timed calls measure_speed makes (its progress total)."""
    return 2 * (warmup + repeats)


def measure_speed(model: Transformer, prefill_tokens: int = 512, decode_tokens: int = 128, repeats: int = 5,
                  warmup: int = 1, seed: int = 0, progress=None) -> SpeedResult:
    """`progress()` is called after each prefill and decode run, warm-up included (speed_runs in all)."""
    device = model.device
    g = torch.Generator().manual_seed(seed)
    n = min(prefill_tokens, model.cfg.max_seq_len - 1)
    tokens = torch.randint(0, model.cfg.vocab_size, (1, n), generator=g).to(device)
    prompt = tokens[:, :16]
    advance = progress or (lambda: None)

    def timed(run, *args) -> float:
        seconds = run(model, *args)
        advance()
        return seconds

    for _ in range(warmup):
        timed(time_prefill, tokens)
        timed(time_decode, prompt, min(decode_tokens, 16))
    prefill = [timed(time_prefill, tokens) for _ in range(repeats)]
    decode = [timed(time_decode, prompt, decode_tokens) for _ in range(repeats)]
    cache = model.new_cache(1, n + decode_tokens)
    return SpeedResult(
        prefill_tokens=n,
        decode_tokens=decode_tokens,
        prefill_tok_s=n / statistics.median(prefill),
        decode_tok_s=decode_tokens / statistics.median(decode),
        prefill_runs_s=[round(x, 4) for x in prefill],
        decode_runs_s=[round(x, 4) for x in decode],
        weight_bytes=stored_bytes(model),
        kv_cache_bytes=cache.nbytes(),
        peak_rss_mb=peak_rss_mb(),
        threads=torch.get_num_threads(),
        device=str(device),
    )


@torch.inference_mode()
def token_latencies_ms(model: Transformer, steps: int, prompt_tokens: int = 16, seed: int = 0) -> dict:
    """Per-token decode latency (batch 1, after a short prompt): p50 / p95 / mean over `steps` steps, in ms."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.cfg.vocab_size, (1, prompt_tokens), generator=g).to(model.device)
    cache = model.new_cache(1, prompt_tokens + steps + 1)
    logits = model(prompt, kv_cache=cache, last_only=True)
    pos = torch.tensor([[prompt_tokens]], device=model.device)
    times = []
    for _ in range(steps):
        _sync(model.device)
        t0 = time.perf_counter()
        logits = model(logits[:, -1].argmax(-1, keepdim=True), pos, kv_cache=cache)
        _sync(model.device)
        times.append(1000 * (time.perf_counter() - t0))
        pos = pos + 1
    ordered = sorted(times)
    pick = lambda q: ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]  # noqa: E731
    return {"p50": pick(0.5), "p95": pick(0.95), "mean": sum(times) / len(times), "steps": steps}


@torch.inference_mode()
def kv_cache_mb(model: Transformer, context: int = 1024, seed: int = 0) -> float:
    """MB the model's KV cache holds after `context` tokens and one decode step (which packs finished groups of a
    quantized cache)."""
    context = min(context, model.cfg.max_seq_len - 1)
    cache = model.new_cache(1, context + 1)
    x = torch.randint(0, model.cfg.vocab_size, (1, context + 1), generator=torch.Generator().manual_seed(seed))
    x = x.to(model.device)
    model(x[:, :context], kv_cache=cache, last_only=True)
    model(x[:, context:], torch.tensor([[context]], device=model.device), kv_cache=cache)
    return cache.nbytes() / 1e6


# --- how busy the machine was while we timed ---------------------------------------------------------------


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) CPU time of the whole machine since boot from /proc/stat, or None where it is not readable."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


class MachineLoad:
    """While the block runs: the share of the machine's CPU time that *other* processes used (the machine's busy
    time minus this process's own CPU time, over wall time x cores). The load average cannot say this: the timed
    process itself keeps it at its thread count."""

    def __enter__(self) -> MachineLoad:
        self._start = (_cpu_jiffies(), time.process_time())
        self.other = None
        return self

    def __exit__(self, *exc) -> None:
        (j0, own0), j1 = self._start, _cpu_jiffies()
        if j0 is None or j1 is None:
            return
        hz = os.sysconf("SC_CLK_TCK")
        total = (j1[1] - j0[1]) / hz  # CPU-seconds available on all cores
        busy = (j1[0] - j0[0]) / hz
        own = time.process_time() - own0
        if total > 0:
            self.other = round(min(1.0, max(0.0, (busy - own) / total)), 3)


def cpu_flags() -> list[str]:
    """The SIMD features the kernels' speed depends on (from /proc/cpuinfo), e.g. ['avx2', 'avx512f', 'avx512_vnni']."""
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "f16c", "neon", "asimd")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                have = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in have]
    except OSError:
        pass
    return []
