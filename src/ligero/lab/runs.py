"""One training run of a lab, end to end: data, a tiny model, the trainer (in one process or several), and the
trained model saved as a Ligero folder (packed b158 when ternary) that `ligero eval ppl --model` and
`ligero generate` read like any other. The `ligero lab train` command is this function."""

from __future__ import annotations

import json
import math
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from ligero.errors import LigeroError
from ligero.io.checkpoint import save_checkpoint
from ligero.lab.data import LabData
from ligero.lab.models import build_model, size_named, tiny_config
from ligero.lab.trainer import TrainConfig, check_memory, eval_loss, init_from_environment, train, world
from ligero.models.transformer import MoEMLP
from ligero.quant.ternary import WEIGHT_SCALES, pack_ternary

RUN_FILE, MODEL_FOLDER = "run.json", "model"


@dataclass(frozen=True)
class RunSpec:
    size: str
    ternary: bool = False
    weight_scale: str = "absmean"
    width_factor: int = 1  # Reloaded's doubled ternary models: 2
    vocab_size: int = 4096
    ffn_factor: int = 1  # the FFN alone this many times wider (a dense model with an MoE's total parameters)
    experts: int = 0  # > 0: every FFN a mixture of experts (lab/models.tiny_config)
    top_k: int = 2
    balance: float = 0.01  # load-balancing loss coefficient (Switch Transformer)
    z_loss: float = 0.001  # router z-loss coefficient (ST-MoE, OLMoE)
    capacity: float | None = None  # capacity factor (None: dropless)

    def __post_init__(self) -> None:
        size_named(self.size)
        if self.weight_scale not in WEIGHT_SCALES:
            raise LigeroError(f"unknown weight scale '{self.weight_scale}'; use one of: {', '.join(WEIGHT_SCALES)}")
        if self.width_factor < 1 or self.ffn_factor < 1:
            raise LigeroError(f"width factors must be at least 1, got {self.width_factor} and {self.ffn_factor}")
        if self.experts and (self.ternary or self.balance < 0 or self.z_loss < 0
                             or (self.capacity is not None and self.capacity <= 0)):
            raise LigeroError("an MoE run is full precision, with non-negative loss coefficients and a positive "
                              "capacity factor")

    @property
    def label(self) -> str:
        width = f"{'x' + str(self.width_factor) if self.width_factor > 1 else ''}"
        if self.experts:
            label = f"{self.size}{width}-moe{self.experts}k{self.top_k}"
            label += ("-nobal" if not self.balance else "") + ("-noz" if not self.z_loss else "")
            return label + (f"-cap{self.capacity:g}" if self.capacity is not None else "")
        kind = "b158" if self.ternary else "fp"
        return f"{self.size}{width}{'-ffnx' + str(self.ffn_factor) if self.ffn_factor > 1 else ''}-{kind}"


def _model(spec: RunSpec, data: LabData, tc: TrainConfig):
    size = size_named(spec.size).widened(spec.width_factor).wider_ffn(spec.ffn_factor)
    cfg = tiny_config(size, data.tokenizer.vocab_size, tc.seq_len, spec.experts, spec.top_k if spec.experts else 0)
    model = build_model(cfg, tc.seed, ternary=spec.ternary, weight_scale=spec.weight_scale)
    for m in model.modules():
        if isinstance(m, MoEMLP):  # training settings of the routers (the saved model routes dropless)
            m.balance_coef, m.z_coef, m.capacity_factor = spec.balance, spec.z_loss, spec.capacity
    return model


def train_run(spec: RunSpec, tc: TrainConfig, out: str | Path, processes: int = 1, log=print) -> dict:
    """Train (or resume) one run into folder `out`; returns its summary (also written to out/run.json)."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LigeroError(f"cannot write to output folder {out} ({exc.strerror}); choose another --out") from None
    finished = _finished(out, spec, tc)
    if finished is not None:
        log(f"{spec.label}: finished earlier, reusing {out}")
        return finished
    t_run = time.perf_counter()
    data = LabData.load(spec.vocab_size)
    model = _model(spec, data, tc)
    check_memory(model, tc, processes)
    if processes > 1:
        _spawn(spec, tc, out, processes)
        _, model_state = _final_model(out)
        model.load_state_dict(model_state)
    else:
        t0 = time.perf_counter()
        train(model, data, tc, out, log=log)
        log(f"{spec.label}: trained in {time.perf_counter() - t0:.0f} s")
    records = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines() if line]
    cfg = model.cfg
    embedding = cfg.vocab_size * cfg.dim
    summary = {"spec": asdict(spec), "label": spec.label, "train_config": tc.to_dict(), "processes": processes,
               "non_embedding_params": cfg.n_params() - embedding,
               "active_non_embedding_params": cfg.n_active_params() - embedding,
               "params": sum(p.numel() for p in model.parameters()), "data": data.provenance,
               "final_loss": records[-1]["loss"], "final_eval_loss": records[-1].get("eval_loss"),
               "tokens": records[-1]["tokens"], "train_seconds": records[-1]["seconds"],
               "foreign_cpu_share": records[-1].get("foreign_cpu_share"),
               "curve": [{k: r[k] for k in ("step", "tokens", "loss", "eval_loss", "aux_loss", "expert_load",
                                            "dropped_assignments") if k in r} for r in records]}
    if spec.ternary:
        trained = summary["final_eval_loss"]
        pack_ternary(model)  # the runtime's b158 layers, the same ternary values
        windows = data.eval_windows(tc.seq_len, tc.eval_tokens)
        summary["packed_eval_loss"] = eval_loss(model, windows)
        summary["zero_weight_share"] = _zero_share(model)
        log(f"{spec.label}: packed into b158 layers, eval loss {summary['packed_eval_loss']:.4f} "
            f"(training-time model {trained:.4f})")
    save_checkpoint(model, data.tokenizer, out / MODEL_FOLDER,
                    source={"lab": "train", "run": spec.label, "train_config": tc.to_dict(), "data": data.provenance})
    summary["run_seconds"] = time.perf_counter() - t_run  # this call: data, training (or its rest), packing, saving
    (out / RUN_FILE).write_text(json.dumps(summary, indent=1))
    return summary


def best_rate(results: dict[float, float | None], label: str) -> float:
    """The learning rate of the lowest finite evaluation loss in a sweep."""
    finite = {lr: loss for lr, loss in results.items() if loss is not None and math.isfinite(loss)}
    if not finite:
        raise LigeroError(f"every learning rate of the sweep diverged for {label}; lower the grid")
    return min(finite, key=finite.get)


def sweep_rates(grid, loss_at: Callable[[float], float | None], max_extensions: int,
                label: str) -> dict[float, float | None]:
    """Evaluation loss per learning rate of `grid`, each from loss_at(lr). A best rate at the edge of the grid does
    not bracket the optimum: the grid grows by its own ratio on that side (at most `max_extensions` times) until
    the best lies inside."""
    grid = sorted(grid)
    results = {lr: loss_at(lr) for lr in grid}
    for _ in range(max_extensions):
        best = best_rate(results, label)
        if len(grid) < 2 or best not in (grid[0], grid[-1]):
            break
        ratio = grid[1] / grid[0]
        lr = grid[0] / ratio if best == grid[0] else grid[-1] * ratio
        results[lr] = loss_at(lr)
        grid = sorted(results)
    return dict(sorted(results.items()))


def _finished(out: Path, spec: RunSpec, tc: TrainConfig) -> dict | None:
    """The summary of this very run when it finished earlier in `out` (its model saved), else None."""
    try:
        summary = json.loads((out / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    as_json = lambda d: json.loads(json.dumps(d))  # noqa: E731 (run.json holds lists where the configs hold tuples)
    try:  # a run.json written before RunSpec had its newer fields holds their defaults
        stored = as_json(asdict(RunSpec(**summary["spec"])))
    except (KeyError, TypeError, LigeroError):
        return None
    same = stored == as_json(asdict(spec)) and summary.get("train_config") == as_json(tc.to_dict())
    return summary if same and (out / MODEL_FOLDER / "ligero.json").is_file() else None


def _zero_share(model) -> float:
    from ligero.quant.modules import TernaryLinear

    zeros = total = 0
    for m in model.modules():
        if isinstance(m, TernaryLinear):
            t = m.trits()
            zeros, total = zeros + int((t == 0).sum()), total + t.numel()
    return zeros / max(1, total)


def _final_model(out: Path) -> tuple[int, dict]:
    from ligero.lab.trainer import CHECKPOINT_FILE, load_checkpoint

    state = load_checkpoint(out / CHECKPOINT_FILE)
    return state["step"], state["model"]


# --- several processes ------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(spec: RunSpec, tc: TrainConfig, out: Path, processes: int) -> None:
    """Train with `processes` processes on this machine (gloo over loopback), each on its share of the cores."""
    import torch.multiprocessing as mp

    port = _free_port()
    threads = max(1, torch.get_num_threads() // processes)
    mp.spawn(_worker, args=(processes, port, threads, spec, tc, str(out)), nprocs=processes, join=True)


def _worker(rank: int, processes: int, port: int, threads: int, spec: RunSpec, tc: TrainConfig, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(processes))
    torch.set_num_threads(threads)
    init_from_environment()
    try:
        data = LabData.load(spec.vocab_size)
        model = _model(spec, data, tc)
        quiet = (lambda message: None) if world()[0] else print  # noqa: E731
        train(model, data, tc, out, log=quiet)
    finally:
        torch.distributed.destroy_process_group()
