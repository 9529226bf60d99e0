"""Guardrails for `ligero serve`: request limits, an output toxicity filter, banned patterns and the rate-limit
settings (the limiter itself and API keys are in `ligero.serve.access`).

A `Guardrails` value holds the settings; it comes from a small TOML/YAML/JSON file or from a deployment card's
"guardrails" section. The server applies it in this order and records every `Decision` in the store:

1. `access.ApiKeys.check` (bearer token) and `access.RateLimiter.acquire` (token bucket per key or client address);
2. `check_body_size` and `check_prompt` (prompt length, banned patterns) before anything is generated;
3. `clip_max_tokens` to cap the requested output length;
4. `OutputGuard` while the output is generated: it releases text to the client word by word and only after
   the word has passed the banned patterns and the toxicity filter, so a streamed response never leaks the word
   that got it blocked.

Decision details never contain text the user wrote or a presented API key (they end up in the store and in logs).

A plain guardrails file (every key optional; `toxicity = false` turns the output filter off):

    max_body_bytes = 1000000
    max_prompt_tokens = 2048
    max_new_tokens = 256
    banned_patterns = ["(?:api|secret)[-_ ]?key"]   # regexes, case-insensitive
    rate_limit_per_minute = 60                      # per API key; omit to turn rate limiting off
    rate_limit_burst = 10                           # default: 10 seconds' worth of the rate, at least 1
    [toxicity]
    threshold = 0.5
    action = "block"                                # block | redact | flag
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from ligero.errors import LigeroError
from ligero.serve.access import RateLimiter
from ligero.serve.checks import is_int, is_number, one_line
from ligero.serve.store import EVENT_ACTIONS, RULES

log = logging.getLogger("ligero.serve")
GUARDRAILS_VERSION = 1  # bump when a setting changes meaning; files may state the version they were written for
TOXICITY_ACTIONS = ("block", "redact", "flag")
SERVED_CLASSIFIER = "alt-profanity-check"  # the only output classifier the server runs (ligero.eval.toxicity)
BURST_SECONDS = 10  # default bucket: 10 seconds' worth of requests at the full rate, so spikes stay short
MAX_HELD_CHARS = 100  # release a "word" this long anyway (no spaces in a URL or CJK text) rather than stall
FILE_HELP = "use a .toml, .yaml/.yml or .json guardrails file, or a deployment card (cards/<variant>.json)"

Scorer = Callable[[list[str]], list[float]]


def score_texts(texts: list[str]) -> list[float]:
    """The default toxicity scorer, `ligero.eval.toxicity.score_texts`, imported on first use (it pulls in torch
    and unpickles the classifier, which a server without an output filter need not pay for)."""
    from ligero.eval.toxicity import score_texts as real

    return real(texts)


def _running_toxicity():
    """A running score for one growing text (ligero.eval.toxicity.RunningToxicity), None where the classifier has
    another layout (then every check scores the whole text)."""
    from ligero.eval.toxicity import load_scorer

    factory = getattr(load_scorer(), "running", None)
    return factory() if factory is not None else None


score_texts.running = _running_toxicity


class BatchScorer:
    """A scorer shared by every request of a server: texts that several threads ask for at the same time are scored
    in one classifier call. A caller that finds no call running makes one for everything queued (its own texts
    included), then hands over: a waiting caller whose texts arrived meanwhile makes the next. So concurrent streams
    share calls, and nobody scores for others longer than one call."""

    def __init__(self, scorer: Scorer = score_texts) -> None:
        self.scorer = scorer
        self.calls = 0  # classifier calls made
        self._cond = threading.Condition()
        self._queue: list[tuple[list[str], dict]] = []
        self._running = False

    def __call__(self, texts: list[str]) -> list[float]:
        slot: dict = {}
        with self._cond:
            self._queue.append((list(texts), slot))
            while "scores" not in slot and "error" not in slot:
                if self._running:
                    self._cond.wait()
                    continue
                self._running = True
                batch, self._queue = self._queue, []
                self._cond.release()
                try:
                    self._score(batch)
                finally:
                    self._cond.acquire()
                    self._running = False
                    self._cond.notify_all()
        if "error" in slot:
            raise slot["error"]
        return slot["scores"]

    def running(self):
        """The wrapped scorer's running score for one growing text, or None when it has none."""
        factory = getattr(self.scorer, "running", None)
        return factory() if factory is not None else None

    def _score(self, batch: list[tuple[list[str], dict]]) -> None:
        flat = [t for texts, _ in batch for t in texts]
        try:
            scores = list(self.scorer(flat)) if flat else []
            self.calls += 1
            if len(scores) != len(flat):
                raise ValueError(f"the toxicity scorer returned {len(scores)} scores for {len(flat)} texts")
        except BaseException as exc:  # every caller in the batch sees the error, none waits forever
            for _, slot in batch:
                slot["error"] = exc
            if not isinstance(exc, Exception):
                raise
            return
        start = 0
        for texts, slot in batch:
            slot["scores"] = scores[start : start + len(texts)]
            start += len(texts)


# --- settings --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToxicityFilter:
    """Score the output with the toxicity classifier; at a score >= threshold block the response, redact the
    offending words, or only flag the response (record it, change nothing)."""

    threshold: float = 0.5
    action: str = "block"

    def __post_init__(self) -> None:
        if not is_number(self.threshold) or not 0 < self.threshold <= 1:
            raise LigeroError(f"toxicity threshold must be a number in (0, 1], got {self.threshold!r}; "
                              "0.5 is the usual choice")
        if self.action not in TOXICITY_ACTIONS:
            raise LigeroError(f"toxicity action must be one of {', '.join(TOXICITY_ACTIONS)}, "
                              f"got {self.action!r}")


@dataclass(frozen=True)
class Guardrails:
    """What `ligero serve` enforces on every generation request (see the module docstring)."""

    max_body_bytes: int = 1_000_000
    max_prompt_tokens: int = 2048
    max_new_tokens: int = 256
    toxicity: ToxicityFilter | None = ToxicityFilter()  # None: no output filter
    banned_patterns: tuple[str, ...] = ()  # regexes, case-insensitive, on the prompt and on the output
    rate_limit_per_minute: float | None = None  # per API key (client address when auth is off); None: off
    rate_limit_burst: int | None = None  # bucket size; None: BURST_SECONDS' worth of the rate, at least 1
    _compiled: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_prompt_tokens", "max_new_tokens"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise LigeroError(f"{name} must be a whole number >= 1, got {value!r}")
        if self.toxicity is not None and not isinstance(self.toxicity, ToxicityFilter):
            raise LigeroError(f"toxicity must be a ToxicityFilter or None, got {self.toxicity!r}")
        if isinstance(self.banned_patterns, str) or not isinstance(self.banned_patterns, tuple | list):
            raise LigeroError(f"banned_patterns must be a list of regexes, got {self.banned_patterns!r}")
        object.__setattr__(self, "banned_patterns", tuple(self.banned_patterns))  # a list would break hashing
        compiled = []
        for i, pattern in enumerate(self.banned_patterns):
            if not isinstance(pattern, str) or not pattern:
                raise LigeroError(f"banned_patterns[{i}] must be a non-empty regex string, got {pattern!r}")
            try:
                compiled.append(re.compile(pattern, re.IGNORECASE))
            except re.error as exc:
                raise LigeroError(f"banned_patterns[{i}] {pattern!r} is not a valid regex ({exc}); fix or "
                                  "escape it") from None
        object.__setattr__(self, "_compiled", tuple(compiled))
        rate, burst = self.rate_limit_per_minute, self.rate_limit_burst
        if rate is not None and (not is_number(rate) or rate <= 0):
            raise LigeroError(f"rate_limit_per_minute must be a number > 0, got {rate!r}; leave it out to turn "
                              "rate limiting off")
        if burst is not None:
            if not is_int(burst) or burst < 1:
                raise LigeroError(f"rate_limit_burst must be a whole number >= 1, got {burst!r}")
            if rate is None:
                raise LigeroError("rate_limit_burst is set but rate_limit_per_minute is not; set both or neither")

    @property
    def effective_burst(self) -> int | None:
        """The rate limiter's bucket size: rate_limit_burst, or BURST_SECONDS' worth of the rate (at least 1)."""
        if self.rate_limit_per_minute is None:
            return None
        if self.rate_limit_burst is not None:
            return self.rate_limit_burst
        return max(1, math.ceil(self.rate_limit_per_minute * BURST_SECONDS / 60))

    def rate_limiter(self, clock: Callable[[], float] = time.monotonic) -> RateLimiter | None:
        """A limiter for these settings, or None when rate limiting is off."""
        if self.rate_limit_per_minute is None:
            return None
        return RateLimiter(self.rate_limit_per_minute, self.effective_burst, clock=clock)

    def to_dict(self) -> dict:
        """Plain data (JSON/YAML-ready) that `guardrails_from_dict` reads back to an equal value."""
        return {
            "version": GUARDRAILS_VERSION,
            "max_body_bytes": self.max_body_bytes,
            "max_prompt_tokens": self.max_prompt_tokens,
            "max_new_tokens": self.max_new_tokens,
            "toxicity": (None if self.toxicity is None else
                         {"threshold": self.toxicity.threshold, "action": self.toxicity.action}),
            "banned_patterns": list(self.banned_patterns),
            "rate_limit_per_minute": self.rate_limit_per_minute,
            "rate_limit_burst": self.rate_limit_burst,
        }


SETTINGS = ("version", "max_body_bytes", "max_prompt_tokens", "max_new_tokens", "toxicity", "banned_patterns",
            "rate_limit_per_minute", "rate_limit_burst")
TOXICITY_SETTINGS = ("threshold", "action")


def _unknown(source: str, what: str, keys: Mapping, valid: tuple[str, ...]) -> None:
    extra = [k for k in keys if k not in valid]
    if extra:
        raise LigeroError(f"{source}: unknown {what} {extra[0]!r}; valid ones are {', '.join(valid)}")


def guardrails_from_dict(d: dict, source: str) -> Guardrails:
    """Settings from a plain mapping (a parsed guardrails file); missing keys keep their defaults."""
    if not isinstance(d, Mapping):
        raise LigeroError(f"{source}: guardrails must be a mapping of settings, got {type(d).__name__}")
    _unknown(source, "guardrails setting", d, SETTINGS)
    version = d.get("version", GUARDRAILS_VERSION)
    if version != GUARDRAILS_VERSION:
        raise LigeroError(f"{source}: written for guardrails version {version!r}, but this Ligero reads version "
                          f"{GUARDRAILS_VERSION}; update the file or Ligero")
    kwargs = {k: v for k, v in d.items() if k not in ("version", "toxicity")}
    if "toxicity" in d:
        tox = d["toxicity"]
        if tox is None or tox is False:  # TOML has no null, so `toxicity = false` also turns the filter off
            kwargs["toxicity"] = None
        elif isinstance(tox, Mapping):
            _unknown(source, "toxicity setting", tox, TOXICITY_SETTINGS)
            kwargs["toxicity"] = tox
        else:
            raise LigeroError(f"{source}: toxicity must be a table with threshold and action, or false to turn "
                              f"the output filter off; got {tox!r}")
    return _build(source, kwargs)


def _build(source: str, kwargs: dict) -> Guardrails:
    """Guardrails(**kwargs), with validation errors prefixed by where the settings came from."""
    try:
        if isinstance(kwargs.get("toxicity"), Mapping):
            kwargs["toxicity"] = ToxicityFilter(**kwargs["toxicity"])
        return Guardrails(**kwargs)
    except LigeroError as exc:
        raise LigeroError(f"{source}: {exc}") from None


def guardrails_from_card(card: dict, source: str) -> Guardrails:
    """Settings from a deployment card's "guardrails" section: its output filter, token limits and banned
    patterns (the card has no body-size or rate limits, so those keep their defaults)."""
    section = card.get("guardrails") if isinstance(card, Mapping) else None
    if not isinstance(section, Mapping):
        raise LigeroError(f"{source} has no \"guardrails\" section; regenerate the card with `ligero run` or give "
                          "a plain guardrails file")
    kwargs: dict[str, Any] = {k: section[k] for k in ("max_prompt_tokens", "max_new_tokens", "banned_patterns")
                              if k in section}
    flt = section.get("output_filter")
    if not isinstance(flt, Mapping):
        raise LigeroError(f"{source}: the card's guardrails have no output_filter; regenerate the card with "
                          "`ligero run`")
    classifier = flt.get("classifier", SERVED_CLASSIFIER)
    # Cards name the classifier with its version ("alt-profanity-check 1.9.1"). The threshold only means something
    # for the classifier it was chosen with: another classifier is refused, another version only warned about.
    name, _, version = str(classifier).strip().partition(" ")
    if name != SERVED_CLASSIFIER:
        raise LigeroError(f"{source}: the card's output filter uses classifier {classifier!r}, but the server "
                          f"scores with {SERVED_CLASSIFIER}; use a plain guardrails file instead")
    installed = _installed_version(SERVED_CLASSIFIER)
    if version.strip() and installed and version.strip() != installed:
        log.warning("%s: the card's threshold was chosen with %s, the server scores with version %s", source,
                    classifier, installed)
    kwargs["toxicity"] = {k: flt[k] for k in TOXICITY_SETTINGS if k in flt}
    return _build(source, kwargs)


def _installed_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _is_card(data: Mapping) -> bool:
    # Every deployment card has schema_version and identity at the top level; a plain file has neither.
    return "guardrails" in data and ("schema_version" in data or "identity" in data)


def load_guardrails(path: str | Path) -> Guardrails:
    """Read a guardrails file (.toml, .yaml/.yml, .json) or a deployment card (.json)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise LigeroError(f"guardrails file {path} has an unknown type {suffix or '(no suffix)'!r}; {FILE_HELP}")
    if not path.is_file():
        raise LigeroError(f"guardrails file {path} does not exist; {FILE_HELP}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LigeroError(f"guardrails file {path} cannot be read ({one_line(exc)}); check that it is a "
                          "UTF-8 text file you may read") from None
    kind = {".toml": "TOML", ".json": "JSON"}.get(suffix, "YAML")
    try:
        if kind == "TOML":
            data = tomllib.loads(text)
        elif kind == "JSON":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text)
            data = {} if data is None else data  # an empty YAML file, like an empty TOML file, means defaults
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, yaml.YAMLError) as exc:
        raise LigeroError(f"guardrails file {path} is not valid {kind} ({one_line(exc)}); fix its syntax") from None
    if not isinstance(data, dict):
        raise LigeroError(f"guardrails file {path} must hold a mapping of settings at the top level, not "
                          f"{type(data).__name__}; see `ligero.serve.guardrails` for the format")
    if _is_card(data):
        return guardrails_from_card(data, f"deployment card {path}")
    return guardrails_from_dict(data, f"guardrails file {path}")


# --- decisions before generation -------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """One guardrail decision, as the store records it (rule in store.RULES, action in store.EVENT_ACTIONS)."""

    rule: str
    action: str
    detail: str

    def __post_init__(self) -> None:
        if self.rule not in RULES or self.action not in EVENT_ACTIONS:  # a bug here, not a user error
            raise ValueError(f"unknown guardrail rule/action {self.rule!r}/{self.action!r}")


def check_body_size(g: Guardrails, n_bytes: int) -> Decision | None:
    """A block when the request body is larger than max_body_bytes."""
    if n_bytes > g.max_body_bytes:
        return Decision("max_body_bytes", "block", f"body has {n_bytes} bytes > limit {g.max_body_bytes}")
    return None


def check_prompt(g: Guardrails, prompt: str, prompt_tokens: int) -> Decision | None:
    """A block when the prompt is too long or matches a banned pattern; None when it may be served.
    The detail names the limit or the pattern's index, never the prompt's text."""
    if prompt_tokens > g.max_prompt_tokens:
        return Decision("max_prompt_tokens", "block",
                        f"prompt has {prompt_tokens} tokens > limit {g.max_prompt_tokens}")
    for i, rx in enumerate(g._compiled):
        if rx.search(prompt):
            return Decision("banned_pattern", "block", f"prompt matches banned_patterns[{i}]")
    return None


def clip_max_tokens(g: Guardrails, requested: int | None) -> tuple[int, Decision | None]:
    """The number of tokens to generate: `requested` capped at max_new_tokens (a clip decision when capped).
    None (the client did not say) means max_new_tokens, without a decision."""
    if requested is None:
        return g.max_new_tokens, None
    if not is_int(requested) or requested < 1:
        raise LigeroError(f"max_tokens must be a whole number >= 1, got {requested!r}; ask for at least one token")
    if requested > g.max_new_tokens:
        return g.max_new_tokens, Decision("max_new_tokens", "clip",
                                          f"requested {requested}, allowed {g.max_new_tokens}")
    return requested, None


# --- the output ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GuardStep:
    """What one `OutputGuard.push` allows: new text to send, whether to stop (True once the response is blocked or
    the final push is done), and the decision (if any) taken on this push."""

    release: str
    stop: bool
    decision: Decision | None = None


_WORD = re.compile(r"\w+")
_ENDS_IN_WORD = re.compile(r"\w\Z")


def _release_end(new: str) -> int:
    """How much of `new` ends in a complete word: up to and including its last boundary character.

    A boundary is whitespace or punctuation; U+FFFD is not one, because a decoder shows an incomplete UTF-8
    character that way until the next token completes it."""
    for i in range(len(new) - 1, -1, -1):
        ch = new[i]
        if ch != "\ufffd" and not ch.isalnum() and ch != "_":
            return i + 1
    return len(new) if len(new) >= MAX_HELD_CHARS else 0


class OutputGuard:
    """Watches one response's text as it is generated (streaming or not) and decides what may be released.

    Call `push(text)` with the full output so far after each token and send `step.release`; stop generating when
    `step.stop`. Call `push(text, final=True)` at the end to release the held-back last word. Non-streaming:
    `push(full_text, final=True)` once, then send `released`. Record `decisions` when the response ends (each
    rule/action appears once; a redact decision counts all redacted words). One guard per response; not
    thread-safe.
    """

    def __init__(self, g: Guardrails, scorer: Scorer = score_texts) -> None:
        self.g = g
        self.scorer = scorer
        self._checked = ""  # the model's text up to the last release point (before any redaction)
        self._released: list[str] = []
        self._decisions: list[Decision] = []
        self._score: float | None = None
        self._blocked = False
        self._done = False
        self._redacted = 0
        self._flagged = False
        # The classifier's running score of _checked (None: the scorer has none): a word then costs a few us on the
        # caller's thread instead of a scorer call over the whole text (~40 us, and a worker thread on a server)
        running = getattr(scorer, "running", None) if g.toxicity is not None else None
        self._running = running() if running is not None else None

    @property
    def released(self) -> str:
        return "".join(self._released)

    @property
    def decisions(self) -> list[Decision]:
        return list(self._decisions)

    @property
    def score(self) -> float | None:
        """Toxicity of the model's output checked so far (before redaction; including a blocked last piece),
        for the store's toxicity_score; None when nothing was scored (no output filter, or no words yet)."""
        return self._score

    @property
    def blocked(self) -> bool:
        return self._blocked

    @property
    def action(self) -> str:
        """What happened to the response, for the store's guardrail_action: block, redact, flag or none."""
        if self._blocked:
            return "block"
        return "redact" if self._redacted else "flag" if self._flagged else "none"

    def needs_scoring(self, text: str, final: bool = False) -> bool:
        """Whether `push(text, final)` would call the toxicity scorer (~40 us a call): callers on an event loop run
        only those pushes in a worker thread."""
        if self._done or self.g.toxicity is None or not text.startswith(self._checked):
            return False
        new = text[len(self._checked):]
        chunk = new if final else new[:_release_end(new)]
        if not chunk or not (self._score is None or _WORD.search(chunk)):
            return False
        # with the running score only redaction's per-word scores need the scorer
        return not self._running_fits() or (self.g.toxicity.action == "redact" and bool(_WORD.search(chunk)))

    def _running_fits(self) -> bool:
        """Whether the running score can extend over the next chunk: it exists and _checked ends between words."""
        return self._running is not None and not _ENDS_IN_WORD.search(self._checked)

    def push(self, text: str, final: bool = False) -> GuardStep:
        if self._done:
            return GuardStep("", True)
        if not text.startswith(self._checked):
            raise ValueError("OutputGuard.push needs the full output so far, and it may only grow")
        new = text[len(self._checked):]
        if final:
            self._done = True
        chunk = new if final else new[:_release_end(new)]
        if not chunk:
            return GuardStep("", final)
        candidate = self._checked + chunk
        for i, rx in enumerate(self.g._compiled):
            if rx.search(candidate):
                return self._block(Decision("banned_pattern", "block", f"output matches banned_patterns[{i}]"))
        decision, chunk = self._toxicity(candidate, chunk)
        if self._blocked:
            return GuardStep("", True, decision)
        self._checked = candidate
        self._released.append(chunk)
        return GuardStep(chunk, final, decision)

    def _block(self, decision: Decision) -> GuardStep:
        self._blocked = self._done = True
        self._decisions.append(decision)
        return GuardStep("", True, decision)

    def _toxicity(self, candidate: str, chunk: str) -> tuple[Decision | None, str]:
        """Score the candidate (and, to redact, each new word) in one scorer call; returns the decision taken
        and the chunk to release (redacted, or unchanged)."""
        tox = self.g.toxicity
        if tox is None or (self._score is not None and not _WORD.search(chunk)):
            return None, chunk  # punctuation and spaces do not change a word-level classifier's score
        words = list(_WORD.finditer(chunk)) if tox.action == "redact" else []
        if self._running_fits():
            scores = [self._running.extend(chunk)] + (list(self.scorer([m.group() for m in words])) if words else [])
        else:
            scores = self.scorer([candidate] + [m.group() for m in words])
            if self._running is not None:  # a chunk that split a word: a fresh running score over the candidate
                self._running = self.scorer.running()
                self._running.extend(candidate)
        if len(scores) != 1 + len(words):
            raise ValueError(f"the toxicity scorer returned {len(scores)} scores for {1 + len(words)} texts")
        self._score = float(scores[0])
        if tox.action == "block" and self._score >= tox.threshold:
            return self._block(Decision("toxicity", "block",
                                        f"score {self._score:.2f} >= {tox.threshold:g}")).decision, ""
        if tox.action == "flag" and self._score >= tox.threshold and not self._flagged:
            self._flagged = True
            decision = Decision("toxicity", "flag", f"score {self._score:.2f} >= {tox.threshold:g}")
            self._decisions.append(decision)
            return decision, chunk
        if tox.action == "redact":
            toxic = [m for m, s in zip(words, scores[1:]) if s >= tox.threshold]
            if toxic:
                for m in reversed(toxic):  # right to left, so earlier offsets stay valid
                    chunk = chunk[:m.start()] + "*" * len(m.group()) + chunk[m.end():]
                first = self._redacted == 0
                self._redacted += len(toxic)
                summary = Decision("toxicity", "redact", f"{self._redacted} word(s)")
                if first:
                    self._decisions.append(summary)
                else:  # keep one redact decision per response, with the running count
                    self._decisions = [summary if d.action == "redact" and d.rule == "toxicity" else d
                                       for d in self._decisions]
                return (summary if first else None), chunk
        return None, chunk
