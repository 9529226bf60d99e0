"""Batched generation: left padding, a static KV cache, greedy / temperature / top-k / top-p sampling, and per row
OpenAI's logit adjustments (logit_bias, presence and frequency penalties) and top log-probs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from ligero.errors import LigeroError
from ligero.kernels import cpu_kernels
from ligero.models.transformer import Transformer

# One forward pass's activations stay under about this many bytes: at the 1.1B shape a prompt batch of 8 x 300
# tokens held ~0.5 GB of activations (FFN intermediates, attention scores) on top of the model; small models'
# usual batches are unaffected (SmolLM2: ~2000 tokens per pass).
ACTIVATION_BUDGET_BYTES = 64 << 20


def batch_token_budget(cfg, activation_bytes: int = ACTIVATION_BUDGET_BYTES) -> int:
    """Tokens one forward pass may hold so its fp32 activations stay under `activation_bytes`: per token about
    three FFN-wide vectors (gate, up, their product) and six model-wide ones (residual, norm, q/k/v, output)."""
    per_token = 4 * (3 * cfg.ffn_dim + 6 * cfg.dim)
    return max(1, activation_bytes // per_token)


def prefill(model: Transformer, tokens: torch.Tensor, positions: torch.Tensor, cache,
            embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Last-position logits [B, V] of prompts [B, T] written into an empty `cache`, in chunks of positions so one
    pass holds at most batch_token_budget tokens (the cache takes multi-token steps: each chunk attends to the
    ones before it exactly). `embeds` [B, T, C]: the prompts' input vectors, when they are not the tokens'
    embeddings (image features spliced into the text)."""
    B, T = tokens.shape
    chunk = max(1, batch_token_budget(model.cfg) // B)
    done = 0  # positions already in the cache
    if B == 1 and getattr(cache, "length", None) == 0 and int(positions[0, 0]) == 0:
        # One prompt: each chunk in one native call where the model allows (Transformer.prefill_row), as a
        # continuous batch prefills its rows, so a request decodes the same alone or served.
        ids = tokens[0].tolist()
        while done < T:
            part = None if embeds is None else embeds[0, done : done + chunk]
            last = model.prefill_row(cache, 0, ids[done : done + chunk], done, part)
            if last is None:  # declined: the layers take it from here
                break
            done = min(T, done + chunk)
            if done == T:
                return last[None]
    for start in range(done, T, chunk):
        part = None if embeds is None else embeds[:, start : start + chunk]
        logits = model(tokens[:, start : start + chunk], positions[:, start : start + chunk], kv_cache=cache,
                       last_only=True, embeds=part)
    return logits[:, -1]


class LogitsProcessor(Protocol):
    """Changes the logits of several rows at once before sampling (a watermark, for example): `histories[r]` is row
    r's prompt followed by its generated tokens, `logits` [n, V] those rows' logits after logit_bias and penalties;
    returns the new [n, V] logits. Rows that share one processor object are processed in one call."""

    def __call__(self, histories: list[list[int]], logits: torch.Tensor) -> torch.Tensor: ...


MAX_PENALTY = 2.0  # OpenAI's range for presence / frequency penalties: -2 .. 2
MAX_LOGIT_BIAS = 100.0  # and for logit_bias values: -100 .. 100


@dataclass
class SamplingConfig:
    """How one row picks its next token. The logit adjustments follow OpenAI: `logit_bias` adds a value to a token's
    logit; of the tokens generated so far, each occurrence costs `frequency_penalty` and having occurred at all costs
    `presence_penalty` (the prompt does not count). They apply before temperature, top-k and top-p, and also to
    greedy decoding; so does `logits_processor`, after them."""

    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> value added to its logit
    logits_processor: LogitsProcessor | None = None  # applied last, before temperature, top-k / top-p and greedy

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise LigeroError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise LigeroError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise LigeroError(f"top_p must be in (0, 1], got {self.top_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (math.isfinite(value) and -MAX_PENALTY <= value <= MAX_PENALTY):
                raise LigeroError(f"{name} must be between -2 and 2, got {value}")
        for token, value in self.logit_bias.items():
            if not isinstance(token, int) or token < 0:
                raise LigeroError(f"logit_bias keys must be token ids (whole numbers >= 0), got {token!r}")
            if not (math.isfinite(value) and -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS):
                raise LigeroError(f"logit_bias values must be between -100 and 100, got {value} for token {token}")

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)


@dataclass
class RowAdjustments:
    """One row's logit adjustments between its model logits and sampling: logit_bias as (ids, values), its
    generated-token counts (presence / frequency penalties) and the token history its logits processor reads.
    Only rows that ask for any get one; the others' logits are never touched, so their tokens stay exactly what
    plain sampling gives."""

    sampling: SamplingConfig
    bias: tuple[torch.Tensor, torch.Tensor] | None = None
    counts: torch.Tensor | None = None  # [V]
    history: list[int] | None = None  # prompt + generated

    @classmethod
    def for_row(cls, sampling: SamplingConfig, prompt: list[int], vocab: int, device) -> RowAdjustments | None:
        """The row's adjustments, or None when it asks for none; a logit_bias outside the vocabulary is an error."""
        if sampling.logit_bias and max(sampling.logit_bias) >= vocab:
            raise LigeroError(f"logit_bias names token {max(sampling.logit_bias)}, but the vocabulary has {vocab} "
                              f"tokens (ids 0..{vocab - 1})")
        if not (sampling.logit_bias or sampling.penalized or sampling.logits_processor is not None):
            return None
        bias = (torch.tensor(list(sampling.logit_bias), device=device),
                torch.tensor(list(sampling.logit_bias.values()), dtype=torch.float32, device=device)) \
            if sampling.logit_bias else None
        return cls(sampling, bias, torch.zeros(vocab, device=device) if sampling.penalized else None,
                   list(prompt) if sampling.logits_processor is not None else None)

    def record(self, token: int) -> None:
        """A token the row generated."""
        if self.counts is not None:
            self.counts[token] += 1
        if self.history is not None:
            self.history.append(token)


def adjusted_logits(logits: torch.Tensor, rows: list[RowAdjustments | None]) -> torch.Tensor:
    """logits [n, V] of n rows, plus each row's logit_bias, minus its penalties, then its logits processor (rows
    sharing one processor object in one call); `logits` itself when no row adjusts anything."""
    if not any(rows):
        return logits
    logits = logits.float().clone()
    groups: dict[int, tuple[LogitsProcessor, list[int]]] = {}
    for j, row in enumerate(rows):
        if row is None:
            continue
        if row.bias is not None:
            logits[j, row.bias[0]] += row.bias[1]
        if row.counts is not None:
            cfg = row.sampling
            logits[j] -= row.counts * cfg.frequency_penalty + (row.counts > 0).float() * cfg.presence_penalty
        if row.history is not None:
            groups.setdefault(id(row.sampling.logits_processor), (row.sampling.logits_processor, []))[1].append(j)
    for processor, js in groups.values():
        index = torch.tensor(js, device=logits.device)
        logits[index] = processor([rows[j].history for j in js], logits[index])
    return logits


def greedy_pick(scores: torch.Tensor, logits: torch.Tensor) -> tuple[list[int], list[float]]:
    """Greedy tokens of rows `scores` [n, V] (the first maximum, as argmax) and their log-probs under `logits`
    [n, V] (the model's, before any adjustment; pass the same tensor when none applies). On CPU one native pass per
    row replaces argmax + log_softmax + gather, which at 16 rows of a 49k vocabulary took ~1.5 ms a step."""
    ext = cpu_kernels() if scores.device.type == "cpu" and scores.dtype == logits.dtype == torch.float32 else None
    if ext is not None:
        ids, log_probs = ext.greedy_rows(scores, logits)
    else:
        ids = scores.argmax(-1)
        log_probs = F.log_softmax(logits.float(), -1).gather(1, ids[:, None])[:, 0]
    return ids.tolist(), log_probs.tolist()


def greedy_adjusted(logits: torch.Tensor, rows: list[RowAdjustments | None]) -> tuple[list[int], list[float]]:
    """greedy_pick(adjusted_logits(logits, rows), logits): greedy tokens after each row's adjustments, log-probs under
    the model's logits. Where the only adjustment is a logit_bias (a client suppressing end-of-text, say), one native
    pass per row applies it without the biased copy of every row (~0.3 ms a step at 16 rows)."""
    ext = cpu_kernels() if logits.device.type == "cpu" and logits.dtype == torch.float32 and any(rows) else None
    if ext is None or not all(r is None or (r.counts is None and r.history is None) for r in rows):
        return greedy_pick(adjusted_logits(logits, rows), logits)
    biased = [r.bias for r in rows if r is not None and r.bias is not None]
    offsets = torch.tensor([0] + [0 if r is None or r.bias is None else len(r.bias[0]) for r in rows]).cumsum(0)
    ids, log_probs = ext.greedy_rows_biased(logits, offsets, torch.cat([b[0] for b in biased]),
                                            torch.cat([b[1] for b in biased]))
    return ids.tolist(), log_probs.tolist()


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> next token ids [B]."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already reach top_p (the top token always stays).
        drop = probs.cumsum(-1) - probs >= cfg.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per sequence (stop token / stop string excluded)
    texts: list[str]
    finish_reasons: list[str]  # "eos", "stop", "length"
    prompt_tokens: list[int] = field(default_factory=list)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [B, T] and positions [B, T] (-1 on padding) for left-padded prompts."""
    longest = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    positions = torch.full((len(prompts), longest), -1, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, longest - len(p):] = torch.tensor(p, dtype=torch.long)
        positions[i, longest - len(p):] = torch.arange(len(p))
    return tokens, positions


class BatchGeneration:
    """A batch of prompts decoded one step at a time: each row with its own sampling settings, random stream and
    token budget. `step()` returns the tokens produced in that step, so a caller can stream them, stop a row
    (`finish`) between steps, and read each token's log-prob under the model's untempered distribution (before
    logit_bias and penalties). A row that asks for `top_logprobs` finds, after each step, the most likely tokens
    under that distribution in `alternatives[row]`: [(token, logprob)], most likely first.
    `prompt_embeds[row]` [len(prompt), C], where given, are that prompt's input vectors instead of its tokens'
    embeddings (a vision-language prompt: image features at the image tokens' positions).
    """

    @torch.inference_mode()
    def __init__(self, model: Transformer, prompts: list[list[int]], max_new_tokens: int | list[int],
                 sampling: SamplingConfig | list[SamplingConfig] | None = None, eos_ids: list[int] | None = None,
                 pad_id: int = 0, top_logprobs: int | list[int] = 0,
                 prompt_embeds: list[torch.Tensor | None] | None = None):
        n = len(prompts)
        if not prompts or any(len(p) == 0 for p in prompts):
            raise LigeroError("every prompt needs at least one token")
        budgets = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
        samplings = [sampling or SamplingConfig()] * n if not isinstance(sampling, list) else sampling
        tops = [top_logprobs] * n if isinstance(top_logprobs, int) else list(top_logprobs)
        if len(budgets) != n or len(samplings) != n or len(tops) != n:
            raise LigeroError("give one max_new_tokens, sampling config and top_logprobs per prompt (or one for all)")
        if min(budgets) < 1:
            raise LigeroError(f"max_new_tokens must be >= 1, got {min(budgets)}")
        longest, ctx = max(len(p) for p in prompts), model.cfg.max_seq_len
        if longest >= ctx:
            raise LigeroError(f"the prompt is {longest} tokens but the model's context is {ctx}; shorten the prompt")
        self.budgets = [min(b, ctx - longest) for b in budgets]
        self.model, self.samplings, self.pad_id, self.tops = model, samplings, pad_id, tops
        self.prompts = prompts
        self.eos = set(eos_ids or [])
        device = model.device
        tokens, positions = left_pad(prompts, pad_id)
        tokens, positions = tokens.to(device), positions.to(device)
        self.cache = model.new_cache(n, longest + max(self.budgets))
        # One config for the batch: one random stream for the whole batch. One config per row: a stream per row,
        # so a request's sample does not depend on what it was batched with.
        self.shared = not isinstance(sampling, list)
        self.generators = [torch.Generator(device=device).manual_seed(s.seed) if s.temperature > 0 else None
                           for s in (samplings[:1] if self.shared else samplings)]
        self.tokens: list[list[int]] = [[] for _ in prompts]  # new tokens per row (EOS excluded)
        self.reasons: list[str | None] = [None] * n  # None while the row is still generating
        self.alternatives: dict[int, list[tuple[int, float]]] = {}  # row -> top tokens of the last step
        self.next_pos = positions[:, -1:] + 1  # [B, 1]
        embeds = None
        if prompt_embeds is not None and any(e is not None for e in prompt_embeds):
            if len(prompt_embeds) != n:
                raise LigeroError(f"give one prompt_embeds entry per prompt (or None): {len(prompt_embeds)} for {n}")
            embeds = model.embed_tokens(tokens).clone()  # [B, T, C]; rows without vectors keep their embeddings
            for i, e in enumerate(prompt_embeds):
                if e is not None:
                    if tuple(e.shape) != (len(prompts[i]), model.cfg.dim):
                        raise LigeroError(f"prompt {i}: embeddings of shape {tuple(e.shape)} for "
                                          f"{len(prompts[i])} tokens of width {model.cfg.dim}")
                    embeds[i, longest - len(prompts[i]):] = e.to(embeds)
        self.logits = prefill(model, tokens, positions, self.cache, embeds)  # [B, V]
        self._prepare_adjustments()

    def _prepare_adjustments(self) -> None:
        """Per-row logit adjustments (RowAdjustments), only for the rows that ask for them."""
        vocab, device = self.logits.shape[-1], self.logits.device
        self.adjustments = [RowAdjustments.for_row(s, p, vocab, device) for s, p in zip(self.samplings, self.prompts)]

    @property
    def done(self) -> bool:
        return all(r is not None for r in self.reasons)

    def finish(self, row: int, reason: str) -> None:
        """Stop a row (a stop string, a guardrail, a client that left); its slot decodes padding from now on."""
        if self.reasons[row] is None:
            self.reasons[row] = reason

    def _adjusted_logits(self) -> torch.Tensor:
        """The logits to sample from (adjusted_logits; finished rows are left as they are)."""
        return adjusted_logits(self.logits, [a if r is None else None for a, r in zip(self.adjustments,
                                                                                       self.reasons)])

    def _sample(self) -> list[int]:
        live = [i for i, r in enumerate(self.reasons) if r is None]
        logits = self._adjusted_logits()
        if self.shared:
            return sample_next(logits, self.samplings[0], self.generators[0]).tolist()
        if all(self.samplings[i].temperature == 0 for i in live):
            return logits.argmax(-1).tolist()
        out = [self.pad_id] * len(self.reasons)
        for i in live:
            out[i] = int(sample_next(logits[i : i + 1], self.samplings[i], self.generators[i]))
        return out

    @torch.inference_mode()
    def step(self) -> list[tuple[int, int, float]]:
        """Sample one token for every unfinished row and run the model on them: [(row, token, logprob)].

        A row that samples EOS finishes ("eos") without producing a token; one that reaches its budget finishes
        ("length") after producing it.
        """
        self.alternatives = {}
        if self.done:
            return []
        live = [i for i, r in enumerate(self.reasons) if r is None]
        if not any(self.tops) and all(self.samplings[i].temperature == 0 for i in live):
            rows = [a if r is None else None for a, r in zip(self.adjustments, self.reasons)]  # finished: as they are
            nxt, logprobs = greedy_adjusted(self.logits, rows)  # one native pass per row
            log_probs = None
        else:
            nxt = self._sample()
            log_probs = F.log_softmax(self.logits.float(), -1)
            logprobs = log_probs.gather(1, torch.tensor(nxt, device=self.logits.device)[:, None])[:, 0].tolist()
        produced = []
        for i, t in enumerate(nxt):
            if self.reasons[i] is not None:
                nxt[i] = self.pad_id
            elif t in self.eos:
                self.reasons[i], nxt[i] = "eos", self.pad_id
            else:
                self.tokens[i].append(t)
                if self.adjustments[i] is not None:
                    self.adjustments[i].record(t)
                produced.append((i, t, float(logprobs[i])))
                if self.tops[i]:
                    values, ids = log_probs[i].topk(min(self.tops[i], log_probs.shape[-1]))
                    self.alternatives[i] = list(zip(ids.tolist(), values.tolist()))
                if len(self.tokens[i]) >= self.budgets[i]:
                    self.reasons[i] = "length"
        if not self.done:
            self.logits = self.model(torch.tensor(nxt, device=self.logits.device)[:, None], self.next_pos,
                                     kv_cache=self.cache)[:, -1]
            self.next_pos = self.next_pos + 1
        return produced


def generate_tokens(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    eos_ids: list[int] | None = None,
    pad_id: int = 0,
    on_token: Callable[[int, int], bool] | None = None,
) -> tuple[list[list[int]], list[str]]:
    """Generate token ids for a batch of prompts: (new tokens per sequence, EOS excluded; finish reasons).

    `on_token(i, token)` sees each new token of an unfinished sequence and returns True to finish it ("stop").
    """
    batch = BatchGeneration(model, prompts, max_new_tokens, sampling, eos_ids, pad_id)
    while not batch.done:
        for i, t, _ in batch.step():
            if on_token and on_token(i, t):
                batch.reasons[i] = "stop"  # overrides "length" when the last allowed token also stops it
    return batch.tokens, batch.reasons


def generate(
    model: Transformer,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 64,
    sampling: SamplingConfig | None = None,
    stop_strings: list[str] | None = None,
    on_text: Callable[[int, str], None] | None = None,
    add_bos: bool | None = None,
) -> GenerationResult:
    """Generate for a batch of text prompts; stop on EOS or a stop string; `on_text(i, delta)` streams text."""
    ids = [tokenizer.encode(p, add_bos=add_bos) for p in prompts]
    stop_strings = [s for s in (stop_strings or []) if s]
    hold = max([len(s) - 1 for s in stop_strings] + [0])  # text that could still grow into a stop string
    out: list[list[int]] = [[] for _ in prompts]
    texts, shown = [""] * len(prompts), [""] * len(prompts)

    def on_token(i: int, token: int) -> bool:
        out[i].append(token)
        text = tokenizer.decode(out[i])
        cuts = [c for c in (text.find(s) for s in stop_strings) if c >= 0]
        texts[i] = text[: min(cuts)] if cuts else text
        if on_text:
            # Never stream a half-decoded UTF-8 character or the start of a possible stop string.
            safe = texts[i] if cuts else texts[i][: len(texts[i]) - hold].rstrip("\ufffd")
            if len(safe) > len(shown[i]) and safe.startswith(shown[i]):
                on_text(i, safe[len(shown[i]):])
                shown[i] = safe
        return bool(cuts)

    new, reasons = generate_tokens(model, ids, max_new_tokens, sampling, tokenizer.eos_ids, tokenizer.pad_id, on_token)
    for i in range(len(prompts)):
        if on_text and len(texts[i]) > len(shown[i]):
            on_text(i, texts[i][len(shown[i]):])
    return GenerationResult(new, texts, reasons, [len(x) for x in ids])
