"""A/B assignment: deterministic and sticky (also in another process), proportions match the split,
experiments are independent; segments; bad experiment and split input are user errors."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from ligero.errors import LigeroError
from ligero.serve.abtest import Experiment, SegmentRule, assign, parse_segment_rule, parse_split, segment_of

USERS = [f"user-{i}" for i in range(20_000)]


def shares(experiment: Experiment, users=USERS) -> dict[str, float]:
    counts = Counter(assign(experiment, u) for u in users)
    return {v: counts[v] / len(users) for v in experiment.variants}


def by_hand(name: str, variants: list[str], fractions: list[float], user: str) -> str:
    """The documented rule, written out independently of the module."""
    u = int(hashlib.sha256(f"{name}:{user}".encode()).hexdigest()[:15], 16) / 16**15
    upper = 0.0
    for variant, fraction in zip(variants, fractions):
        upper += fraction
        if u < upper:
            return variant
    raise AssertionError("unreachable for these splits")


def test_assignment_is_deterministic_sticky_and_follows_the_documented_hash():
    exp = Experiment("quant-ab", ["fp32", "int4", "int8"], [20, 30, 50])
    assert exp.split == pytest.approx([0.2, 0.3, 0.5])
    first = [assign(exp, u) for u in USERS[:500]]
    assert first == [assign(exp, u) for u in USERS[:500]]  # sticky
    assert first == [assign(Experiment("quant-ab", ["fp32", "int4", "int8"], [0.2, 0.3, 0.5]), u)
                     for u in USERS[:500]]  # percent and fractions are the same split
    assert first == [by_hand("quant-ab", ["fp32", "int4", "int8"], [0.2, 0.3, 0.5], u) for u in USERS[:500]]


def test_another_process_assigns_the_same_variants():
    """Separate server processes agree without coordination (no per-process salt such as PYTHONHASHSEED)."""
    script = ("import json, sys\nfrom ligero.serve.abtest import Experiment, assign\n"
              "exp = Experiment('quant-ab', ['a', 'b'], [50, 50])\n"
              "print(json.dumps([assign(exp, f'user-{i}') for i in range(300)]))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True,
                          env={**os.environ, "PYTHONHASHSEED": "12345"})
    exp = Experiment("quant-ab", ["a", "b"], [50, 50])
    assert json.loads(proc.stdout) == [assign(exp, u) for u in USERS[:300]]


@pytest.mark.parametrize(("split", "tolerance"), [([50, 50], 0.015), ([90, 10], 0.01), ([0.2, 0.3, 0.5], 0.015)])
def test_proportions_follow_the_split(split, tolerance):
    variants = ["a", "b", "c"][:len(split)]
    exp = Experiment("prop", variants, split)
    got = shares(exp)
    for variant, want in zip(variants, exp.split):
        assert got[variant] == pytest.approx(want, abs=tolerance)


def test_a_variant_with_share_zero_gets_nobody_and_one_variant_gets_everybody():
    assert shares(Experiment("ramp", ["old", "new"], [0, 100]), USERS[:2000]) == {"old": 0.0, "new": 1.0}
    assert shares(Experiment("solo", ["only"], [1]), USERS[:200]) == {"only": 1.0}


def test_experiments_split_users_independently():
    one, two = Experiment("exp-one", ["a", "b"], [50, 50]), Experiment("exp-two", ["a", "b"], [50, 50])
    pairs = Counter((assign(one, u), assign(two, u)) for u in USERS)
    for cell in [("a", "a"), ("a", "b"), ("b", "a"), ("b", "b")]:
        assert pairs[cell] / len(USERS) == pytest.approx(0.25, abs=0.015)
    # Renaming the experiment reshuffles users: about half change variant.
    moved = sum(assign(one, u) != assign(two, u) for u in USERS) / len(USERS)
    assert moved == pytest.approx(0.5, abs=0.015)


@pytest.mark.parametrize(("args", "message"), [
    (("", ["a"], [1]), "needs a name"),
    (("e", [], []), "no variants"),
    (("e", ["a", "a"], [50, 50]), "non-empty and unique"),
    (("e", ["a", ""], [50, 50]), "non-empty and unique"),
    (("e", ["a", "b"], [100]), "2 variants but 1 split values"),
    (("e", ["a", "b"], [120, -20]), "non-negative"),
    (("e", ["a", "b"], [float("nan"), 100]), "non-negative"),
    (("e", ["a", "b"], [40, 40]), "sums to 80; make it sum to 100"),
    (("e", ["a", "b"], [0, 0]), "sums to 0"),
    (("e", ["a", "b"], ["half", "half"]), "must be numbers"),
])
def test_bad_experiments_are_user_errors(args, message):
    with pytest.raises(LigeroError, match=message):
        Experiment(*args)


def test_parse_split():
    assert parse_split("50,50") == [50.0, 50.0]
    assert parse_split(" 0.9, 0.1 ") == [0.9, 0.1]
    for bad, message in [("50;50", "malformed"), ("50,", "malformed"), ("", "malformed"), ("a,b", "malformed"),
                         ("50,-50", "non-negative"), ("inf,1", "non-negative")]:
        with pytest.raises(LigeroError, match=message):
            parse_split(bad)


def test_segment_header_then_rules_then_default():
    rules = [SegmentRule("staff", pattern="emp-"), parse_segment_rule("canary=bucket:0-10")]
    assert segment_of({"X-Segment": "beta"}, "emp-7", rules) == "beta"  # the header wins
    assert segment_of({"x-segment": " beta "}, None, rules) == "beta"  # any case, trimmed
    assert segment_of({"X-Segment": ""}, "emp-7", rules) == "staff"  # an empty header is no header
    assert segment_of({}, "emp-7", rules) == "staff"
    assert segment_of({}, "xemp-7", rules[:1]) == "default"  # the pattern matches at the start only
    assert segment_of({}, None, rules) == "default"
    canary = sum(segment_of({}, u, rules) == "canary" for u in USERS) / len(USERS)
    assert canary == pytest.approx(0.10, abs=0.01)
    assert [segment_of({}, u, rules) for u in USERS[:100]] == [segment_of({}, u, rules) for u in USERS[:100]]
    with pytest.raises(LigeroError, match="X-Segment header"):
        segment_of({"X-Segment": "drop table; --"}, "u", rules)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"segment": "staff"}, "not neither"),
    ({"segment": "staff", "pattern": "emp-", "buckets": (0, 5)}, "not both"),
    ({"segment": "staff", "pattern": "emp-("}, "not a valid regular expression"),
    ({"segment": "canary", "buckets": (5, 5)}, "0 <= lo < hi <= 100"),
    ({"segment": "canary", "buckets": (0, 101)}, "0 <= lo < hi <= 100"),
    ({"segment": "has space", "pattern": "x"}, "segment name"),
])
def test_bad_segment_rules_are_user_errors(kwargs, message):
    with pytest.raises(LigeroError, match=message):
        SegmentRule(**kwargs)


def test_parse_segment_rule():
    assert parse_segment_rule("staff=re:emp-[0-9]+") == SegmentRule("staff", pattern="emp-[0-9]+")
    assert parse_segment_rule("canary=bucket:0-5") == SegmentRule("canary", buckets=(0.0, 5.0))
    for bad in ["staff", "staff=emp-", "canary=bucket:five", "staff=re:"]:
        with pytest.raises(LigeroError, match="malformed"):
            parse_segment_rule(bad)
