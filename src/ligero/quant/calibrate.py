"""Calibration: statistics of each linear layer's inputs on the calibration split."""

from __future__ import annotations

import torch

from ligero.errors import LigeroError
from ligero.models.transformer import Linear, Transformer


def calibration_windows(tokenizer, n_windows: int = 8, length: int = 256, text: str | None = None) -> list[list[int]]:
    """Token windows from the calibration split (disjoint from evaluation) or from a user's text."""
    from ligero.eval.data import wikipedia_split

    if n_windows < 1:
        raise LigeroError("calibration needs at least one window; raise --calib-windows")
    from ligero.eval.perplexity import make_windows, window_bos

    ids = tokenizer.encode(text if text is not None else wikipedia_split("calib").text, add_bos=False)
    if len(ids) < length:
        raise LigeroError(f"the calibration text has fewer than {length} tokens; give more text")
    # The same windows as evaluation uses (BOS first for BOS models), so calibration sees the inputs it serves.
    windows = make_windows(ids, length, bos=window_bos(tokenizer))[:n_windows]
    if not windows:
        raise LigeroError(f"the calibration text has fewer than {length} tokens; give more text")
    return windows


@torch.inference_mode()
def input_absmax(model: Transformer, windows: list[list[int]]) -> dict[str, torch.Tensor]:
    """Per input channel max |x| seen by every Linear, over all calibration tokens."""
    stats: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(_module, args):
            amax = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float().cpu()
            stats[name] = torch.maximum(stats[name], amax) if name in stats else amax
        return hook

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in model.named_modules() if isinstance(m, Linear)]
    try:
        for window in windows:
            model(torch.tensor([window], device=model.device))
    finally:
        for h in hooks:
            h.remove()
    return stats
