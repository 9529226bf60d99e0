"""The watermark as a logits processor: add delta to the green tokens of each row's next position."""

from __future__ import annotations

import torch

from ligero.watermark.greenlist import GreenList
from ligero.watermark.keys import WatermarkKey


class Watermarker:
    """`SamplingConfig(logits_processor=Watermarker(key, vocab_size))`: every sampler (greedy, temperature, top-k,
    top-p) then draws from the biased logits. A row whose history is shorter than the context width pads it with its
    first token (the detector never scores those positions). Rows sharing one Watermarker are biased in one
    batched call."""

    def __init__(self, key: WatermarkKey, vocab_size: int, device: torch.device | str = "cpu"):
        self.key, self.green = key, GreenList(key, vocab_size, device)
        self.delta, self.width = key.settings.delta, key.settings.context_width

    @property
    def key_id(self) -> str:
        return self.key.key_id

    def __call__(self, histories: list[list[int]], logits: torch.Tensor) -> torch.Tensor:
        w = max(self.width, 1)
        contexts = torch.tensor([([h[0]] * w + h)[-w:] for h in histories], dtype=torch.int64,
                                device=self.green.token_hash.device)
        mask = self.green.mask(contexts)  # [n, V]
        if mask.shape[-1] != logits.shape[-1]:
            raise ValueError(f"the watermark covers {mask.shape[-1]} token ids but the logits have {logits.shape[-1]}")
        return logits + self.delta * mask.to(logits.dtype)
