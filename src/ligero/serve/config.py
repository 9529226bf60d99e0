"""What one `ligero serve` process serves and how: its variants, store, guardrails, experiment and defaults."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ligero.errors import LigeroError
from ligero.serve.abtest import Experiment, SegmentRule
from ligero.serve.access import ApiKeys
from ligero.serve.engine import Engine
from ligero.serve.guardrails import Guardrails
from ligero.serve.store import Store

COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat's default is the guardrails' maximum
BODY_TIMEOUT_S = 30.0  # a client must send its whole request body within this time


@dataclass(frozen=True)
class RequestDefaults:
    """Sampling settings for requests that leave them out. OpenAI's by default (temperature 1, top_p 1, 16 tokens for
    completions, as many as the guardrails allow for chat); a deployment card's reference-profile settings with
    `ligero serve --card`, so production traffic is generated as the card's profile was and drift is comparable."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = None  # None: OpenAI's per-endpoint defaults
    source: str = "OpenAI's defaults"

    def max_tokens_for(self, endpoint: str) -> int | None:
        if self.max_tokens is not None:
            return self.max_tokens
        return COMPLETIONS_MAX_TOKENS if endpoint == "completions" else None

    def describe(self) -> str:
        tokens = self.max_tokens if self.max_tokens is not None else (f"{COMPLETIONS_MAX_TOKENS} (completions) / "
                                                                      "the guardrails' maximum (chat)")
        return f"temperature {self.temperature:g}, top_p {self.top_p:g}, max_tokens {tokens} ({self.source})"

    @classmethod
    def from_card(cls, card: Mapping, source: str) -> RequestDefaults:
        """The card's monitoring.reference_profile.sampling (max_new_tokens, temperature, top_p)."""
        sampling = ((card.get("monitoring") or {}).get("reference_profile") or {}).get("sampling")
        if not isinstance(sampling, Mapping):
            raise LigeroError(f"{source} has no monitoring.reference_profile.sampling; regenerate the card with "
                              "`ligero run`")
        try:
            defaults = cls(temperature=float(sampling["temperature"]), top_p=float(sampling["top_p"]),
                           max_tokens=int(sampling["max_new_tokens"]), source=f"the reference profile of {source}")
        except (KeyError, TypeError, ValueError):
            raise LigeroError(f"{source}: monitoring.reference_profile.sampling needs temperature, top_p and "
                              "max_new_tokens numbers; regenerate the card with `ligero run`") from None
        if not (0 <= defaults.temperature <= 2 and 0 < defaults.top_p <= 1 and defaults.max_tokens >= 1):
            raise LigeroError(f"{source}: the reference profile's sampling settings are out of range "
                              f"({defaults.describe()}); regenerate the card with `ligero run`")
        return defaults


@dataclass
class Variant:
    name: str
    scheme: str
    engine: Engine
    vision: Any = None  # a ligero.vision VisionLanguageModel around engine.model: the variant accepts images


@dataclass
class ServerConfig:
    model_id: str
    variants: dict[str, Variant]  # first = control (users without an id get it)
    tokenizer: Any
    store: Store
    guardrails: Guardrails = field(default_factory=Guardrails)
    split: list[float] | None = None
    experiment_name: str | None = None
    segment_rules: list[SegmentRule] = field(default_factory=list)
    api_keys: ApiKeys | None = None
    server_id: str = "ligero"
    context: int = 8192
    defaults: RequestDefaults = field(default_factory=RequestDefaults)
    public_metrics: bool = False  # /metrics without a key even when API keys are on
    body_timeout_s: float = BODY_TIMEOUT_S
    watermark: Any = None  # a ligero.watermark.Watermarker: every response is marked with its key
    image_limits: Any = None  # ligero.vision.images.ImageLimits of a vision server (None: images are refused)

    def experiment(self) -> Experiment | None:
        if len(self.variants) < 2:
            return None
        names = list(self.variants)
        split = self.split or [100 / len(names)] * len(names)
        return Experiment(self.experiment_name or f"{self.model_id}-ab", names, split)

    def model_names(self) -> dict[str, str | None]:
        """Served model names -> the variant they ask for (None: the experiment picks)."""
        return {self.model_id: None, **{f"{self.model_id}:{name}": name for name in self.variants}}
