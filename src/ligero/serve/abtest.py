"""A/B tests: which variant a user gets, and which segment a request belongs to.

Assignment is a pure function of (experiment name, user id): the user's sha256 bucket in [0, 1) falls into one
variant's share of the cumulative split. So it is sticky (the same user always gets the same variant), several
server processes agree without talking to each other, and two experiments split users independently (the
experiment name is part of the hash). The store records each user's first assignment for the analysis.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from ligero.errors import LigeroError

SEGMENT_HEADER = "x-segment"
DEFAULT_SEGMENT = "default"
SEGMENT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # segments become labels in the monitor: keep them tame


def bucket(key: str) -> float:
    """A uniform number in [0, 1) from a string: the first 15 hex digits (60 bits) of its sha256."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:15], 16) / 16**15


@dataclass
class Experiment:
    """A named experiment splitting users among variants; `split` is given in percent or fractions and is
    normalised to fractions summing to 1. A variant may have share 0 (ramped down)."""

    name: str
    variants: list[str]
    split: list[float]
    _cumulative: list[float] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            self.variants, self.split = list(self.variants), [float(s) for s in self.split]
        except (TypeError, ValueError) as exc:
            raise LigeroError(f"experiment {self.name!r}: split shares must be numbers, got {self.split}") from exc
        if not self.name:
            raise LigeroError("an experiment needs a name (it seeds the assignment hash)")
        if not self.variants:
            raise LigeroError(f"experiment {self.name!r} has no variants; give at least one")
        if any(not v for v in self.variants) or len(set(self.variants)) != len(self.variants):
            raise LigeroError(f"experiment {self.name!r}: variant names must be non-empty and unique, "
                              f"got {self.variants}")
        if len(self.split) != len(self.variants):
            raise LigeroError(f"experiment {self.name!r} has {len(self.variants)} variants but {len(self.split)} "
                              f"split values; give one share per variant, e.g. --split 50,50")
        if any(not math.isfinite(s) or s < 0 for s in self.split):
            raise LigeroError(f"experiment {self.name!r}: split shares must be non-negative numbers, "
                              f"got {self.split}")
        total = sum(self.split)
        if not (math.isclose(total, 100, abs_tol=1e-6) or math.isclose(total, 1, abs_tol=1e-6)):
            raise LigeroError(f"experiment {self.name!r}: the split sums to {total:g}; make it sum to 100 "
                              f"(percent) or 1 (fractions)")
        self.split = [s / total for s in self.split]
        running, self._cumulative = 0.0, []
        for share in self.split:
            running += share
            self._cumulative.append(running)


def assign(experiment: Experiment, user_id: str) -> str:
    """The user's variant: deterministic, sticky, the same in every process."""
    u = bucket(f"{experiment.name}:{user_id}")
    for variant, upper in zip(experiment.variants, experiment._cumulative):
        if u < upper:
            return variant
    # Only reachable through float round-off (u just under 1, the cumulative sum just under 1 too).
    return next(v for v, s in zip(reversed(experiment.variants), reversed(experiment.split)) if s > 0)


@dataclass(frozen=True)
class SegmentRule:
    """Put a user in `segment` when their id matches. Give exactly one way to match:

    - `pattern`: a regular expression matched at the start of the user id (`re.match`), e.g. "emp-" or
      "beta-[0-9]+".
    - `buckets`: a range [lo, hi) in percent of the user's hash bucket (sha256 of "segment:<user>", independent
      of every experiment's), e.g. (0, 5) puts a stable 5 % of users in the segment.
    """

    segment: str
    pattern: str | None = None
    buckets: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if not SEGMENT_NAME.fullmatch(self.segment):
            raise LigeroError(f"segment name {self.segment!r} must be 1-64 letters, digits, '.', '_' or '-'")
        if (self.pattern is None) == (self.buckets is None):
            raise LigeroError(f"segment rule {self.segment!r}: give either a pattern or a bucket range, not "
                              f"{'both' if self.pattern is not None else 'neither'}")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise LigeroError(f"segment rule {self.segment!r}: pattern {self.pattern!r} is not a valid "
                                  f"regular expression ({exc})") from exc
        if self.buckets is not None:
            lo, hi = self.buckets
            if not 0 <= lo < hi <= 100:
                raise LigeroError(f"segment rule {self.segment!r}: bucket range {lo}-{hi} must satisfy "
                                  f"0 <= lo < hi <= 100 (percent)")

    def matches(self, user: str | None) -> bool:
        if user is None:
            return False
        if self.pattern is not None:
            return re.match(self.pattern, user) is not None
        lo, hi = self.buckets
        return lo <= 100 * bucket(f"segment:{user}") < hi


def parse_segment_rule(text: str) -> SegmentRule:
    """A rule from the CLI: "SEGMENT=re:PATTERN" or "SEGMENT=bucket:LO-HI" (percent), e.g. "staff=re:emp-"."""
    segment, _, spec = text.partition("=")
    kind, _, arg = spec.partition(":")
    if kind == "re" and arg:
        return SegmentRule(segment.strip(), pattern=arg)
    if kind == "bucket":
        lo, _, hi = arg.partition("-")
        try:
            return SegmentRule(segment.strip(), buckets=(float(lo), float(hi)))
        except ValueError:
            pass
    raise LigeroError(f"segment rule {text!r} is malformed; write SEGMENT=re:PATTERN or SEGMENT=bucket:LO-HI, "
                      f"e.g. staff=re:emp- or canary=bucket:0-5")


def segment_of(headers: Mapping[str, str], user: str | None, rules: list[SegmentRule]) -> str:
    """The request's segment: its X-Segment header (any case), else the first rule matching the user, else
    "default". A header that is not a tame name (letters, digits, '.', '_', '-'; at most 64) is a LigeroError."""
    for key, value in headers.items():
        if key.lower() == SEGMENT_HEADER and value.strip():
            value = value.strip()
            if not SEGMENT_NAME.fullmatch(value):
                raise LigeroError(f"X-Segment header {value[:80]!r} must be 1-64 letters, digits, '.', '_' or '-'")
            return value
    return next((rule.segment for rule in rules if rule.matches(user)), DEFAULT_SEGMENT)


def parse_split(text: str) -> list[float]:
    """`--split 50,50` -> [50.0, 50.0]; the Experiment checks and normalises the shares."""
    try:
        shares = [float(part) for part in text.split(",")]
    except ValueError as exc:
        raise LigeroError(f"split {text!r} is malformed; give comma-separated shares, e.g. 50,50 or 0.9,0.1") from exc
    if not all(math.isfinite(s) and s >= 0 for s in shares):
        raise LigeroError(f"split {text!r}: shares must be non-negative finite numbers, e.g. 50,50")
    return shares
