"""Guardrails: settings and their files (TOML/YAML/JSON/card), prompt checks, max-token clipping, the streaming
output guard (whole words only; block/redact/flag; banned patterns), the rate limiter and API keys."""

from __future__ import annotations

import json
import math
import re

import pytest

from ligero.errors import LigeroError
from ligero.serve.access import ApiKeys, AuthError, RateLimiter
from ligero.serve.guardrails import (
    GUARDRAILS_VERSION,
    MAX_HELD_CHARS,
    Decision,
    Guardrails,
    OutputGuard,
    ToxicityFilter,
    check_body_size,
    check_prompt,
    clip_max_tokens,
    guardrails_from_card,
    guardrails_from_dict,
    load_guardrails,
)
from ligero.serve.store import EVENT_ACTIONS, RULES

TOXIC_WORDS = {"fuck", "shit", "damn"}


class FakeScorer:
    """1.0 for a text containing a TOXIC_WORDS word, else 0.0; remembers every call."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, texts: list[str]) -> list[float]:
        self.calls.append(list(texts))
        return [1.0 if TOXIC_WORDS & set(re.findall(r"\w+", t.lower())) else 0.0 for t in texts]


def stream(guard: OutputGuard, tokens: list[str]) -> list:
    """Push the growing text token by token, then a final push; returns every step."""
    text, steps = "", []
    for tok in tokens:
        text += tok
        steps.append(guard.push(text))
        if steps[-1].stop:
            return steps
    steps.append(guard.push(text, final=True))
    return steps


# --- settings --------------------------------------------------------------------------------------


def test_defaults_validate_and_round_trip_through_to_dict():
    g = Guardrails()
    assert g.toxicity == ToxicityFilter(0.5, "block") and g.max_new_tokens == 256
    d = g.to_dict()
    assert d["version"] == GUARDRAILS_VERSION
    assert guardrails_from_dict(d, "test") == g
    custom = Guardrails(toxicity=None, banned_patterns=["secret"], rate_limit_per_minute=30, rate_limit_burst=3)
    assert custom.banned_patterns == ("secret",)  # a list becomes a tuple (hashable)
    assert guardrails_from_dict(json.loads(json.dumps(custom.to_dict())), "test") == custom


def test_rate_limit_burst_default_is_ten_seconds_of_the_rate():
    assert Guardrails().effective_burst is None and Guardrails().rate_limiter() is None
    assert Guardrails(rate_limit_per_minute=60).effective_burst == 10
    assert Guardrails(rate_limit_per_minute=1).effective_burst == 1
    assert Guardrails(rate_limit_per_minute=60, rate_limit_burst=2).rate_limiter().burst == 2


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"max_body_bytes": 0}, "max_body_bytes"),
    ({"max_prompt_tokens": -1}, "max_prompt_tokens"),
    ({"max_new_tokens": 2.5}, "max_new_tokens"),
    ({"max_new_tokens": True}, "max_new_tokens"),
    ({"toxicity": ToxicityFilter}, "toxicity"),
    ({"banned_patterns": "abc"}, "banned_patterns"),
    ({"banned_patterns": ["ok", "(unclosed"]}, "banned_patterns[1] '(unclosed'"),
    ({"banned_patterns": [""]}, "banned_patterns[0]"),
    ({"rate_limit_per_minute": 0}, "rate_limit_per_minute"),
    ({"rate_limit_per_minute": math.inf}, "rate_limit_per_minute"),
    ({"rate_limit_per_minute": 10, "rate_limit_burst": 0}, "rate_limit_burst"),
    ({"rate_limit_burst": 5}, "rate_limit_burst"),
])
def test_bad_settings_name_the_field(kwargs, named):
    with pytest.raises(LigeroError, match=named.replace("[", r"\[").replace("(", r"\(")):
        Guardrails(**kwargs)


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"threshold": 0}, "threshold"), ({"threshold": 1.5}, "threshold"), ({"threshold": "0.5"}, "threshold"),
    ({"action": "shout"}, "action"),
])
def test_bad_toxicity_filter_names_the_field(kwargs, named):
    with pytest.raises(LigeroError, match=named):
        ToxicityFilter(**kwargs)
    assert ToxicityFilter(threshold=1.0).threshold == 1.0


def test_from_dict_rejects_unknown_keys_and_versions_naming_the_source():
    with pytest.raises(LigeroError, match=r"my\.toml: unknown guardrails setting 'max_tokens'; valid .*max_new_tokens"):
        guardrails_from_dict({"max_tokens": 5}, "my.toml")
    with pytest.raises(LigeroError, match="unknown toxicity setting 'level'"):
        guardrails_from_dict({"toxicity": {"level": 3}}, "x")
    with pytest.raises(LigeroError, match="version 2"):
        guardrails_from_dict({"version": 2}, "x")
    with pytest.raises(LigeroError, match="^x: toxicity threshold"):
        guardrails_from_dict({"toxicity": {"threshold": 2}}, "x")
    assert guardrails_from_dict({"toxicity": False}, "x").toxicity is None


# --- files -----------------------------------------------------------------------------------------

EXPECTED = Guardrails(max_prompt_tokens=1024, max_new_tokens=64, toxicity=ToxicityFilter(0.7, "redact"),
                      banned_patterns=(r"api[-_ ]?key", "password"), rate_limit_per_minute=30)
TOML = """
max_prompt_tokens = 1024
max_new_tokens = 64
banned_patterns = ['api[-_ ]?key', "password"]
rate_limit_per_minute = 30
[toxicity]
threshold = 0.7
action = "redact"
"""
YAML = """
max_prompt_tokens: 1024
max_new_tokens: 64
banned_patterns: ['api[-_ ]?key', password]
rate_limit_per_minute: 30
toxicity: {threshold: 0.7, action: redact}
"""


def test_toml_yaml_and_json_files_load_to_the_same_guardrails(tmp_path):
    (tmp_path / "g.toml").write_text(TOML)
    (tmp_path / "g.yaml").write_text(YAML)
    (tmp_path / "g.yml").write_text(YAML)
    (tmp_path / "g.json").write_text(json.dumps(EXPECTED.to_dict()))
    for name in ("g.toml", "g.yaml", "g.yml", "g.json"):
        assert load_guardrails(tmp_path / name) == EXPECTED, name
    (tmp_path / "empty.toml").write_text("")
    assert load_guardrails(tmp_path / "empty.toml") == Guardrails()


def minimal_card(**guardrails) -> dict:
    section = {"toxicity_threshold": 0.5,
               "output_filter": {"classifier": "alt-profanity-check", "threshold": 0.8, "action": "flag"},
               "max_prompt_tokens": 512, "max_new_tokens": 32, "banned_patterns": ["forbidden"],
               "rationale": "because"}
    section.update(guardrails)
    return {"schema_version": "1.0", "identity": {"name": "m-int4"}, "guardrails": section}


def test_a_deployment_card_loads_its_guardrails(tmp_path):
    path = tmp_path / "int4.json"
    path.write_text(json.dumps(minimal_card()))
    g = load_guardrails(path)
    assert g == Guardrails(max_prompt_tokens=512, max_new_tokens=32, toxicity=ToxicityFilter(0.8, "flag"),
                           banned_patterns=("forbidden",))
    with pytest.raises(LigeroError, match="no \"guardrails\" section"):
        guardrails_from_card({"schema_version": "1.0"}, "card x")
    with pytest.raises(LigeroError, match="classifier 'perspective'"):
        guardrails_from_card(minimal_card(output_filter={"classifier": "perspective", "threshold": 0.5,
                                                         "action": "block"}), "card x")
    with pytest.raises(LigeroError, match="card x: toxicity threshold"):
        guardrails_from_card(minimal_card(output_filter={"classifier": "alt-profanity-check", "threshold": 0,
                                                         "action": "block"}), "card x")


def test_a_card_naming_the_classifier_with_its_version_loads(caplog):
    """Cards written by `ligero run` record the classifier as "alt-profanity-check <version>"."""
    from importlib.metadata import version

    installed = version("alt-profanity-check")
    card = minimal_card(output_filter={"classifier": f"alt-profanity-check {installed}", "threshold": 0.5,
                                       "action": "block"})
    with caplog.at_level("WARNING", logger="ligero.serve"):
        assert guardrails_from_card(card, "card x").toxicity == ToxicityFilter(0.5, "block")
    assert caplog.records == []
    older = minimal_card(output_filter={"classifier": "alt-profanity-check 0.0.1", "threshold": 0.5,
                                        "action": "block"})
    with caplog.at_level("WARNING", logger="ligero.serve"):
        assert guardrails_from_card(older, "card x").toxicity == ToxicityFilter(0.5, "block")
    assert "alt-profanity-check 0.0.1" in caplog.text and installed in caplog.text
    with pytest.raises(LigeroError, match="classifier 'alt-profanity-checker 1.0'"):
        guardrails_from_card(minimal_card(output_filter={"classifier": "alt-profanity-checker 1.0",
                                                         "threshold": 0.5, "action": "block"}), "card x")


@pytest.mark.parametrize(("name", "content", "message"), [
    ("g.toml", "max_new_tokens = ", "is not valid TOML"),
    ("g.yaml", "a: [1, 2\nb: }", "is not valid YAML"),
    ("g.json", "{not json", "is not valid JSON"),
    ("g.json", "[1, 2]", "mapping of settings at the top level, not list"),
    ("g.yaml", "just a string", "not str"),
    ("g.ini", "x=1", "unknown type '.ini'"),
    ("g.toml", "max_tokens = 5", "unknown guardrails setting 'max_tokens'"),
    ("g.json", '{"max_new_tokens": -3}', "max_new_tokens must be"),
])
def test_bad_files_give_one_line_errors_naming_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content.encode())
    with pytest.raises(LigeroError, match=message) as info:
        load_guardrails(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(LigeroError, match=r"does not exist; use a \.toml"):
        load_guardrails(tmp_path / "nope.toml")


# --- before generation -----------------------------------------------------------------------------


def test_check_prompt_blocks_long_prompts_and_banned_patterns_without_echoing_the_prompt():
    g = Guardrails(max_prompt_tokens=10, banned_patterns=("harmless", r"secret\s+plan"))
    assert check_prompt(g, "hello there", 10) is None
    long = check_prompt(g, "hello there", 11)
    assert long == Decision("max_prompt_tokens", "block", "prompt has 11 tokens > limit 10")
    prompt = "tell me the SECRET   Plan of ACME-4711"
    banned = check_prompt(g, prompt, 8)
    assert (banned.rule, banned.action) == ("banned_pattern", "block")
    assert "banned_patterns[1]" in banned.detail
    assert not any(w.lower() in banned.detail.lower() for w in ("secret", "plan", "acme", "tell"))


def test_body_size():
    g = Guardrails(max_body_bytes=100)
    assert check_body_size(g, 100) is None
    assert check_body_size(g, 101) == Decision("max_body_bytes", "block", "body has 101 bytes > limit 100")


def test_clip_max_tokens():
    g = Guardrails(max_new_tokens=50)
    assert clip_max_tokens(g, None) == (50, None)
    assert clip_max_tokens(g, 20) == (20, None)
    assert clip_max_tokens(g, 50) == (50, None)
    assert clip_max_tokens(g, 80) == (50, Decision("max_new_tokens", "clip", "requested 80, allowed 50"))
    for bad in (0, -5, 2.0):
        with pytest.raises(LigeroError, match="max_tokens"):
            clip_max_tokens(g, bad)


def test_decisions_use_the_stores_vocabulary():
    with pytest.raises(ValueError):
        Decision("toxicity", "shout", "")
    with pytest.raises(ValueError):
        Decision("profanity", "block", "")
    assert {"toxicity", "banned_pattern", "max_new_tokens"} <= set(RULES) and "clip" in EVENT_ACTIONS


# --- the output guard ------------------------------------------------------------------------------


def test_partial_words_are_held_back_until_a_boundary_or_final():
    guard = OutputGuard(Guardrails(toxicity=None))
    assert guard.push("Hel").release == ""
    assert guard.push("Hello").release == ""
    assert guard.push("Hello wor").release == "Hello "
    assert guard.push("Hello world,").release == "world,"
    assert guard.push("Hello world, fr").release == " "
    assert guard.push("Hello world, fr\ufffd").release == ""  # an incomplete UTF-8 character is not a boundary
    step = guard.push("Hello world, friend", final=True)
    assert (step.release, step.stop) == ("friend", True)
    assert guard.released == "Hello world, friend" and guard.action == "none" and guard.decisions == []
    assert guard.push("Hello world, friend!").release == ""  # nothing after the final push


def test_a_very_long_word_is_released_rather_than_stalling_the_stream():
    guard = OutputGuard(Guardrails(toxicity=None))
    assert guard.push("x" * 99).release == ""
    assert guard.push("x" * 100).release == "x" * 100


def test_text_must_grow():
    guard = OutputGuard(Guardrails(toxicity=None))
    guard.push("one two ")
    with pytest.raises(ValueError):
        guard.push("one three ")


def test_block_stops_at_the_first_toxic_word_and_never_releases_it():
    scorer = FakeScorer()
    guard = OutputGuard(Guardrails(), scorer=scorer)
    steps = stream(guard, ["the", " cat", " said", " fuck", " you", " all"])
    assert guard.blocked and guard.action == "block" and steps[-1].stop
    assert "".join(s.release for s in steps) == guard.released == "the cat said "
    assert steps[-1].decision == Decision("toxicity", "block", "score 1.00 >= 0.5")
    assert guard.decisions == [steps[-1].decision] and guard.score == 1.0
    assert all(len(call) == 1 for call in scorer.calls)  # one cumulative text per push
    after = guard.push("the cat said fuck you all ")
    assert (after.release, after.stop, after.decision) == ("", True, None)


def test_block_with_the_real_classifier():
    guard = OutputGuard(Guardrails())  # the default scorer: alt-profanity-check
    steps = stream(guard, ["the", " cat", " said", " fuck", " you"])
    assert guard.released == "the cat said " and guard.blocked
    assert "fuck" not in "".join(s.release for s in steps)
    assert guard.score > 0.9 and guard.decisions[0].rule == "toxicity"
    clean = OutputGuard(Guardrails())
    clean.push("the cat sat on the mat", final=True)
    assert clean.released == "the cat sat on the mat" and not clean.blocked and clean.score < 0.5


def test_redact_replaces_only_the_toxic_words_and_keeps_going():
    scorer = FakeScorer()
    guard = OutputGuard(Guardrails(toxicity=ToxicityFilter(0.5, "redact")), scorer=scorer)
    steps = stream(guard, ["the", " cat", " said", " fuck", " you", " and", " damn", " it"])
    assert guard.released == "the cat said **** you and **** it"
    assert not any(s.stop for s in steps[:-1]) and not guard.blocked and guard.action == "redact"
    firsts = [s.decision for s in steps if s.decision]
    assert firsts == [Decision("toxicity", "redact", "1 word(s)")]  # announced once, when it first happens
    assert guard.decisions == [Decision("toxicity", "redact", "2 word(s)")]  # the summary counts every word
    assert guard.score == 1.0  # the model's own text, before redaction
    assert all(len(call) == 2 for call in scorer.calls)  # one call per push: cumulative text + each new word


def test_redact_with_the_real_classifier_in_one_push():
    guard = OutputGuard(Guardrails(toxicity=ToxicityFilter(0.5, "redact")))
    step = guard.push("well shit, the cat sat", final=True)
    assert step.release == guard.released == "well ****, the cat sat"
    assert step.decision == Decision("toxicity", "redact", "1 word(s)")


def test_flag_releases_everything_and_records_one_decision():
    guard = OutputGuard(Guardrails(toxicity=ToxicityFilter(0.5, "flag")), scorer=FakeScorer())
    steps = stream(guard, ["oh", " shit", " oh", " damn", " it"])
    assert guard.released == "oh shit oh damn it" and not guard.blocked and guard.action == "flag"
    assert guard.decisions == [Decision("toxicity", "flag", "score 1.00 >= 0.5")]
    assert sum(s.decision is not None for s in steps) == 1


def test_a_banned_pattern_in_the_output_blocks_it():
    g = Guardrails(toxicity=None, banned_patterns=(r"api\s*key",))
    guard = OutputGuard(g)
    steps = stream(guard, ["Your", " API", " key", " is", " abc"])
    assert guard.released == "Your API " and guard.blocked and steps[-1].stop
    assert guard.decisions == [Decision("banned_pattern", "block", "output matches banned_patterns[0]")]
    assert guard.score is None  # no output filter, no scoring


def test_non_streaming_single_push():
    scorer = FakeScorer()
    ok = OutputGuard(Guardrails(), scorer=scorer)
    step = ok.push("A calm answer.", final=True)
    assert (step.release, step.stop, step.decision) == ("A calm answer.", True, None) and len(scorer.calls) == 1
    bad = OutputGuard(Guardrails(), scorer=scorer)
    step = bad.push("A calm answer, then shit.", final=True)
    assert step.release == bad.released == "" and bad.blocked and step.decision.action == "block"


def test_punctuation_alone_is_not_rescored():
    scorer = FakeScorer()
    guard = OutputGuard(Guardrails(), scorer=scorer)
    guard.push("Hi ")
    guard.push("Hi ... ")
    assert len(scorer.calls) == 1


# --- rate limits -----------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_limiter_burst_retry_after_and_refill():
    clock = Clock()
    limiter = RateLimiter(per_minute=60, burst=3, clock=clock)  # one token a second
    assert [limiter.acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("a") == pytest.approx(1.0)
    assert limiter.acquire("b") == 0.0  # keys have their own buckets
    clock.now += 0.25
    assert limiter.acquire("a") == pytest.approx(0.75)  # a refused request takes nothing
    clock.now += 0.75
    assert limiter.acquire("a") == 0.0 and limiter.acquire("a") == pytest.approx(1.0)
    clock.now += 100
    assert [limiter.acquire("a") for _ in range(4)][-2:] == [0.0, pytest.approx(1.0)]  # refills only to the burst


def test_rate_limiter_memory_is_bounded():
    clock = Clock()
    limiter = RateLimiter(per_minute=60, burst=2, clock=clock, max_keys=50)
    for i in range(40):
        limiter.acquire(f"k{i}")
    clock.now += 2  # every bucket is full again: the same as no bucket
    limiter.acquire("new")
    assert len(limiter) == 1
    for i in range(200):
        limiter.acquire(f"x{i}")
    assert len(limiter) == 50


# --- API keys --------------------------------------------------------------------------------------

KEY_A, KEY_B, KEY_C = "sk-alpha-0123456789", "sk-bravo-9876543210", "sk-charlie-5555"


def test_api_keys_from_env_and_file(tmp_path, monkeypatch):
    monkeypatch.delenv("LIGERO_API_KEYS", raising=False)
    assert ApiKeys.load() is None  # auth off
    monkeypatch.setenv("LIGERO_API_KEYS", f" {KEY_A},{KEY_B}\n{KEY_A} ")
    keys = ApiKeys.load()
    assert len(keys) == 2 and KEY_A not in repr(keys)
    path = tmp_path / "keys.txt"
    path.write_text(f"# production keys\n\n{KEY_C}\n   # indented comment\n{KEY_B}\n")
    assert len(ApiKeys.load(file=path)) == 3
    monkeypatch.delenv("LIGERO_API_KEYS")
    keys = ApiKeys.load(file=path)
    assert len(keys) == 2 and keys.check(f"Bearer {KEY_C}") == KEY_C


def test_api_key_file_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("LIGERO_API_KEYS", raising=False)
    with pytest.raises(LigeroError, match="cannot be read"):
        ApiKeys.load(file=tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n\n")
    with pytest.raises(LigeroError, match="holds no keys"):
        ApiKeys.load(file=empty)
    spaced = tmp_path / "spaced.txt"
    spaced.write_text("sk-one two\n")
    with pytest.raises(LigeroError, match="line 1") as info:
        ApiKeys.load(file=spaced)
    assert "sk-one" not in str(info.value)


def test_check_accepts_known_keys_and_never_echoes_the_presented_token():
    keys = ApiKeys([KEY_A, KEY_B])
    assert keys.check(f"Bearer {KEY_B}") == KEY_B
    assert keys.check(f"bearer   {KEY_A}  ") == KEY_A
    wrong = "sk-guess-0000000000"
    cases = {None: "missing", "": "missing", wrong: "not a bearer token", f"Basic {wrong}": "not a bearer token",
             "Bearer": "not a bearer token", f"Bearer {wrong} extra": "not a bearer token",
             f"Bearer {wrong}": "unknown API key", f"Bearer {KEY_A}x": "unknown API key"}
    for header, message in cases.items():
        with pytest.raises(AuthError, match=message) as info:
            keys.check(header)
        assert isinstance(info.value, LigeroError)
        assert "sk-" not in str(info.value)


def test_needs_scoring_says_when_the_scorer_will_run():
    calls = []

    def scorer(texts):
        calls.append(list(texts))
        return [0.0] * len(texts)

    guard = OutputGuard(Guardrails(), scorer)
    for text, final in [("Hel", False), ("Hello", False), ("Hello ", False), ("Hello ,", False), ("Hello , wor", False),
                        ("Hello , world", True)]:
        expected = guard.needs_scoring(text, final)
        before = len(calls)
        guard.push(text, final)
        assert (len(calls) > before) == expected, (text, final)
    assert not OutputGuard(Guardrails(toxicity=None)).needs_scoring("Hello ", False)


def test_a_batch_scorer_scores_concurrent_callers_in_shared_calls():
    import threading
    import time

    from ligero.serve.guardrails import BatchScorer

    calls = []

    def slow_scorer(texts):
        calls.append(list(texts))
        time.sleep(0.05)  # long enough that the other callers queue up meanwhile
        return [float(len(t)) for t in texts]

    scorer = BatchScorer(slow_scorer)
    results = {}

    def ask(i):
        results[i] = scorer(["x" * i, "y" * (i + 1)])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: [float(i), float(i + 1)] for i in range(8)}  # each caller gets its own scores
    assert scorer.calls == len(calls) < 8  # fewer classifier calls than callers
    assert sum(len(c) for c in calls) == 16

    def broken(texts):
        raise RuntimeError("classifier failed")

    with pytest.raises(RuntimeError, match="classifier failed"):
        BatchScorer(broken)(["a"])


class CountingScorer:
    """The real classifier, counting the scorer calls a guard makes; its running score is the real one's."""

    def __init__(self, running: bool = True) -> None:
        from ligero.eval.toxicity import load_scorer

        self.predict, self.calls = load_scorer(), 0
        if running:
            self.running = self.predict.running

    def __call__(self, texts):
        self.calls += 1
        return list(self.predict(texts))


@pytest.mark.parametrize("action", ["block", "flag", "redact"])
def test_the_running_score_decides_as_whole_text_scoring_with_fewer_calls(action):
    long_word = "x" * (MAX_HELD_CHARS + 5)  # released unfinished ("yz" makes it too long to hold): "abc" goes on
    tokens = ["Well", ",", " the", " cat", " " + long_word, "yz", "abc", " then", " said", " shit", " and", " damn",
              " it", ".", " The", " cat", " sat", " you", " idiot"]
    guards = {}
    for running in (True, False):
        scorer = CountingScorer(running)
        guard = OutputGuard(Guardrails(toxicity=ToxicityFilter(0.5, action)), scorer=scorer)
        steps = stream(guard, tokens)
        guards[running] = (guard, steps, scorer.calls)
    (fast, fast_steps, fast_calls), (whole, whole_steps, whole_calls) = guards[True], guards[False]
    assert [(s.release, s.stop, s.decision) for s in fast_steps] == \
        [(s.release, s.stop, s.decision) for s in whole_steps]
    assert fast.released == whole.released and fast.decisions == whole.decisions and fast.action == whole.action
    assert fast.score == pytest.approx(whole.score, rel=1e-9, abs=1e-12)
    if action == "redact":  # each new word is still scored alone; the running score saves the whole-text part
        assert fast_calls <= whole_calls
    else:  # only the chunk that finishes the split word needs the scorer
        assert fast_calls == 1 and whole_calls > 5


def test_needs_scoring_is_false_where_the_running_score_extends():
    guard = OutputGuard(Guardrails())  # the default scorer has a running score
    guard.push("the cat ")
    assert not guard.needs_scoring("the cat sat ")  # a word on the caller's thread, no scorer call
    plain = OutputGuard(Guardrails(), scorer=CountingScorer(running=False))
    plain.push("the cat ")
    assert plain.needs_scoring("the cat sat ")
    redact = OutputGuard(Guardrails(toxicity=ToxicityFilter(0.5, "redact")))
    redact.push("the cat ")
    assert redact.needs_scoring("the cat sat ") and not redact.needs_scoring("the cat , ")
