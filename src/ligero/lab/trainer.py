"""The labs' shared trainer: AdamW with warm-up + cosine or BitNet's two-stage schedule, gradient clipping and
accumulation, an MoE model's auxiliary losses (and its expert load logged at each evaluation), evaluation at
intervals, JSON-lines logs, checkpoints that resume to the same loss curve, and data
parallelism through torch.distributed (gloo on CPU: processes on one machine, or machines launched by torchrun).

Determinism: the batch of step k depends only on (seed, k) (LabData.batch), the model's initial weights only on
the seed, and a checkpoint holds the weights and the optimizer's state; so a run killed and resumed produces the
same losses as one left alone, on the same thread count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ligero.errors import LigeroError
from ligero.eval.speed import ForeignLoad
from ligero.io.checkpoint import available_memory_bytes
from ligero.lab.data import LabData, _mix
from ligero.models.config import ModelConfig
from ligero.models.transformer import MoEMLP, Transformer, moe_aux_loss

SCHEDULES = ("cosine", "two_stage")
CHECKPOINT_FILE, LOG_FILE = "checkpoint.pt", "train.jsonl"


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_rows: int = 32  # sequences per optimizer step, over all processes and micro-batches
    seq_len: int = 128
    accum: int = 1  # micro-batches per step in each process
    lr: float = 3e-3  # peak
    min_lr_ratio: float = 0.1  # the cosine's floor, as a share of the peak
    warmup_steps: int = 0
    schedule: str = "cosine"
    weight_decay: float = 0.1
    stage2_lr_ratio: float = 0.4  # two_stage: the second half starts at this share of the peak ...
    stage2_weight_decay: float = 0.0  # ... with this weight decay (BitNet b1.58: 0.1 then 0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_tokens: int = 16384
    checkpoint_every: int = 50
    seed: int = 0
    version: ClassVar[int] = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))  # JSON gives a list: one form for equality
        if self.steps < 1 or self.batch_rows < 1 or self.seq_len < 2 or self.accum < 1:
            raise LigeroError("steps, batch rows and accumulation must be at least 1 and the sequence length 2")
        if self.schedule not in SCHEDULES:
            raise LigeroError(f"unknown schedule '{self.schedule}'; use one of: {', '.join(SCHEDULES)}")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1 or self.weight_decay < 0 or self.grad_clip <= 0:
            raise LigeroError("the learning rate and gradient clip must be positive, the LR floor a share in "
                              "[0, 1] and the weight decay not negative")
        if not 0 <= self.warmup_steps < self.steps:
            raise LigeroError(f"warm-up of {self.warmup_steps} steps must be shorter than the run ({self.steps})")

    def to_dict(self) -> dict:
        return {"version": self.version, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step `step` (1-based)."""
        if step <= self.warmup_steps:
            return self.lr * step / self.warmup_steps
        if self.schedule == "cosine":
            t = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
            return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))
        # two_stage (BitNet b1.58's training recipe): a high rate decaying over the first half, then a drop to a
        # lower one that decays to the floor, weight decay switched off in the second half.
        half = self.steps // 2
        if step <= half:
            t = (step - self.warmup_steps) / max(1, half - self.warmup_steps)
            return self.lr * (1 - 0.5 * t)
        t = (step - half) / max(1, self.steps - half)
        start, end = self.lr * self.stage2_lr_ratio, self.lr * self.min_lr_ratio
        return start + (end - start) * t

    def weight_decay_at(self, step: int) -> float:
        if self.schedule == "two_stage" and step > self.steps // 2:
            return self.stage2_weight_decay
        return self.weight_decay


# --- processes ---------------------------------------------------------------------------------------------


def world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_environment() -> bool:
    """Join the process group torchrun (or a user) describes in the environment (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT): gloo, CPU. Returns whether there is more than one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    return world()[1] > 1


# --- memory --------------------------------------------------------------------------------------------------


def training_bytes(cfg: ModelConfig, n_params: int, micro_rows: int, seq_len: int) -> int:
    """What training holds, about: weights, gradients and AdamW's two moments (16 bytes per parameter), and one
    micro-batch's saved activations (per token and layer ~14 model-wide and 4 FFN-wide vectors, the attention
    weights, then the logits and their gradient)."""
    tokens = micro_rows * seq_len
    per_layer = tokens * (14 * cfg.dim + 4 * cfg.ffn_dim) + micro_rows * cfg.n_heads * seq_len * seq_len * 2
    return 16 * n_params + 4 * (cfg.n_layers * per_layer + 3 * tokens * cfg.vocab_size)


def check_memory(model: Transformer, tc: TrainConfig, processes: int) -> None:
    micro_rows = tc.batch_rows // (processes * tc.accum)
    need = processes * training_bytes(model.cfg, sum(p.numel() for p in model.parameters()), micro_rows,
                                      tc.seq_len)
    have = available_memory_bytes()
    if have is not None and need > 0.9 * have:
        raise LigeroError(f"training needs about {need / 1e9:.1f} GB but {have / 1e9:.1f} GB is available; use a "
                          "smaller size, fewer rows per micro-batch (--accum), a shorter --seq-len or fewer processes")


# --- the loop -------------------------------------------------------------------------------------------------


def eval_loss(model: Transformer, windows: torch.Tensor, rows: int = 8) -> float:
    """Mean next-token cross-entropy (nats) over evaluation windows [N, T + 1]."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, windows.shape[0], rows):
            w = windows[i:i + rows]
            logits = model(w[:, :-1])
            total += F.cross_entropy(logits.flatten(0, 1).float(), w[:, 1:].flatten(), reduction="sum").item()
            count += w[:, 1:].numel()
    model.train(was_training)
    return total / count


def _save(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: a kill while saving leaves the previous checkpoint whole


def load_checkpoint(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise LigeroError(f"checkpoint {path} is unreadable ({str(exc).splitlines()[0][:80]}); it was not written by "
                          "a finished save: restore it, or move it away to train from the start") from None
    if not isinstance(state, dict) or not {"step", "model", "optimizer", "train_config"} <= state.keys():
        raise LigeroError(f"checkpoint {path} is not a Ligero lab checkpoint; move it away to train from the start")
    return state


def _resume(ckpt_path: Path, model: Transformer, opt, tc: TrainConfig,
            trainable: dict[str, torch.nn.Parameter] | None) -> tuple[int, list[dict]]:
    """Restore a checkpoint's weights (only the `trainable` tensors, when given) and optimizer; (step, records)."""
    state = load_checkpoint(ckpt_path)
    if state["train_config"] != tc.to_dict() or state.get("model_config") != model.cfg.to_dict():
        raise LigeroError(f"{ckpt_path} belongs to a run with other settings; use another output folder, or "
                          "move the checkpoint away to start over")
    if trainable is not None:
        if set(state["model"]) != set(trainable):
            raise LigeroError(f"{ckpt_path} holds other trainable tensors than this model's; use another output "
                              "folder, or move the checkpoint away to start over")
        with torch.no_grad():
            for name, value in state["model"].items():
                trainable[name].copy_(value)
    else:
        model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    return state["step"], list(state["records"])


def train(model: Transformer, data: LabData, tc: TrainConfig, folder: str | Path, log: Callable[[str], None] = print,
          log_every: int = 10, after_step: Callable[[], None] = lambda: None) -> list[dict]:
    """Train `model` in place for tc.steps optimizer steps (resuming from folder/checkpoint.pt when there is one)
    and return the log records (one per step; 'eval_loss' on evaluation steps). Under torch.distributed each
    process takes its share of every batch; rank 0 writes the log and the checkpoints."""
    rank, size = world()
    if tc.batch_rows % (size * tc.accum):
        raise LigeroError(f"{tc.batch_rows} rows per step do not split into {size} processes x {tc.accum} "
                          "micro-batches; choose a multiple")
    (folder := Path(folder)).mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path = folder / CHECKPOINT_FILE, folder / LOG_FILE
    # Only what trains is optimized and checkpointed: a model with frozen parts (LoRA on a frozen base) saves its
    # adapters, not a copy of the base.
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    partial = len(trainable) < sum(1 for _ in model.parameters())
    params = list(trainable.values())
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr, betas=tc.betas)
    records: list[dict] = []
    start = 0
    if ckpt_path.exists():
        start, records = _resume(ckpt_path, model, opt, tc, trainable if partial else None)
        log(f"resuming at step {start} of {tc.steps} from {ckpt_path}")
    net = torch.nn.parallel.DistributedDataParallel(model) if size > 1 else model
    windows = data.eval_windows(tc.seq_len, tc.eval_tokens) if rank == 0 else None
    rows, micro = tc.batch_rows // size, tc.batch_rows // (size * tc.accum)
    if rank == 0:  # the log holds what the checkpoint holds: steps after it are redone
        log_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    model.train()
    t0, tokens_done = time.perf_counter(), 0
    elapsed_before = records[-1]["seconds"] if records else 0.0  # training time before a resume
    # How much of the machine other processes took while this ran: wall-clock times mean little when it is large.
    foreign_before = records[-1].get("foreign_cpu_share", 0.0) if records else 0.0
    load = ForeignLoad().start()
    moes = [m for m in model.modules() if isinstance(m, MoEMLP)]
    for step in range(start + 1, tc.steps + 1):
        lr, wd = tc.lr_at(step), tc.weight_decay_at(step)
        opt.param_groups[0].update(lr=lr, weight_decay=wd)
        opt.param_groups[1].update(lr=lr)
        x, y = data.batch(tc.seed, step, tc.batch_rows, tc.seq_len)
        # Random ops of the step (a LoRA adapter's dropout) draw from (seed, step) alone, as the batch does: a resumed
        # run makes the same draws as one left alone.
        torch.manual_seed(_mix(tc.seed + 7919, step))
        x, y = x[rank * rows:(rank + 1) * rows], y[rank * rows:(rank + 1) * rows]
        loss_sum, aux_sum = torch.zeros(()), torch.zeros(())
        for m in range(tc.accum):
            xs, ys = x[m * micro:(m + 1) * micro], y[m * micro:(m + 1) * micro]
            sync = m == tc.accum - 1 or size == 1
            ctx = net.no_sync() if not sync else contextlib.nullcontext()
            with ctx:
                logits = net(xs)
                loss = F.cross_entropy(logits.flatten(0, 1), ys.flatten()) / tc.accum
                aux = moe_aux_loss(model) / tc.accum  # MoE: load balancing and router z-loss (0 when dense)
                (loss + aux).backward()
            loss_sum += loss.detach()
            aux_sum += float(aux.detach()) if isinstance(aux, torch.Tensor) else aux
        grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        after_step()  # e.g. return the heap's free pages (finetune)
        if size > 1:
            dist.all_reduce(loss_sum)
            loss_sum /= size
        tokens_done += tc.batch_rows * tc.seq_len
        seconds = time.perf_counter() - t0
        record = {"step": step, "loss": float(loss_sum), "lr": lr, "weight_decay": wd,
                  "grad_norm": float(grad_norm), "tokens": step * tc.batch_rows * tc.seq_len,
                  "seconds": elapsed_before + seconds,  # time-weighted over the segments of a resumed run:
                  "foreign_cpu_share": (foreign_before * elapsed_before + load.share() * seconds)
                  / (elapsed_before + seconds)}
        if moes:
            record["aux_loss"] = float(aux_sum)
        if rank == 0 and (step % tc.eval_every == 0 or step == tc.steps):
            record["eval_loss"] = eval_loss(model, windows)
            if moes:  # expert load since the last evaluation (this process's share of the batches)
                stats = [m.take_stats() for m in moes]
                record["expert_load"] = [load for load, _ in stats]
                record["dropped_assignments"] = sum(dropped for _, dropped in stats)
        records.append(record)
        if rank == 0:
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if step % log_every == 0 or step == tc.steps or "eval_loss" in record:
                elapsed = time.perf_counter() - t0
                speed = tokens_done / elapsed
                eta = (tc.steps - step) * tc.batch_rows * tc.seq_len / speed
                extra = f", eval {record['eval_loss']:.4f}" if "eval_loss" in record else ""
                log(f"step {step}/{tc.steps}: loss {record['loss']:.4f}{extra}, lr {lr:.2e}, "
                    f"{speed:,.0f} tok/s, ETA {eta:.0f} s")
        if step % tc.checkpoint_every == 0 or step == tc.steps:
            if rank == 0:
                weights = {n: p.detach() for n, p in trainable.items()} if partial else model.state_dict()
                _save(ckpt_path, {"step": step, "model": weights, "optimizer": opt.state_dict(),
                                  "train_config": tc.to_dict(), "model_config": model.cfg.to_dict(),
                                  "records": records})
            if size > 1:
                dist.barrier()
    return records

