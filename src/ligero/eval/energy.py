"""Energy of decoding, per 1,000 generated tokens, measured with CodeCarbon.

CodeCarbon reads the CPU's energy counters (RAPL) and NVIDIA GPUs' (NVML) where the machine exposes them; where it
does not (virtual machines, most containers) it estimates CPU power as the process's CPU load times the processor's
rated TDP, and RAM power from a constant per-size model. Which of these produced a figure is recorded beside it, and
anything not read from a counter is labelled an estimate: energy estimated from load x TDP is time spent, re-scaled,
so it ranks variants as decode speed does and says little about absolute joules.
"""

from __future__ import annotations

import logging
import time
from functools import cache

import torch

from ligero.errors import LigeroError
from ligero.eval.speed import _sync

MEASURED_CPU_MODES = ("intel_rapl", "intel_power_gadget", "apple_powermetrics")  # counters, not estimates


@cache
def _tracker():
    """One CodeCarbon tracker per process (creating one probes the hardware), warmed by a first task: its first
    task reports too short a duration."""
    try:
        from codecarbon import OfflineEmissionsTracker
    except ImportError:
        raise LigeroError("codecarbon is missing: pip install codecarbon (make setup does)") from None
    logging.getLogger("codecarbon").setLevel(logging.ERROR)
    tracker = OfflineEmissionsTracker(country_iso_code="USA", log_level="error", output_methods=[],
                                      tracking_mode="process", allow_multiple_runs=True, measure_power_secs=1)
    tracker.start_task("warm-up")
    time.sleep(0.05)
    tracker.stop_task()
    return tracker


def hardware_modes(tracker) -> dict:
    """How CodeCarbon measures each device: CPU mode (e.g. intel_rapl, cpu_load, constant), its model and TDP."""
    out = {}
    for device in getattr(tracker, "_hardware", []):
        kind = type(device).__name__
        if kind == "CPU":
            out["cpu"] = {"mode": getattr(device, "_mode", "unknown"), "model": getattr(device, "_model", ""),
                          "tdp_w": getattr(device, "_tdp", None)}
        elif kind == "GPU":
            out["gpu"] = {"mode": "nvml"}
        elif kind == "RAM":
            out["ram"] = {"mode": "estimate"}
    return out


@torch.inference_mode()
def decode_energy(model, tokens: int, prompt_tokens: int = 16, seed: int = 0) -> dict:
    """Energy CodeCarbon attributes to this process while `model` decodes `tokens` tokens greedily at batch 1
    (after a short random prompt), scaled to 1,000 tokens."""
    if tokens < 1:
        raise LigeroError(f"energy needs at least 1 decoded token, got {tokens}")
    import codecarbon

    tracker = _tracker()
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.cfg.vocab_size, (1, prompt_tokens), generator=g).to(model.device)
    cache_ = model.new_cache(1, prompt_tokens + tokens + 1)
    logits = model(prompt, kv_cache=cache_, last_only=True)  # the prompt is not counted: decode only
    pos = torch.tensor([[prompt_tokens]], device=model.device)
    tracker.start_task("decode")
    for _ in range(tokens):
        logits = model(logits[:, -1].argmax(-1, keepdim=True), pos, kv_cache=cache_)
        pos = pos + 1
    _sync(model.device)
    data = tracker.stop_task()
    modes = hardware_modes(tracker)
    per_1k = 1000.0 / tokens * 1000.0  # kWh -> Wh, per token -> per 1,000 tokens
    cpu_mode = modes.get("cpu", {}).get("mode", "unknown")
    return {"wh_per_1k_tokens": data.energy_consumed * per_1k, "cpu_wh_per_1k_tokens": data.cpu_energy * per_1k,
            "ram_wh_per_1k_tokens": data.ram_energy * per_1k, "gpu_wh_per_1k_tokens": data.gpu_energy * per_1k,
            "tokens": tokens, "seconds": data.duration, "cpu_power_w": data.cpu_power, "ram_power_w": data.ram_power,
            "estimate": cpu_mode not in MEASURED_CPU_MODES, "modes": modes,
            "library": f"codecarbon {codecarbon.__version__}"}


def energy_text(e: dict) -> str:
    """One line: the figure, labelled an estimate unless read from counters, and how it was obtained."""
    cpu = e["modes"].get("cpu", {})
    how = ("CPU from RAPL counters" if not e["estimate"] else
           f"CPU estimated as load x TDP ({cpu.get('model') or 'CPU'}, {cpu.get('tdp_w')} W as {e['library']} "
           "rates it; no energy counters on this machine)")
    return (f"{e['wh_per_1k_tokens']:.3g} Wh per 1,000 decoded tokens{' (estimate)' if e['estimate'] else ''}: "
            f"{how}, RAM from its constant model")
