"""The interface of an audit metric and what it is handed: one variant next to its baseline, the sample sizes,
the recommendation's thresholds, and neutral report pieces (tables, notes) that any renderer can draw.

Every method but `measure` has a do-nothing default, so a metric implements only what it has to say.
Results travel as plain dicts (the JSON of a variant's cache file): `measure` returns the keys it adds to a
variant's result, `compare` the keys it adds to the variant's comparison with the baseline, `row` the headline
numbers the summary table and the recommendation read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from ligero.errors import LigeroError
from ligero.eval.data import TextSplit
from ligero.progress import progress_bar

# The sections of a deployment card a metric may add fields, schema or Markdown lines to.
CARD_SECTIONS = ("format", "hardware", "metrics", "guardrails", "monitoring")


@dataclass(frozen=True)
class Thresholds:
    """What a variant must meet to be recommended (each metric checks its own)."""

    max_ppl_increase: float = 5.0  # ΔPPL, percent
    max_bias_shift: float = 5.0  # |Δ CrowS-Pairs pct_stereotype| and |Δ StereoSet ss|, points
    min_decode_tps: float | None = None  # None: at least the baseline's decode speed

    def __post_init__(self):
        if not 0 <= self.max_ppl_increase <= 1000:
            raise LigeroError(f"--max-ppl-increase must be between 0 and 1000 (percent), got {self.max_ppl_increase}")
        if not 0 <= self.max_bias_shift <= 100:
            raise LigeroError(f"--max-bias-shift must be between 0 and 100 (points), got {self.max_bias_shift}")
        if self.min_decode_tps is not None and not 0 <= self.min_decode_tps <= 1e5:
            raise LigeroError(f"--min-decode-tps must be between 0 and 100000, got {self.min_decode_tps}")

    def decode_floor(self, base_row: Mapping) -> float:
        """The decode speed a variant must reach: the threshold given, else the baseline's measured speed."""
        return self.min_decode_tps if self.min_decode_tps is not None else base_row["decode_tok_s"]


@dataclass
class MeasureContext:
    """One variant (or the baseline itself) to measure, with what every metric shares."""

    name: str  # the variant's name
    model: Any  # its Transformer
    tokenizer: Any
    # The baseline's Transformer when measuring the baseline or preparing from it; None for a variant (the audit
    # holds one model at a time: what variants are compared with is in `shared`, filled by Metric.prepare)
    base_model: Any
    budget: Mapping[str, int | None]  # sample sizes (keys declared by the metrics)
    eval_text: TextSplit  # the evaluation split
    eval_ids: list[int]  # all of it, tokenized without BOS
    bos: int | None  # the BOS each window starts with (models trained with one), else None
    shared: dict = field(default_factory=dict)  # what a metric computes once per audit (the baseline's log-probs)
    sample: int = 0  # 0: the run's items; 1: a fresh sample of other items and seeds, to replicate findings

    @property
    def is_baseline(self) -> bool:
        return self.base_model is not None and self.model is self.base_model

    def step(self, what: str, total: int | None) -> AbstractContextManager[Callable[..., None]]:
        """A progress bar for one long step of this variant; yields advance(n=1)."""
        return progress_bar(f"{self.name}: {what}", total)


@dataclass
class ReportSection:
    """A block of the audit report: a table (header row first) and/or bullet items, with an optional note.

    A `content_note` is shown before the content; HTML also folds the content away until the reader opens it."""

    title: str
    table: list[list[str]] = field(default_factory=list)
    items: list[str] = field(default_factory=list)
    note: str = ""
    content_note: str = ""


Column = tuple[str, Callable[[Mapping], str]]  # header, cell text from a summary row ("" when absent)
Figure = tuple[str, str, Any]  # key (file name), title, matplotlib figure


class Metric:
    """One audit metric. Subclass, implement `measure`, and list an instance in ligero.eval.metrics.METRICS."""

    name = ""  # short id
    title = ""  # what the audit log says while measuring
    budget_full: Mapping[str, int | None] = {}  # sample sizes of the standard run (keys unique across metrics)
    budget_quick: Mapping[str, int | None] = {}  # the same keys for --budget quick
    budget_thorough: Mapping[str, int | None] = {}  # what --budget thorough raises beyond the standard sizes
    # Whether the metric times things: it then runs with the memory allocator's defaults, as a user's process does.
    # The others run with every freed block of 1 MB or more returned to the system at once (audit.measure).
    timed: bool = False
    # Whether its claims can be re-tested on a fresh sample (MeasureContext.sample = 1: other items and seeds).
    replicable: bool = False

    # --- measuring --------------------------------------------------------------------------------------

    def budget_for(self, budget: str) -> dict[str, int | None]:
        """This metric's sample sizes under a budget (quick, standard or thorough)."""
        if budget == "quick":
            return dict(self.budget_quick)
        return {**self.budget_full, **(self.budget_thorough if budget == "thorough" else {})}

    def load(self) -> None:
        """Load what measuring needs besides a model and keeps for the run (a classifier, say): called once per
        run before the first model is loaded, so that no model's memory peak counts it."""

    def prepare(self, ctx: MeasureContext) -> None:
        """Compute into ctx.shared what variants are compared with, from the baseline (ctx.model is ctx.base_model):
        called once per run, before any variant is measured; the baseline is released afterwards."""

    def measure(self, ctx: MeasureContext) -> dict:
        """The keys this metric adds to a variant's result (JSON-ready values)."""
        raise NotImplementedError

    def compare(self, base: dict, variant: dict, n_resamples: int) -> dict:
        """The keys it adds to a variant's comparison with the baseline (paired statistics)."""
        return {}

    def claims(self, comparison: dict) -> list[dict]:
        """What the comparison claims changed, each a paired test (ligero.eval.findings corrects them together):
        {metric, key, label, unit, delta, ci (uncorrected 95 %), test, p_value, n, detectable (at 80 % power)}."""
        return []

    def inputs(self, base: dict) -> dict:
        """Provenance of its data (file hashes, prompt sets) for results.json's inputs, from the baseline's result."""
        return {}

    # --- summary and recommendation ------------------------------------------------------------------

    def row(self, result: dict, comparison: dict | None) -> dict:
        """Headline numbers for the summary row (`comparison` is None for the baseline)."""
        return {}

    def criterion(self, thresholds: Thresholds, base_row: Mapping) -> str:
        """What the recommendation requires of this metric, in words ('' when nothing)."""
        return ""

    def failures(self, row: Mapping, thresholds: Thresholds, base_row: Mapping) -> list[str]:
        """Why a variant's row misses this metric's threshold (empty when it passes)."""
        return []

    def cautions(self, row: Mapping, thresholds: Thresholds, base_row: Mapping) -> list[str]:
        """Threshold misses that do not fail the variant because they are not findings (shown beside the verdict)."""
        return []

    # --- deployment card -----------------------------------------------------------------------------

    def card_fields(self, result: dict, row: dict, comparison: dict | None) -> dict[str, dict]:
        """Card fields by section (one of CARD_SECTIONS), merged into that section."""
        return {}

    def card_schema(self) -> dict[str, dict]:
        """JSON Schema for those fields, by section: {"required": [...], "properties": {...}}."""
        return {}

    def card_markdown(self, card: dict) -> dict[str, list[str]]:
        """Markdown lines by card section; "metrics" lines are rows of a `| metric | value |` table."""
        return {}

    def card_caveats(self, result: dict) -> list[str]:
        return []

    def sample_sizes(self, result: dict) -> list[str]:
        """The sample sizes behind its numbers, e.g. 'toxicity 20 prompts'."""
        return []

    # --- audit report --------------------------------------------------------------------------------

    def report_columns(self) -> list[Column]:
        return []

    def report_samples(self, budget: Mapping) -> str:
        """Its sample sizes in the report's words ('' when none)."""
        return ""

    def report_legend(self, budget: Mapping) -> str:
        """What its columns' abbreviations mean ('' when none)."""
        return ""

    def report_figures(self, report: dict, results: dict) -> list[Figure]:
        return []

    def report_sections(self, report: dict) -> list[ReportSection]:
        return []


def budget_windows(ctx: MeasureContext, windows_key: str, tokens_key: str) -> list[list[int]]:
    """The first budget[windows_key] windows of budget[tokens_key] tokens of the evaluation split, each after the
    BOS the model expects (if any): what the per-token metrics (internal shift, expert routing) run on."""
    n, size = ctx.budget[windows_key], ctx.budget[tokens_key]
    ids, head = ctx.eval_ids[: n * size], [ctx.bos] if ctx.bos is not None else []
    return [head + ids[i:i + size] for i in range(0, len(ids), size)]


# --- text helpers shared by the metrics' tables ---------------------------------------------------------


def number(x: Any, digits: int = 3) -> str:
    """A card value as text: floats to `digits` places, None as n/a."""
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def interval(d: Mapping | None, digits: int = 2, signed: bool = False) -> str:
    """A card interval {estimate, low, high} as 'estimate [low, high]'."""
    if not d:
        return "n/a"
    sign = "+" if signed else ""
    return f"{d['estimate']:{sign}.{digits}f} [{d['low']:{sign}.{digits}f}, {d['high']:{sign}.{digits}f}]"


def delta_cell(row: Mapping, key: str, digits: int = 2) -> str:
    """A summary row's delta with its interval ('' for the baseline, which has none)."""
    if key not in row:
        return ""
    low, high = row[f"{key}_ci"]
    return f"{row[key]:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def card_interval(comparison_entry: Mapping) -> dict:
    """A comparison's {delta, delta_ci} as a card interval."""
    return {"estimate": comparison_entry["delta"], "low": comparison_entry["delta_ci"][0],
            "high": comparison_entry["delta_ci"][1]}


def claim(metric: str, key: str, label: str, unit: str, entry: Mapping) -> dict:
    """A claim (Metric.claims) from a comparison entry holding delta, delta_ci and a paired test's fields."""
    return {"metric": metric, "key": key, "label": label, "unit": unit, "delta": entry["delta"],
            "ci": list(entry["delta_ci"]), "test": entry["test"], "p_value": entry["p_value"], "n": entry["n"],
            "detectable": entry["detectable"]}


def flips_table(comparisons: Mapping, benchmark: str, toward: str) -> list[list[str]]:
    """Per variant, the items whose preference flipped against the baseline on `benchmark` (header row first):
    `toward` names the newly preferred side (e.g. 'stereotype')."""
    table = [["variant", "flipped", f"to {toward}", "to anti", "McNemar p"]]
    for name, cmp in comparisons.items():
        f = cmp[benchmark]["flips"]
        table.append([name, f"{100 * f['flip_rate']:.1f} %", str(f["variant_only"]), str(f["base_only"]),
                      f"{f['mcnemar']['p_value']:.3g}"])
    return table
