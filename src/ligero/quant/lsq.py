"""LSQ (Esser et al., 2020): learn the quantizer's step size by gradient descent, with the weights.

Symmetric: v_q = round(clamp(v / s, -Q_N, Q_P)) * s with a straight-through round; the step's gradient is
scaled by 1 / sqrt(N * Q_P) (N = weights per step); s starts at 2 * mean|v| / sqrt(Q_P) (the paper's init).
With a learned offset (LSQ+, Bhalgat et al., 2020; the default): v_q = round(clamp((v - b) / s, 0, 2^bits - 1))
* s + b, initialised at round-to-nearest's asymmetric min/max grid, so training starts where RTN ends.
Training is a short distillation from the full-precision model (KL of next-token distributions) on the
calibration split. The trained layer is stored as an IntGroupLinear (scale and minimum per group).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ligero.models.transformer import Linear, Transformer
from ligero.progress import progress_bar
from ligero.quant import formats
from ligero.quant.config import LSQConfig
from ligero.quant.modules import IntGroupLinear


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Forward: x; backward: gradient multiplied by `scale`."""
    return (x - x * scale).detach() + x * scale


class LSQLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, cfg: LSQConfig, segments=None):
        super().__init__()
        self.cfg, self.segments = cfg, segments
        self.q_n, self.q_p = 1 << (cfg.bits - 1), (1 << (cfg.bits - 1)) - 1
        out, n = weight.shape
        self.weight = nn.Parameter(weight.detach().float().clone())
        if cfg.learn_offset:  # LSQ+: start from round-to-nearest's grid (the codes are recomputed each step)
            _, scale, minimum = formats.quantize_int_groups(weight, cfg.bits, cfg.group_size)
            init, offset = scale.float().clamp(min=1e-5), minimum.float()
        else:
            n_groups = -(-n // cfg.group_size)
            pad = n_groups * cfg.group_size - n
            w = F.pad(weight.abs().float(), (0, pad)).view(out, n_groups, cfg.group_size)
            counts = torch.full((n_groups,), float(cfg.group_size))
            counts[-1] = cfg.group_size - pad
            init, offset = (2 * (w.sum(-1) / counts) / math.sqrt(self.q_p)).clamp(min=1e-8), None
        # Trained in units of the initial step (step = init * exp(log_step), offset = offset0 + init * delta):
        # Adam moves a parameter by about lr per update whatever its scale, and steps range over decades
        # between layers, so a shared lr on raw steps is too large for some layers (diverges) and too small
        # for others.
        self.register_buffer("step_init", init)
        self.log_step = nn.Parameter(torch.zeros_like(init))
        self.register_buffer("offset_init", offset)
        self.offset_delta = nn.Parameter(torch.zeros_like(init)) if offset is not None else None

    @property
    def step(self) -> torch.Tensor:
        return self.step_init * torch.exp(self.log_step)

    @property
    def offset(self) -> torch.Tensor | None:
        return None if self.offset_delta is None else self.offset_init + self.step_init * self.offset_delta

    @property
    def levels(self) -> int:
        return (1 << self.cfg.bits) - 1

    def _expand(self, p: torch.Tensor) -> torch.Tensor:
        g = 1.0 / math.sqrt(self.cfg.group_size * (self.levels if self.offset_delta is not None else self.q_p))
        p16 = p + (p.half().float() - p).detach()  # train against the fp16 values that will be stored
        return formats.expand_groups(grad_scale(p16, g), self.cfg.group_size, self.weight.shape[1])

    def quantized_weight(self) -> torch.Tensor:
        s = self._expand(self.step.clamp(min=1e-5))  # fp16 storage cannot hold a smaller step
        offset = self.offset
        if offset is not None:
            b = self._expand(offset)
            return round_ste(((self.weight - b) / s).clamp(0, self.levels)) * s + b
        return round_ste((self.weight / s).clamp(-self.q_n, self.q_p)) * s

    def forward(self, x):
        if self.cfg.act_int8:
            x = x + (formats.fake_quantize_int8_tokens(x) - x).detach()  # straight-through
        return F.linear(x, self.quantized_weight())

    @torch.no_grad()
    def to_inference(self) -> IntGroupLinear:
        layer = IntGroupLinear(self.weight.shape[1], self.weight.shape[0], self.cfg, self.segments)
        step16 = self.step.detach().clamp(min=1e-5).half()
        s = formats.expand_groups(step16.float(), self.cfg.group_size, self.weight.shape[1])
        if self.offset_delta is not None:
            offset16 = self.offset.detach().half()
            b = formats.expand_groups(offset16.float(), self.cfg.group_size, self.weight.shape[1])
            q = torch.round(((self.weight - b) / s).clamp(0, self.levels))
        else:
            offset16 = (-self.q_n * step16.float()).half()
            q = torch.round((self.weight / s).clamp(-self.q_n, self.q_p)) + self.q_n
        layer.set_codes(q.to(torch.uint8))
        layer.scale, layer.minimum = step16, offset16
        return layer


def lsq_model(model: Transformer, cfg: LSQConfig, calibration: list[list[int]], layer_filter=None) -> list[float]:
    """Quantize every block linear with LSQ (in place); returns the distillation loss per step."""
    teacher = copy.deepcopy(model).eval()
    names = [n for n, m in model.named_modules() if isinstance(m, Linear) and n.startswith("layers.")
             and not n.endswith(".mlp.router")  # an MoE router stays in full precision (Recipe.config_for)
             and (layer_filter is None or layer_filter(n, m))]
    for name in names:
        lin = model.get_submodule(name)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LSQLinear(lin.weight, cfg, getattr(lin, "segments", None)))
    params_w = [m.weight for m in model.modules() if isinstance(m, LSQLinear)]
    params_s = [p for m in model.modules() if isinstance(m, LSQLinear) for p in (m.log_step, m.offset_delta)
                if p is not None]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params_w + params_s:
        p.requires_grad_(True)
    opt = torch.optim.Adam([{"params": params_s, "lr": cfg.lr_step}, {"params": params_w, "lr": cfg.lr_weight}])
    g = torch.Generator().manual_seed(cfg.seed)
    losses = []
    model.train()
    with progress_bar("LSQ distillation steps", total=cfg.steps) as advance:
        for _ in range(cfg.steps):
            window = calibration[int(torch.randint(0, len(calibration), (1,), generator=g))]
            x = torch.tensor([window], device=model.device)
            with torch.no_grad():
                target = F.log_softmax(teacher(x).float(), -1)
            with torch.enable_grad():
                logp = F.log_softmax(model(x).float(), -1)
                loss = F.kl_div(logp, target, log_target=True, reduction="batchmean") / x.shape[1]
                opt.zero_grad()
                loss.backward()
                opt.step()
            losses.append(loss.item())
            advance()
    model.eval()
    with torch.no_grad():
        for name in names:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, model.get_submodule(name).to_inference())
    for p in model.parameters():
        p.requires_grad_(False)
    return losses
