"""Continuous batching: requests join a running batch at the next decode step and leave it the step they finish.

`SlotKVCache` keeps R rows that start and end independently. Row r's key for position p lives in slot p of every
global layer's cache and in slot p % N of every sliding-window layer's ring (N = the model's window, or the capacity
while that is smaller: then p % N = p, and the ring grows with the capacity), so where a row's keys sit depends only
on its own positions, never on when it joined. Each tensor has one spare slot at the end: rows with nothing to decode
in a step (free, or still prefilling) write there, and no mask ever reads it.

`ContinuousBatch` drives the rows: `admit` a prompt into a free row, `prefill` pending prompts a chunk at a time
(through `SlotKVCache.row`, a one-row KVCache over the same storage: a row's slots are its positions, exactly the
layout KVCache gives a lone sequence), and `step` every row that is ready, one token each, in one forward pass over
the rows in use. Each row samples as `BatchGeneration` samples a row with its own settings (its own random stream,
logit_bias, penalties, logits processor, top log-probs), so a request's tokens do not depend on its neighbours.

Prefix reuse (as llama.cpp's slots reuse their last prompt): a freed row keeps its keys, and a new request goes to
the free row whose last prompt shares the longest prefix with its own, among the rows that do not widen the decode
pass (a step computes rows 0 up to the highest in use); those positions are not prefilled again (a chat template's
system prompt, a repeated instruction). Not for prompts given as vectors (image features sit behind
placeholder tokens that look alike), nor when a sliding-window ring has already overwritten part of the prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ligero.errors import LigeroError
from ligero.models import pages
from ligero.models.config import GLOBAL, LOCAL, ModelConfig
from ligero.models.generate import (
    RowAdjustments,
    SamplingConfig,
    adjusted_logits,
    batch_token_budget,
    greedy_adjusted,
    sample_next,
)
from ligero.models.transformer import CacheStep, KVCache, KVCacheBase, Transformer


class RowView(KVCache):
    """One row of a SlotKVCache as a one-row KVCache (its tensors are views: writes land in the shared cache).
    Used for prompts (multi-token steps), so never handed to the native one-token step."""

    NATIVE = False

    def __init__(self, parent: SlotKVCache, row: int, length: int):  # no super().__init__(): it would allocate
        self.cfg, self.max_len, self.length, self.native = parent.cfg, parent.capacity, length, None
        self.window = parent.ring  # KVCache's ring: slot = position % window, as the parent's
        ends = [parent.capacity if kind == GLOBAL else parent.ring for kind in parent.cfg.layer_types]
        self.k = [t[row : row + 1, :, :n] for t, n in zip(parent.k, ends)]  # without the spare slot
        self.v = [t[row : row + 1, :, :n] for t, n in zip(parent.v, ends)]
        self.pos = {GLOBAL: parent.pos[GLOBAL][row : row + 1, : parent.capacity],
                    LOCAL: parent.pos[LOCAL][row : row + 1, : max(parent.ring, 1)]}


class SlotKVCache(KVCacheBase):
    """K/V for `rows` independent rows of up to `capacity` positions each (see the module docstring); `grow` raises
    the capacity, keeping every row's keys. One-token steps: positions [B, 1], -1 for a row with nothing to decode."""

    NATIVE = True

    def __init__(self, cfg: ModelConfig, rows: int, capacity: int, device=None, dtype=torch.float32):
        self.cfg, self.rows, self.device, self.dtype = cfg, rows, device, dtype
        self.window = cfg.sliding_window if LOCAL in cfg.layer_types else 0
        self.capacity = self.ring = 0  # ring: slots of a sliding-window layer, min(window, capacity)
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.pos: dict[str, torch.Tensor] = {}
        self.native = None  # (model, native decode step), set by native_decode_plan
        self._prefixes: dict[int, SlotKVCache] = {}
        self.grow(capacity)

    def grow(self, capacity: int) -> None:
        """At least `capacity` positions per row; every row keeps its keys (while the ring is smaller than the window
        it holds positions in order, so it grows by copying too)."""
        if capacity <= self.capacity:
            return
        cfg = self.cfg
        sizes = {GLOBAL: (self.capacity, capacity), LOCAL: (self.ring, min(self.window, capacity))}
        shape = lambda n: (self.rows, cfg.n_kv_heads, n + 1, cfg.head_dim)  # noqa: E731  (+1: the spare slot)

        # the layers whose tensors change, all new keys and values in one block (pages.zeros_many)
        todo = [i for i, kind in enumerate(cfg.layer_types) if not self.k or sizes[kind][0] != sizes[kind][1]]
        fresh = pages.zeros_many([shape(sizes[cfg.layer_types[i]][1]) for i in todo] * 2, self.dtype, self.device)
        k, v = list(self.k) or [None] * len(cfg.layer_types), list(self.v) or [None] * len(cfg.layer_types)
        for j, i in enumerate(todo):
            old = sizes[cfg.layer_types[i]][0]
            for tensors, t in ((k, fresh[j]), (v, fresh[len(todo) + j])):
                if tensors[i] is not None and old:
                    t[:, :, :old] = tensors[i][:, :, :old]
                tensors[i] = t
        self.k, self.v = k, v
        for kind, (old, new) in sizes.items():
            table = torch.full((self.rows, max(new, 1) + 1), -1, dtype=torch.long, device=self.device)
            if old:
                table[:, :old] = self.pos[kind][:, :old]
            self.pos[kind] = table
        self.capacity, self.ring = capacity, sizes[LOCAL][1]
        self.native, self._prefixes = None, {}  # native plans hold the old tensors

    def reset(self, row: int, keep: int = 0) -> None:
        """Forget a row's keys from position `keep` on (masks read positions: -1 hides a slot)."""
        for table in self.pos.values():
            table[row].masked_fill_(table[row] >= keep, -1)

    def row(self, row: int, length: int) -> RowView:
        """Row `row` as a one-row KVCache whose next step starts at position `length` (its prompt's next chunk)."""
        return RowView(self, row, length)

    def prefix(self, n: int) -> SlotKVCache:
        """Rows [0, n) as a cache over the same storage (a step computes only the rows in use)."""
        if n == self.rows:
            return self
        view = self._prefixes.get(n)
        if view is None:
            view = object.__new__(SlotKVCache)
            view.cfg, view.rows, view.device, view.dtype = self.cfg, n, self.device, self.dtype
            view.window, view.capacity, view.ring = self.window, self.capacity, self.ring
            view.native, view._prefixes = None, {}
            view.k, view.v = [t[:n] for t in self.k], [t[:n] for t in self.v]
            view.pos = {kind: t[:n] for kind, t in self.pos.items()}
            self._prefixes[n] = view
        return view

    def tokens(self) -> int:
        """Positions held (keys of global layers), over every row."""
        return int((self.pos[GLOBAL][:, : self.capacity] >= 0).sum())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def begin(self, positions: torch.Tensor) -> CacheStep:
        if positions.shape[1] != 1:
            raise LigeroError("SlotKVCache takes one-token steps; prefill a prompt through SlotKVCache.row")
        p = positions[:, 0]
        live = p >= 0
        top = int(p.max())
        if top >= self.capacity:
            raise LigeroError(f"a row reaches position {top} but the cache holds {self.capacity}; grow it first")
        rows = live.nonzero()[:, 0]
        self.pos[GLOBAL][rows, p[rows]] = p[rows]
        slots = {GLOBAL: torch.where(live, p, self.capacity)}
        keys = {GLOBAL: self.pos[GLOBAL][:, : max(top + 1, 1)]}
        if self.window:
            N = self.ring
            self.pos[LOCAL][rows, p[rows] % N] = p[rows]
            slots[LOCAL] = torch.where(live, p % N, N)
            keys[LOCAL] = self.pos[LOCAL][:, :N]
        else:
            slots[LOCAL] = torch.zeros_like(p)
        return CacheStep(keys, slice(0, keys[GLOBAL].shape[1]), row_slots=slots)

    def begin_chunk(self, row: int, start: int, n: int) -> CacheStep:
        """Positions start..start+n-1 of row `row` written at once (a prompt chunk through the native step, whose
        rows are the chunk's tokens): each token's key positions [n, S] and slot [n]. Global layers only."""
        end = start + n
        if end > self.capacity:
            raise LigeroError(f"a row reaches position {end - 1} but the cache holds {self.capacity}; grow it first")
        p = torch.arange(start, end, device=self.device)
        self.pos[GLOBAL][row, start:end] = p
        keys = self.pos[GLOBAL][row : row + 1, :end].expand(n, end)
        return CacheStep({GLOBAL: keys}, slice(start, end), row_slots={GLOBAL: p})

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, step: CacheStep):
        kind = self.cfg.layer_types[layer]
        kc, vc = self.k[layer], self.v[layer]
        rows = torch.arange(k.shape[0], device=k.device)
        slots = step.row_slots[kind]
        kc[rows, :, slots] = k[:, :, 0].to(kc.dtype)  # an fp16 cache rounds the new keys once, here
        vc[rows, :, slots] = v[:, :, 0].to(vc.dtype)
        end = step.global_slots.stop if kind == GLOBAL else self.ring
        return kc[:, :, :end], vc[:, :, :end]

    def commit(self, step: CacheStep) -> None:
        pass  # positions were recorded by begin


@dataclass
class RowRequest:
    """What a row decodes: a prompt (its token ids; `embeds` [len(prompt), C] when its input vectors are not the
    tokens' embeddings), a token budget, sampling settings and how many top log-probs to report per token."""

    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    top_logprobs: int = 0
    embeds: torch.Tensor | None = None


@dataclass
class _Row:
    request: RowRequest
    budget: int
    generator: torch.Generator | None
    prefilled: int = 0  # prompt tokens in the cache
    admitted: int = 0  # admission order
    tokens: list[int] = field(default_factory=list)  # generated (EOS excluded)
    reason: str | None = None  # None while generating
    adjust: RowAdjustments | None = None  # logit_bias, penalties, logits processor

    @property
    def ready(self) -> bool:
        return self.reason is None and self.prefilled == len(self.request.prompt)


class ContinuousBatch:
    """Up to `rows` requests decoding together; requests join and leave between steps (module docstring).

    `admit` returns the row a request got; `prefill(max_tokens)` feeds waiting prompts (at most `max_tokens` prompt
    tokens, None: all of them) and returns the rows that became ready; `step()` samples one token for every ready row
    and returns [(row, token, logprob)]; `reasons[row]` says why a row ended ("eos", "length", or what `finish` was
    told); `release(row)` frees it. `alternatives[row]` holds the last step's top log-probs of rows that asked."""

    def __init__(self, model: Transformer, rows: int, eos_ids: list[int] | None = None, pad_id: int = 0,
                 capacity: int = 256, kv_dtype: torch.dtype | None = None):
        if rows < 1:
            raise LigeroError(f"a continuous batch needs at least one row, got {rows}")
        self.model, self.pad_id, self.eos = model, pad_id, set(eos_ids or [])
        self.context = model.cfg.max_seq_len
        # kv_dtype: the keys' and values' storage (None: the model's dtype). fp16 halves what attention reads per
        # step (llama.cpp's default cache type); attention still computes in the model's dtype.
        self.cache = SlotKVCache(model.cfg, rows, min(capacity, self.context), device=model.device,
                                 dtype=kv_dtype or model.dtype)
        self.rows: list[_Row | None] = [None] * rows
        self.logits = torch.zeros(rows, model.cfg.vocab_size, device=model.device)  # each ready row's next logits
        self.alternatives: dict[int, list[tuple[int, float]]] = {}
        self.steps = 0  # decode steps run
        self.stepped_rows = 0  # rows summed over those steps (busy rows per step = stepped_rows / steps)
        self.reused_tokens = 0  # prompt tokens not prefilled because their row still held them
        self.admissions = 0
        # Per row, what its keys hold once freed: (prompt tokens whose keys are reusable, positions written in all)
        self.kept: list[tuple[list[int], int] | None] = [None] * rows

    # --- rows ------------------------------------------------------------------------------------------------

    @property
    def free(self) -> int:
        return sum(r is None for r in self.rows)

    @property
    def busy(self) -> int:
        return len(self.rows) - self.free

    @property
    def reasons(self) -> dict[int, str | None]:
        return {i: r.reason for i, r in enumerate(self.rows) if r is not None}

    def tokens_of(self, row: int) -> list[int]:
        return self.rows[row].tokens

    def admit(self, request: RowRequest) -> int:
        """Put a request in a free row (its prompt waits for `prefill`): among those that do not widen the decode
        pass, the one whose last prompt shares the longest prefix with it, else the lowest. Returns the row."""
        n = len(request.prompt)
        if n == 0:
            raise LigeroError("every prompt needs at least one token")
        if n >= self.context:
            raise LigeroError(f"the prompt is {n} tokens but the model's context is {self.context}; shorten it")
        if request.max_new_tokens < 1:
            raise LigeroError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
        if request.embeds is not None and tuple(request.embeds.shape) != (n, self.model.cfg.dim):
            raise LigeroError(f"embeddings of shape {tuple(request.embeds.shape)} for {n} tokens of width "
                              f"{self.model.cfg.dim}")
        s = request.sampling
        adjust = RowAdjustments.for_row(s, request.prompt, self.logits.shape[-1], self.logits.device)
        if not self.free:
            raise LigeroError("no free row: wait until a row is released")
        budget = min(request.max_new_tokens, self.context - n)
        need = n + budget
        if need > self.cache.capacity:  # double, so a stream of growing requests reallocates rarely
            self.cache.grow(min(self.context, max(need, 2 * self.cache.capacity)))
        free = [i for i, r in enumerate(self.rows) if r is None]
        # A step computes rows [0, highest in use]: a row above them widens every step of the request's life (the
        # rows below ride along as padding), where reusing its prompt prefix saves one prefill. So only rows within
        # the span that the lowest free row gives anyway may lend their prefix.
        span = max([i + 1 for i, r in enumerate(self.rows) if r is not None] + [free[0] + 1])
        reusable = {i: self._reusable(i, request) for i in free if i < span}
        row = max(reusable, key=lambda i: (reusable[i], -i))  # the longest shared prefix, else the lowest row
        self.cache.reset(row, keep=reusable[row])
        self.reused_tokens += reusable[row]
        device = self.logits.device
        self.admissions += 1
        state = _Row(request, budget, torch.Generator(device=device).manual_seed(s.seed) if s.temperature > 0
                     else None, prefilled=reusable[row], admitted=self.admissions, adjust=adjust)
        self.rows[row] = state
        return row

    def finish(self, row: int, reason: str) -> None:
        """Stop a row (a stop string, a guardrail, a client that left); it takes no more steps."""
        state = self.rows[row]
        if state is not None and state.reason is None:
            state.reason = reason

    def forget(self) -> None:
        """Reuse no row's keys (after a failed step, what the rows hold is not known)."""
        self.kept = [None] * len(self.kept)

    def release(self, row: int) -> None:
        state = self.rows[row]
        if state is not None:
            prompt = state.request.prompt
            written = state.prefilled + len(state.tokens)  # at most: the last token may not have been fed
            self.kept[row] = None if state.request.embeds is not None else (prompt[: state.prefilled], written)
        self.rows[row] = None

    def _reusable(self, row: int, request: RowRequest) -> int:
        """Leading prompt tokens whose keys row `row` still holds (at least one token is left to prefill, for the
        logits)."""
        kept = self.kept[row]
        if kept is None or request.embeds is not None:
            return 0
        tokens, written = kept
        if self.cache.window and written > self.cache.ring:  # the ring has overwritten early positions
            return 0
        n = 0
        for a, b in zip(tokens, request.prompt[:-1]):
            if a != b:
                break
            n += 1
        return n

    # --- prompts ---------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, max_tokens: int | None = None) -> list[int]:
        """Feed waiting prompts into the cache, oldest request first, at most `max_tokens` tokens in all (None: every
        waiting token); one pass holds at most batch_token_budget tokens. Returns the rows whose prompt is done."""
        left = float("inf") if max_tokens is None else max_tokens
        chunk_cap = batch_token_budget(self.model.cfg)
        ready = []
        waiting = [(s.admitted, i, s) for i, s in enumerate(self.rows) if s is not None and s.reason is None]
        for _, i, state in sorted(waiting):  # admission order, whatever the rows
            prompt = state.request.prompt
            while state.prefilled < len(prompt) and left > 0:
                start = state.prefilled
                end = int(min(len(prompt), start + chunk_cap, start + left))
                embeds = state.request.embeds
                last = self.model.prefill_row(self.cache, i, prompt[start:end], start,
                                              None if embeds is None else embeds[start:end].to(self.model.device))
                if last is None:  # layer by layer (Transformer.prefill_row says when)
                    tokens = torch.tensor([prompt[start:end]], device=self.logits.device)
                    positions = torch.arange(start, end, device=self.logits.device)[None]
                    part = None if embeds is None else embeds[None, start:end].to(self.model.device)
                    last = self.model(tokens, positions, kv_cache=self.cache.row(i, start), last_only=True,
                                      embeds=part)[0, -1]
                state.prefilled, left = end, left - (end - start)
                if end == len(prompt):
                    self.logits[i] = last
                    ready.append(i)
            if left <= 0:
                break
        return ready

    @property
    def prefilling(self) -> int:
        """Prompt tokens still waiting for `prefill`."""
        return sum(len(s.request.prompt) - s.prefilled for s in self.rows if s is not None and s.reason is None)

    # --- decoding --------------------------------------------------------------------------------------------

    def _live_logits(self, live: list[int]) -> torch.Tensor:
        """The next-token logits of rows `live` [len(live), V]: a view when they are rows 0..n-1 (the usual case)."""
        if live == list(range(len(live))):
            return self.logits[: len(live)]
        return self.logits.index_select(0, torch.tensor(live, device=self.logits.device))

    def _pick(self, live: list[int]) -> tuple[list[int], list[float], torch.Tensor | None]:
        """Next token and its log-prob under the model for every row in `live`, plus the full log-probs when a row
        samples or asks for top log-probs (None otherwise: greedy rows take one native pass, greedy_adjusted)."""
        raw = self._live_logits(live)
        states = [self.rows[i] for i in live]
        if all(s.request.sampling.temperature == 0 and not s.request.top_logprobs for s in states):
            nxt, picked = greedy_adjusted(raw, [s.adjust for s in states])
            return nxt, picked, None
        scores = adjusted_logits(raw, [s.adjust for s in states])
        if all(s.request.sampling.temperature == 0 for s in states):
            nxt = scores.argmax(-1).tolist()
        else:
            nxt = [int(sample_next(scores[j : j + 1], s.request.sampling, s.generator)) for j, s in enumerate(states)]
        log_probs = F.log_softmax(raw.float(), -1)
        picked = log_probs.gather(1, torch.tensor(nxt, device=log_probs.device)[:, None])[:, 0].tolist()
        return nxt, picked, log_probs

    @torch.inference_mode()
    def step(self) -> list[tuple[int, int, float]]:
        """One token for every ready row, then one forward pass for those that go on: [(row, token, logprob)].
        A row that samples EOS ends ("eos") without a token; one that reaches its budget ends ("length") after it."""
        self.alternatives = {}
        live = [i for i, s in enumerate(self.rows) if s is not None and s.ready]
        if not live:
            return []
        nxt, picked, log_probs = self._pick(live)
        produced, going = [], []
        for j, (i, t) in enumerate(zip(live, nxt)):
            state = self.rows[i]
            if t in self.eos:
                state.reason = "eos"
                continue
            state.tokens.append(t)
            if state.adjust is not None:
                state.adjust.record(t)
            produced.append((i, t, picked[j]))
            top = state.request.top_logprobs
            if top:
                values, ids = log_probs[j].topk(min(top, log_probs.shape[-1]))
                self.alternatives[i] = list(zip(ids.tolist(), values.tolist()))
            if len(state.tokens) >= state.budget:
                state.reason = "length"
            else:
                going.append((i, t))
        if going:
            self._forward(going)
        return produced

    def _forward(self, going: list[tuple[int, int]]) -> None:
        """Run the model one position for rows `going` [(row, token)]: rows [0, n) in one pass, the others in that
        range (free or prefilling) as padding that writes the spare slot."""
        n = max(i for i, _ in going) + 1
        device = self.logits.device
        token_list, position_list = [self.pad_id] * n, [-1] * n  # two tensors made at once, not 2 writes a row
        for i, t in going:
            token_list[i] = t
            position_list[i] = len(self.rows[i].request.prompt) + len(self.rows[i].tokens) - 1
        tokens = torch.tensor(token_list, dtype=torch.long, device=device)[:, None]  # [n, 1]
        positions = torch.tensor(position_list, dtype=torch.long, device=device)[:, None]
        out = self.model(tokens, positions, kv_cache=self.cache.prefix(n))[:, -1]  # [n, V]
        rows = [i for i, _ in going]
        if rows == list(range(n)):
            self.logits[:n].copy_(out)
        else:
            index = torch.tensor(rows, device=device)
            self.logits.index_copy_(0, index, out.index_select(0, index).to(self.logits.dtype))
        self.steps += 1
        self.stepped_rows += len(going)
